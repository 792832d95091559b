"""The transformers engine's model loop in its own process (`engine_process: true`), as vLLM's V1
engine core runs apart from its API server.

Why: the continuous batcher's model thread launches kernels from Python and holds the GIL most of
the time. In a Serve replica it shares the interpreter with the replica's event loop, Ray's core
worker threads and the streaming of every token to the ingress; each of those waits for the GIL
(up to a 5 ms switch interval per hand-off) and the model thread waits for them. Measured on an
H200 (1.1B Llama shapes): 0.77–0.89x the engine's own tokens/s at 4 clients and +60 ms TTFT. In a
child process the model thread has an interpreter to itself; the replica keeps the tokenizer
(prompt rendering, token counts) and relays deltas.

The two sides talk over a socketpair wrapped in `multiprocessing.connection.Connection` (pickled
tuples; the child's end is passed as an inherited fd, so nothing is reachable from outside):

    replica -> core   ("init", kwargs)  ("add", rid, prompt_ids, SamplingParams, adapter_id | None)  ("abort", rid)
                      ("load_adapter", adapter_id, path)  ("unload_adapter", adapter_id)  ("stop",)
    core -> replica   ("ready", info) | ("error" or "unsupported", text)   ("step", rows_decoded, [(rid, TokenDelta | str)])
                      ("adapter", adapter_id, error text | None): a load or unload ran on the model thread

One "step" message per model-loop iteration carries every delta it made (a str is a sequence's
failure). Detokenization and stop strings stay in the core, next to the sampling, so a sequence
ends in the same step that produced its stop. When the replica dies the core's `recv` ends
(EOF) and it exits, freeing the GPU; when the core dies the replica's reader gets EOF, fails every
open stream and `check_health` fails (Serve replaces the replica).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

logger = logging.getLogger("genserve.llm.core")


class UnsupportedModel(RuntimeError):
    """The core cannot run this model (its KV cache is not plain dynamic layers)."""


class EngineCoreClient:
    """The replica's side: starts the core process, sends it work, and hands each step's deltas
    to `on_step(rows_decoded, items)` on the event loop that called `start`."""

    def __init__(self, on_step: Callable[[int, list], None], on_exit: Callable[[str], None],
                 on_adapter: Callable[[str, str | None], None] | None = None) -> None:
        self._on_step = on_step
        self._on_adapter = on_adapter
        self._on_exit = on_exit
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._reader: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.exited: str | None = None  # why the core is gone, once it is

    async def start(self, init: dict[str, Any]) -> dict[str, Any]:
        self._loop = asyncio.get_running_loop()
        mine, theirs = socket.socketpair()
        # The child imports this package the way the replica did (Ray's working_dir is on sys.path).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._proc = subprocess.Popen([sys.executable, "-m", "deployments.llm.core_process", str(theirs.fileno())],
                                      pass_fds=[theirs.fileno()], env=env)
        theirs.close()  # the child holds it now: its exit is our EOF
        self._conn = Connection(mine.detach())
        self._conn.send(("init", init))
        try:
            kind, info = await asyncio.to_thread(self._conn.recv)  # loading the model: up to minutes
        except EOFError:
            code = await asyncio.to_thread(self._proc.wait)
            raise RuntimeError(f"the engine core process exited with code {code} while loading") from None
        if kind in ("error", "unsupported"):
            await asyncio.to_thread(self._proc.wait)
            self.exited = f"the engine core could not start: {info}"
            raise (UnsupportedModel if kind == "unsupported" else RuntimeError)(self.exited)
        self._reader = threading.Thread(target=self._read, name="llm-core-reader", daemon=True)
        self._reader.start()
        return info

    def send(self, msg: tuple) -> None:
        """From the event loop's thread only (one writer)."""
        if self.exited is not None or self._conn is None:
            raise RuntimeError(f"the engine core is gone: {self.exited}")
        self._conn.send(msg)

    def alive(self) -> bool:
        return self.exited is None and self._proc is not None and self._proc.poll() is None

    def _read(self) -> None:
        assert self._conn is not None and self._proc is not None and self._loop is not None
        try:
            while True:
                steps = [self._conn.recv()]
                while self._conn.poll(0):  # drain what is there: one loop wake-up for all of it
                    steps.append(self._conn.recv())
                self._loop.call_soon_threadsafe(self._deliver, steps)
        except (EOFError, OSError):
            pass
        code = self._proc.wait()
        why = f"the engine core process exited with code {code}"
        self.exited = why
        try:
            self._loop.call_soon_threadsafe(self._on_exit, why)
        except RuntimeError:  # the loop is closed: nobody is left to tell
            pass

    def _deliver(self, steps: list[tuple]) -> None:
        for kind, *rest in steps:
            if kind == "step":
                self._on_step(*rest)
            elif kind == "adapter" and self._on_adapter is not None:
                self._on_adapter(*rest)

    async def stop(self, timeout_s: float = 30.0) -> None:
        if self._proc is None:
            return
        assert self._conn is not None  # start() opens it right after the process
        if self.exited is None:
            try:
                self._conn.send(("stop",))
            except OSError:
                pass
        try:
            await asyncio.to_thread(self._proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("the engine core did not stop in %.0f s; killing it", timeout_s)
            self._proc.kill()
            await asyncio.to_thread(self._proc.wait)
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, timeout_s)
        self._conn.close()


# -- the core process ---------------------------------------------------------------------------

def _serve(conn: Connection) -> None:
    from deployments.llm.continuous import ContinuousBatcher
    from deployments.llm.detok import IncrementalDetokenizer
    from deployments.llm.loading import load_model
    from deployments.llm.peft_adapters import AdapterCommand
    from deployments.llm.sequence import Sequence, new_generator

    _, init = conn.recv()
    try:
        if init.get("gil_switch_interval_ms") is not None:
            sys.setswitchinterval(init["gil_switch_interval_ms"] / 1000)
        model, tokenizer = load_model(init["model"], dtype=init["dtype"], device=init["device"],
                                      max_model_len=init["max_model_len"])
        if not ContinuousBatcher.supports(model):
            conn.send(("unsupported", f"{init['model']}: its KV cache is not made of plain dynamic layers "
                                      "(continuous batching, hence this process, cannot run it)"))
            return
    except Exception as exc:  # the replica shows it and fails its start
        logger.exception("engine core failed to load")
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return

    outbox: list[tuple[str, Any]] = []  # filled and flushed on the model thread only
    live: dict[str, Sequence] = {}

    def sink_for(rid: str) -> Callable[[Any], None]:
        def sink(item: Any) -> None:
            if isinstance(item, BaseException):
                item = f"{type(item).__name__}: {item}"
                live.pop(rid, None)
            elif item.finish_reason is not None:
                live.pop(rid, None)
            outbox.append((rid, item))
        return sink

    def flush(rows: int) -> None:
        if outbox:
            items = outbox[:]
            del outbox[:len(items)]
            try:
                conn.send(("step", rows, items))
            except OSError:  # the replica is gone; the main thread stops the loop
                pass

    def reply_for(adapter_id: str) -> Callable[[str | None], None]:
        def reply(error: str | None) -> None:  # on the model thread, the connection's only writer then
            try:
                conn.send(("adapter", adapter_id, error))
            except OSError:
                pass
        return reply

    batcher = ContinuousBatcher(model, tokenizer, max_batch_size=init["max_batch_size"], on_step=flush)
    conn.send(("ready", {"device": str(model.device), "pid": os.getpid()}))
    batcher.start()
    stopping = threading.Event()

    def exit_if_the_loop_dies() -> None:
        # A step's Exception fails that step's sequences only; anything else ends the model thread
        # (its open sequences are failed and flushed first). A core without a loop must not keep
        # accepting work: exiting is what the replica sees (EOF) and reports as unhealthy.
        batcher.join()
        if not stopping.is_set():
            logger.error("the model loop stopped: %r; exiting", batcher.failure)
            os._exit(70)

    threading.Thread(target=exit_if_the_loop_dies, name="llm-core-watch", daemon=True).start()
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "add":
                _, rid, prompt_ids, sampling, adapter = msg
                seq = Sequence(rid, list(prompt_ids), sampling, IncrementalDetokenizer(tokenizer, sampling.stop),
                           sink_for(rid), generator=new_generator(model.device, sampling.seed), adapter=adapter)
                live[rid] = seq
                batcher.submit(seq)
            elif msg[0] == "abort":
                aborting = live.get(msg[1])
                if aborting is not None:
                    aborting.aborted = True  # the model thread ends it at its next step
            elif msg[0] in ("load_adapter", "unload_adapter"):
                adapter_id = msg[1]
                batcher.command(AdapterCommand("load" if msg[0] == "load_adapter" else "unload", adapter_id,
                                               msg[2] if len(msg) > 2 else "", reply_for(adapter_id)))
            elif msg[0] == "stop":
                break
    except EOFError:  # the replica is gone
        pass
    finally:
        stopping.set()
        batcher.stop()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the replica decides
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s -- %(message)s")
    conn = Connection(int(sys.argv[1]))
    try:
        _serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    main()
