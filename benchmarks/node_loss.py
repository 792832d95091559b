"""A whole node lost under load, on a local multi-node Ray cluster: `ray start --head` and
`ray start --address` on this machine, each node in a process group of its own, so SIGKILL of
one group is a machine gone (raylet, replicas, object store at once). `zero_failure.py --phases
node_loss` runs it.

The app runs with production's floors (configs/serve.yaml): every deployment two replicas, at most
one per Ray node (`max_replicas_per_node: 1`), on two worker nodes; Serve's proxy on the head
(`proxy_location: HeadOnly`, standing in for the Kubernetes Service in front of the worker pods).
Mid-load, one worker node is killed and a replacement node joins (KubeRay would create the pod);
clients follow the retry policy. Reported: failed requests (0 expected), lost jobs (0), the time
until Serve saw the loss, and the time until every deployment was back at two replicas on two
live nodes (full capacity)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

APP = "zf"
RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """Ray nodes as `ray start --block` processes, one session (process group) each: ending a group
    ends exactly that node (`ray stop` would end every cluster on the machine)."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env = logs, env
        self.groups: dict[str, subprocess.Popen[bytes]] = {}
        self.temp_dirs: list[Path] = []
        self.address = ""
        self.restarts: list[str] = []

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.logs / f"ray-{name}.log", "ab")  # noqa: SIM115 - lives as long as the node
        # Nodes on one host would share the session dir and collide on its raylet and plasma
        # sockets: each gets a temp dir of its own (short: socket paths stop at ~107 bytes).
        temp = Path(tempfile.mkdtemp(prefix=f"gsn{name}", dir="/tmp"))
        self.temp_dirs.append(temp)
        self.groups[name] = subprocess.Popen([str(RAY) if RAY.exists() else "ray", "start", "--block",
                                              "--disable-usage-stats", f"--temp-dir={temp}", *args], env=self.env,
                                             start_new_session=True, stdout=log, stderr=subprocess.STDOUT)

    def start_head(self) -> str:
        port = _free_port()
        # No CPUs: no replica lands on the head; the Serve controller and proxy need none.
        self._start("head", ["--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
                             "--object-store-memory=100000000"])
        self.address = f"127.0.0.1:{port}"
        return self.address

    def add_node(self, name: str, num_cpus: int) -> None:
        # A custom resource names the node, so a report can say which node holds which replica.
        self._start(name, [f"--address={self.address}", f"--num-cpus={num_cpus}",
                           f"--resources={json.dumps({f'zf_node_{name}': 1})}", "--object-store-memory=100000000"])

    def restart_if_dead(self, name: str, num_cpus: int) -> None:
        """A node whose `ray start` exited before joining is started again, as KubeRay recreates a
        failed pod (on a loaded 2-core machine a raylet has died at start-up waiting for its agents)."""
        proc = self.groups.get(name)
        if proc is not None and proc.poll() is not None:
            # `ray start` gave up (Ray waits 30 s, fixed, for its raylet to register) but may leave
            # that raylet behind: end the whole group before starting the node again.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.groups.pop(name)
            self.restarts.append(name)
            self.add_node(name, num_cpus)

    def kill(self, name: str) -> None:
        """The machine is gone: SIGKILL to the node's whole process group, no goodbye to the GCS."""
        proc = self.groups.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)

    def down(self) -> None:
        for name in [n for n in self.groups if n != "head"] + ["head"]:
            proc = self.groups.pop(name, None)
            if proc is None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # Ray's GCS outlives a SIGTERM'd `ray start`
            except ProcessLookupError:
                pass
        for temp in self.temp_dirs:
            shutil.rmtree(temp, ignore_errors=True)


def node_names() -> dict[str, str]:
    """Ray node id -> our name (from the zf_node_<name> resource), live nodes only."""
    import ray

    out = {}
    for n in ray.nodes():
        if not n["Alive"]:
            continue
        names = [k.removeprefix("zf_node_") for k in n["Resources"] if k.startswith("zf_node_")]
        out[n["NodeID"]] = names[0] if names else "head"
    return out


def replicas_by_node() -> dict[str, list[str]]:
    """Deployment -> the named nodes its ALIVE replica actors run on (live nodes only)."""
    from ray._private import state

    live = node_names()
    out: dict[str, list[str]] = {}
    for actor in state.actors().values():
        name = actor.get("Name") or ""
        if actor.get("State") != "ALIVE" or not name.startswith(f"SERVE_REPLICA::{APP}#"):
            continue
        node = live.get(actor["Address"]["NodeID"])
        if node is not None:
            out.setdefault(name.split("#")[1], []).append(node)
    return {k: sorted(v) for k, v in sorted(out.items())}


def running_replicas() -> dict[str, int]:
    from ray import serve

    app = serve.status().applications.get(APP)
    return {n: d.replica_states.get("RUNNING", 0) for n, d in (app.deployments.items() if app else [])}


def node_loss_doc(base: dict[str, Any]) -> dict[str, Any]:
    """The zero-failure app with production's floors: two replicas of each deployment, one per node.
    One diffusion model (SDXL tiny) and the chat model keep the cluster small on a CPU machine."""
    doc = copy.deepcopy(base)
    doc["proxy_location"] = "HeadOnly"
    app = doc["applications"][0]
    app["args"]["diffusion_models"] = [m for m in app["args"]["diffusion_models"]
                                       if m["name"] == app["args"]["default_image_model"]]
    keep = {"Ingress", f"Diffusion-{app['args']['default_image_model']}",
            *(f"LLM-{m['name']}" for m in app["args"]["llm_models"])}
    app["deployments"] = [d for d in app["deployments"] if d["name"] in keep]
    for d in app["deployments"]:
        d["max_replicas_per_node"] = 1
        d["autoscaling_config"] = {**d.get("autoscaling_config", {}), "min_replicas": 2, "max_replicas": 2}
    return doc


def at_full_capacity(floor: int = 2) -> bool:
    running = running_replicas()
    spread = replicas_by_node()
    return bool(running) and all(n >= floor for n in running.values()) and all(
        len(set(spread.get(d, []))) >= floor for d in running)


def start(base_doc: dict[str, Any], logs: Path, num_cpus: int) -> tuple[LocalCluster, dict[str, Any]]:
    """Head + two worker nodes, the app deployed at its floors, spread over both workers."""
    import ray

    from serve_app import launcher

    repo = Path(__file__).resolve().parent.parent
    # Ray 2.60: the head turns token auth on by itself; nodes joining by address must be told (the
    # token is ~/.ray/auth_token, this machine user's). The driver too, before Ray is imported:
    # `zero_failure.py` sets it.
    if os.environ.get("RAY_AUTH_MODE") != "token":
        raise RuntimeError("set RAY_AUTH_MODE=token before importing ray (a token-auth cluster)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p),
           # A node's raylet waits for its agents to start (their port files) and dies past the
           # timeout: on a loaded 2-core machine the replacement node's agent took longer than that.
           "RAY_raylet_start_wait_time_s": os.environ.get("RAY_raylet_start_wait_time_s", "300"),
           "RAY_agent_register_timeout_ms": os.environ.get("RAY_agent_register_timeout_ms", "300000")}
    cluster = LocalCluster(logs, env)
    try:
        address = cluster.start_head()
        for name in ("a", "b"):
            cluster.add_node(name, num_cpus)
        for _ in range(120):
            try:
                ray.init(address=address, log_to_driver=False)
                break
            except Exception:  # noqa: BLE001 - the head is still starting
                time.sleep(1)
        deadline = time.monotonic() + 300
        while set(node_names().values()) != {"head", "a", "b"}:
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker nodes did not join: {node_names()}")
            for name in ("a", "b"):
                cluster.restart_if_dead(name, num_cpus)
            time.sleep(0.5)
        doc = node_loss_doc(base_doc)
        launcher.deploy(doc)
        launcher.wait_running(APP, timeout_s=600)
        deadline = time.monotonic() + 120
        while not at_full_capacity():
            if time.monotonic() > deadline:
                raise TimeoutError(f"floors not spread over two nodes: {replicas_by_node()}")
            time.sleep(0.5)
        return cluster, doc
    except BaseException:
        cluster.down()
        raise


async def lose_a_node(cluster: LocalCluster, num_cpus: int, replacement_delay_s: float,
                      timeout_s: float = 600.0) -> dict[str, Any]:
    """Kill worker node b (with its replica of every deployment); a replacement node c joins after
    `replacement_delay_s`. Returns when every deployment is back at two replicas on two live nodes."""
    import asyncio

    before = replicas_by_node()
    lost = {d: nodes.count("b") for d, nodes in before.items()}
    t0 = time.monotonic()
    cluster.kill("b")
    await asyncio.sleep(replacement_delay_s)
    cluster.add_node("c", num_cpus)
    detected_s = full_s = None
    while time.monotonic() - t0 < timeout_s:
        cluster.restart_if_dead("c", num_cpus)
        running = await asyncio.to_thread(running_replicas)
        if detected_s is None and any(n < 2 for n in running.values()):
            detected_s = round(time.monotonic() - t0, 1)
        if detected_s is not None and await asyncio.to_thread(at_full_capacity):
            full_s = round(time.monotonic() - t0, 1)
            break
        await asyncio.sleep(0.5)
    return {"killed_node": "b", "replicas_lost": lost, "replicas_before": before,
            "replicas_after": await asyncio.to_thread(replicas_by_node),
            "replacement_node_after_s": replacement_delay_s, "node_restarts": list(cluster.restarts),
            "loss_seen_by_serve_s": detected_s,
            "time_to_full_capacity_s": full_s}
