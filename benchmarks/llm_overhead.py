"""Tokens/s and time-to-first-token: the LLM engine called directly vs through Serve (HTTP proxy →
ingress with the real chat router → LLM deployment, streamed SSE), same model, same machine, one run.

    python -m benchmarks.llm_overhead --engine transformers --concurrency 1,4 --requests 4 --rounds 3

Direct: `LLMServer.stream` in this process (templating, token counting and the engine, no Ray).
Serve: the app's real ingress (auth, admission, metering) in front of `LLMDeployment`, over HTTP
through Serve's proxy (or HAProxy: run with RAY_SERVE_ENABLE_HA_PROXY=1, recorded in `serve_env`).
Both sides stay up and alternate rounds; ratios are of the rounds' medians, each round's ratio is
kept too. The serve side records the ingress's `Server-Timing` phases.
Writes benchmarks/results/llm_overhead-<engine>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("GENSERVE_WORK", REPO / ".work")).resolve()
BENCH_WORK = WORK / "llm-bench"  # the benchmark app's own DB and local key
MESSAGES = ({"role": "user", "content": "a lighthouse on a cliff at dawn, oil painting"},)


def _summary(ttfts: list[float], tokens: int, wall: float, first_events: list[float] | None = None) -> dict[str, Any]:
    ttfts = sorted(ttfts)
    extra = {"first_event_ms_p50": round(1000 * statistics.median(first_events), 1)} if first_events else {}
    return {**extra,
        "requests": len(ttfts),
        "completion_tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_ms_p50": round(1000 * statistics.median(ttfts), 1),
        "ttft_ms_p90": round(1000 * ttfts[int(0.9 * (len(ttfts) - 1))], 1),
    }


async def _run_concurrent(one, n: int, concurrency: int) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """`n` requests from `concurrency` closed-loop clients (after one warm-up request)."""
    sem = asyncio.Semaphore(concurrency)

    async def guarded(i: int) -> tuple:
        async with sem:
            return await one(i)

    await one(-1)  # warm-up, not counted
    t0 = time.perf_counter()
    results = await asyncio.gather(*(guarded(i) for i in range(n)))
    wall = time.perf_counter() - t0
    firsts = [r[2] for r in results if len(r) > 2]
    out = _summary([r[0] for r in results], sum(r[1] for r in results), wall, firsts)
    phases = [r[3] for r in results if len(r) > 3 and r[3]]
    if phases:  # the ingress's Server-Timing, p50 per phase
        out["server_timing_ms_p50"] = {k: round(statistics.median(p[k] for p in phases if k in p), 2)
                                       for k in phases[0]}
    return out


def _pooled(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One side over its interleaved rounds: median tokens/s and TTFT of the rounds, and each round."""
    out: dict[str, Any] = {
        "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rounds), 1),
        "ttft_ms_p50": round(statistics.median(r["ttft_ms_p50"] for r in rounds), 1),
        "ttft_ms_p90": round(statistics.median(r["ttft_ms_p90"] for r in rounds), 1),
        "requests": sum(r["requests"] for r in rounds),
        "rounds": rounds,
    }
    for key in ("first_event_ms_p50",):
        if key in rounds[0]:
            out[key] = round(statistics.median(r[key] for r in rounds), 1)
    if "server_timing_ms_p50" in rounds[0]:
        names = rounds[0]["server_timing_ms_p50"]
        out["server_timing_ms_p50"] = {k: round(statistics.median(r["server_timing_ms_p50"][k] for r in rounds), 2)
                                       for k in names}
    return out


def _direct_one(server, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from deployments.llm.types import ChoiceDelta, GenerationRequest

    async def one(i: int) -> tuple[float, int]:
        req = GenerationRequest(request_id=f"d{i}-{time.perf_counter_ns()}", messages=MESSAGES,
                                max_tokens=args.max_tokens, temperature=1.0, seed=max(i, 0), ignore_eos=True)
        t0, ttft, tokens = time.perf_counter(), None, 0
        async for item in server.stream(req):
            if isinstance(item, ChoiceDelta):
                tokens += item.num_tokens
                if ttft is None and item.num_tokens:
                    ttft = time.perf_counter() - t0
        return ttft or 0.0, tokens

    return one


def _parse_server_timing(header: str | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in (header or "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out


def _serve_one(client, url: str, model_cfg: dict, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    async def one(i: int) -> tuple[float, int, float, dict[str, float]]:
        body = {"model": model_cfg["name"], "messages": list(MESSAGES), "max_tokens": args.max_tokens,
                "temperature": 1.0, "seed": max(i, 0), "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        t0, ttft, first_event, tokens = time.perf_counter(), None, None, 0
        async with client.stream("POST", url, json=body) as resp:
            resp.raise_for_status()
            phases = _parse_server_timing(resp.headers.get("server-timing"))
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if first_event is None:  # the role chunk: sent once the replica said Started
                    first_event = time.perf_counter() - t0
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - t0
        return ttft or 0.0, tokens, first_event or 0.0, phases

    return one


def build_chat_app(model_cfg: dict, port: int, stream_ms: float, admission_overlap: bool = True):  # type: ignore[no-untyped-def]
    """The app's real ingress (auth, admission and metering, every router) in front of the real LLM
    deployment; only the diffusion deployments are left out."""
    from fastapi import FastAPI
    from ray import serve

    from deployments.llm.config import LLMModelConfig
    from deployments.llm.deployment import LLMDeployment

    @serve.deployment(name="Ingress", max_ongoing_requests=256)
    @serve.ingress()
    class ChatIngress:
        def __init__(self, config: dict, llm: dict) -> None:
            from serve_app.config import load_app_config
            from serve_app.ingress import build_services

            self.services = build_services(load_app_config(config), {}, llm)

        def __serve_build_asgi_app__(self) -> FastAPI:
            from serve_app.app import create_app

            return create_app(self.services)

    config = {"work_dir": str(BENCH_WORK), "diffusion_models": [{"name": "unused", "family": "sdxl", "model": "unused"}],
              "llm_models": [model_cfg], "tenancy": {"admission_overlap": admission_overlap}}
    name = model_cfg["name"]
    import torch

    gpu = {"num_gpus": 1} if torch.cuda.is_available() else {}
    llm = LLMDeployment.options(name=f"LLM-{name}", ray_actor_options=gpu).bind(
        LLMModelConfig.model_validate({**model_cfg, "stream_interval_ms": stream_ms}), work_dir=WORK)
    return ChatIngress.bind(config, {name: llm})


async def bench_interleaved(model_cfg: dict, args: argparse.Namespace) -> dict[str, Any]:
    """Both sides live at once: the engine in this process and the Serve app; per stream interval
    and concurrency, `--rounds` alternating rounds (direct, serve, direct, ...), so drifting clocks
    or a noisy neighbour hit both sides alike."""
    import httpx
    import ray
    from ray import serve

    from deployments.llm.config import LLMModelConfig
    from deployments.llm.server import LLMServer

    os.environ.setdefault("RAY_TMPDIR", str(WORK / "ray-llm"))
    import torch

    server = LLMServer(LLMModelConfig.model_validate(model_cfg), work_dir=WORK)
    await server.start()
    ray.init(num_cpus=args.ray_cpus, num_gpus=1 if torch.cuda.is_available() else 0, include_dashboard=False,
             log_to_driver=False,
             # Keep the caller's PYTHONPATH (on the GPU host Ray itself lives there).
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                 p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p), "GENSERVE_WORK": str(WORK)}})
    runs: list[dict[str, Any]] = []
    batches: dict[str, Any] = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        url = f"http://127.0.0.1:{args.port}/v1/chat/completions"
        for stream_ms in args.stream_ms:
            t0 = time.perf_counter()
            serve.run(build_chat_app(model_cfg, args.port, stream_ms, args.admission_overlap == "on"),
                      name="llm-bench", route_prefix="/")
            deploy_s = time.perf_counter() - t0
            key = (BENCH_WORK / "local_api_key").read_text().strip()
            async with httpx.AsyncClient(timeout=300, headers={"Authorization": f"Bearer {key}"}) as client:
                direct_one, serve_one = _direct_one(server, args), _serve_one(client, url, model_cfg, args)
                for c in args.concurrency:
                    sides: dict[str, list] = {"direct": [], "serve": []}
                    for _ in range(args.rounds):
                        sides["direct"].append(await _run_concurrent(direct_one, args.requests * c, c))
                        sides["serve"].append(await _run_concurrent(serve_one, args.requests * c, c))
                    d, sv = _pooled(sides["direct"]), _pooled(sides["serve"])
                    runs.append({"concurrency": c, "stream_interval_ms": stream_ms, "deploy_s": round(deploy_s, 1),
                                 "direct": d, "serve": sv, "serve_vs_direct": {
                                     "tokens_per_s_ratio": round(sv["tokens_per_s"] / d["tokens_per_s"], 3),
                                     "round_ratios": [round(b["tokens_per_s"] / a["tokens_per_s"], 3)
                                                      for a, b in zip(sides["direct"], sides["serve"], strict=False)],
                                     "ttft_p50_added_ms": round(sv["ttft_ms_p50"] - d["ttft_ms_p50"], 1)}})
                    print(json.dumps(runs[-1]["serve_vs_direct"] | {"c": c, "ms": stream_ms}), flush=True)
            stats = await serve.get_deployment_handle(f"LLM-{model_cfg['name']}", app_name="llm-bench").stats.remote()
            batches[f"serve_{stream_ms:g}ms"] = stats.get("recent_batch_sizes")
        batches["direct"] = server.stats().get("recent_batch_sizes")
        return {"runs": runs, "engine_batches": batches}
    finally:
        serve.shutdown()
        ray.shutdown()
        await server.shutdown()


def build_full_llm(out_dir: Path) -> Path:
    """TinyLlama-1.1B's shapes with random weights and the tiny model's offline tokenizer (its
    vocabulary is small; the 22 decoder layers are what cost the time)."""
    if (out_dir / "config.json").exists():
        return out_dir
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from deployments.llm.tiny import build_tiny_llm

    tiny = build_tiny_llm(WORK / "models" / "llm-tiny")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).half().eval()
    model.generation_config.eos_token_id = None  # random weights: generate the full max_tokens
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    p.add_argument("--requests", type=int, default=4, help="requests per client (per concurrency level)")
    p.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 4],
                   help="comma-separated concurrency levels, each measured on both sides")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--stream-ms", type=lambda v: [float(x) for x in v.split(",")], default=[50.0],
                   help="stream coalescing intervals of the LLM deployment, each measured")
    p.add_argument("--rounds", type=int, default=3, help="alternating direct/serve rounds per level")
    p.add_argument("--scheduler", choices=["continuous", "static"], default=None,
                   help="the transformers engine's scheduler (default: the engine's own default)")
    p.add_argument("--switch-interval-ms", type=float, default=None,
                   help="the transformers engine's gil_switch_interval_ms (default: Python's 5 ms)")
    p.add_argument("--engine-process", action="store_true",
                   help="the transformers engine's model loop in its own process (engine_process: true)")
    p.add_argument("--admission-overlap", choices=["on", "off"], default="on",
                   help="streamed requests start on the LLM replica while admission runs (tenancy.admission_overlap)")
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--full", action="store_true", help="a 1.1B Llama architecture (TinyLlama shapes), random, on GPU")
    args = p.parse_args()

    from deployments.llm.tiny import build_tiny_llm

    if args.full:
        model = build_full_llm(WORK / "models" / "llm-1b")
        model_cfg = {"name": "llm-1b", "model": str(model), "engine": args.engine, "dtype": "float16",
                     "max_model_len": 2048}
    else:
        model = build_tiny_llm(WORK / "models" / "llm-tiny")
        model_cfg = {"name": "tiny-chat", "model": str(model), "engine": args.engine, "dtype": "float32",
                     "max_model_len": 512}
    kwargs = {"scheduler": args.scheduler, "gil_switch_interval_ms": args.switch_interval_ms,
              "engine_process": args.engine_process or None}
    model_cfg["engine_kwargs"] = {k: v for k, v in kwargs.items() if v is not None}
    measured = asyncio.run(bench_interleaved(model_cfg, args))
    result = {
        "benchmark": "llm_overhead",
        "engine": args.engine,
        "model": "1.1B Llama architecture, random weights, fp16" if args.full else
                 "tiny random-weight Llama (deployments/llm/tiny.py)",
        "host": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "device": _device_name(),
        "serve_env": {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")},
        "params": {k: v for k, v in vars(args).items() if k != "out"},
        **measured,
    }
    out = args.out or REPO / "benchmarks" / "results" / f"llm_overhead-{args.engine}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    try:  # the plot is optional where matplotlib is not installed (GPU hosts)
        from benchmarks.plot import llm_overhead as plot_llm_overhead
    except ImportError:
        plot_llm_overhead = None
    if plot_llm_overhead is not None:
        front = "HAProxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "Serve proxy"
        plot_llm_overhead([(front, result)], out.with_suffix(".png"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
