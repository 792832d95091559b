"""Issue 24's multi-GPU measurements: does throughput scale with GPUs through the whole graph?

    python -m benchmarks.multi_gpu diffusion --gpus 1,2,4,8 [--shapes 512:4:8,1024:30:4]
    python -m benchmarks.multi_gpu llm-dp   --gpus 1,2      [--concurrency 1,8,32]   # Llama-3.1-8B shape
    python -m benchmarks.multi_gpu llm-tp   --tp 2          [--concurrency 1,8,32]   # 70B-class shape, TP 2
    python -m benchmarks.multi_gpu diffusion --tiny --gpus 1,2   # CPU smoke run: fake GPUs, tiny model

diffusion: for each N, a fresh local cluster with N GPUs (ray.init(num_gpus=N): Ray hands out cards
0..N-1), the graph with 2N half-GPU replicas (`num_gpus: 0.5`), a closed loop of image requests at
8 x batch x replicas concurrency; images/s, and scaling efficiency = images/s(N) / (N x images/s(1))
(issue 24 asks >= 0.95 per added GPU). While it runs, the CPU of the proxy, the ingress replicas and
the diffusion replicas is sampled by process title: a tier near 100 % x its CPUs is what saturates
(add ingress replicas with --ingress).
llm-dp: the 8B shape (dummy weights) with 1 and then 2 whole-GPU replicas (data parallel), streamed
chat at each concurrency: tokens/s and TTFT; ratio DP2/DP1 (issue 24 asks >= 1.9).
llm-tp: a 70B-class shape (Llama-3.1-70B config, dummy weights) with tensor_parallel_size 2 in one
replica (the placement group the graph builds from LLMModelConfig): tokens/s and TTFT.

Each result JSON records the machine: GPU model, gpu_count, CPU count, versions. Every process the
benchmark starts gets NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1
(NVLink multicast stays off on the lent machines): os.environ here and every runtime_env.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("GENSERVE_WORK", REPO / ".work")).resolve()
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(MULTICAST_OFF)  # this process and whatever it starts (Ray's raylet, vLLM workers)
PROMPT = "a lighthouse on a cliff at dawn, watercolor"
# meta-llama/Llama-3.1-70B's published config (what `load_format: dummy` fills with random weights).
LLAMA_31_70B = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                    num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072,
                    rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                    rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192, "rope_type": "llama3"})


# ---- the machine -------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    out: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
                           "gpu_count": torch.cuda.device_count() if cuda else 0,
                           "cpu_count": os.cpu_count(), "platform": platform.platform(),
                           "env": {k: os.environ.get(k) for k in MULTICAST_OFF}}
    if cuda:
        out["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    import ray

    out["versions"] = {"torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version()}
    try:
        import vllm

        out["versions"]["vllm"] = vllm.__version__
    except ImportError:
        pass
    return out


class TierCpu:
    """CPU seconds per Serve tier (proxy, ingress, each model) while a run lasts, from process titles
    (Ray names workers `ray::ServeReplica:<app>:<deployment>`, the proxy `ray::ProxyActor`)."""

    TIERS = (("ProxyActor", "proxy"), (":Ingress", "ingress"), (":Diffusion-", "diffusion"), (":LLM-", "llm"))

    def __init__(self, period_s: float = 1.0) -> None:
        self.period_s = period_s
        self._stop = threading.Event()
        self._cpu: dict[int, tuple[str, float]] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tier(self, title: str) -> str | None:
        return next((name for mark, name in self.TIERS if mark in title), None)

    def _sample(self) -> None:
        import psutil

        # Only this benchmark's cluster: ray.init started its raylet as our child, the workers are the
        # raylet's (another cluster on the machine may run the same deployment names).
        for p in psutil.Process().children(recursive=True):
            try:
                title = " ".join(p.cmdline())
                tier = self._tier(title) if title.startswith("ray::") else None
                if tier:
                    t = p.cpu_times()
                    self._cpu[p.pid] = (tier, t.user + t.system)
            except psutil.Error:
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def __enter__(self) -> TierCpu:
        self._sample()
        self._start = dict(self._cpu)
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall_s = time.perf_counter() - self._t0

    def summary(self) -> dict[str, dict[str, float]]:
        """Per tier: processes, and CPU cores busy on average (1.0 = one core all the time)."""
        out: dict[str, dict[str, float]] = {}
        for pid, (tier, cpu) in self._cpu.items():
            used = cpu - self._start.get(pid, (tier, 0.0))[1]
            t = out.setdefault(tier, {"processes": 0, "cores_busy": 0.0, "max_process_cores_busy": 0.0})
            t["processes"] += 1
            t["cores_busy"] += used / self.wall_s
            t["max_process_cores_busy"] = max(t["max_process_cores_busy"], used / self.wall_s)
        return {k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in out.items()}


# ---- one graph on a fresh local cluster ---------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bench_plan() -> dict:
    """A plan with nothing limited: the benchmark measures serving, not tenancy limits."""
    return {"plans": [{"name": "bench", "requests_per_minute": None, "tokens_per_minute": None,
                       "images_per_minute": None, "max_concurrent_requests": None, "max_image_side": None,
                       "max_steps": None, "monthly_budget_usd": None, "priority": 1}], "default_plan": "bench"}


def _env_vars() -> dict[str, str]:
    keep = ("PYTHONPATH", "PATH", "HF_HUB_OFFLINE", "VLLM_USE_FLASHINFER_SAMPLER", "GENSERVE_WORK")
    return {**{k: v for k, v in os.environ.items() if k in keep}, **MULTICAST_OFF}


class Graph:
    """`with Graph(doc, gpus=N) as g:` a local Ray cluster with N GPUs (fake ones on CPU), the app
    deployed and RUNNING, `g.url` and `g.headers` for requests; everything ended on exit."""

    def __init__(self, doc: dict, *, gpus: int, cpus: int | None = None, work: Path) -> None:
        self.doc, self.gpus, self.work = doc, gpus, work
        self.cpus = cpus or max(8, os.cpu_count() or 2)

    def __enter__(self) -> Graph:
        import ray

        from serve_app import launcher

        for attempt in range(3):  # a raylet gets 30 s (hard-coded) to register: an overloaded host misses it
            try:
                ray.init(num_cpus=self.cpus, num_gpus=self.gpus, include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": _env_vars()})
                break
            except Exception as e:
                ray.shutdown()
                if attempt == 2 or "timed out during startup" not in str(e):
                    raise
        t0 = time.perf_counter()
        try:
            launcher.deploy(self.doc)
            launcher.wait_running(self.doc["applications"][0]["name"], timeout_s=1800)
        except BaseException:
            self.__exit__()
            raise
        self.deploy_s = round(time.perf_counter() - t0, 1)
        self.url = f"http://127.0.0.1:{self.doc['http_options']['port']}"
        self.headers = {"Authorization": f"Bearer {(self.work / 'local_api_key').read_text().strip()}"}
        return self

    def __exit__(self, *exc: Any) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _doc(args_: dict, deployments: list[dict], port: int, *, ingress: int) -> dict:
    return {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
            "applications": [{"name": "bench", "route_prefix": "/", "import_path": "serve_app.graph:build_app",
                              "args": args_, "deployments": [
                                  {"name": "Ingress", "num_replicas": ingress, "max_ongoing_requests": 1024,
                                   "ray_actor_options": {"num_cpus": 1}}, *deployments]}]}


# ---- diffusion: images/s with 1..N GPUs ----------------------------------------------------------
def sdxl_dir(tiny: bool) -> Path:
    """The tiny SDXL, or the full-size architecture with random weights (built once, on the GPU)."""
    if tiny:
        from deployments.diffusion.tiny import build_all_tiny

        return build_all_tiny(WORK / "models")["sdxl"]
    from benchmarks.full_models import build_full_sdxl

    return build_full_sdxl(WORK / "models" / "sdxl-full", device="cuda")


def diffusion_doc(a: argparse.Namespace, work: Path, port: int, *, gpus: int, size: int, steps: int,
                  batch: int) -> dict:
    model = a.model or str(sdxl_dir(a.tiny))
    native = 64 if a.tiny else 1024
    args_ = {"work_dir": str(work), "tenancy": _bench_plan(), "diffusion_models": [{
        "name": "bench", "family": "sdxl", "model": model, "dtype": "float32" if a.tiny else "float16",
        "device": "auto", "native_resolution": native, "size_multiple": 8, "min_side": 32, "max_side": 2048,
        "default_steps": steps, "max_steps": 200, "batch_invariant": False,
        "batching": {"max_batch_size": batch, "batch_wait_timeout_s": 0.05,
                     "max_batch_megapixels": batch * max(size, native) ** 2 / 1e6}}]}
    replicas = int(gpus / a.share)
    diffusion = {"name": "Diffusion-bench", "num_replicas": replicas, "max_ongoing_requests": 6 * batch,
                 "max_queued_requests": 4096,
                 "ray_actor_options": {"num_cpus": a.replica_cpus, "num_gpus": a.share}}
    return _doc(args_, [diffusion], port, ingress=a.ingress or max(2, gpus))


def run_diffusion(a: argparse.Namespace) -> dict:
    from benchmarks.loadgen import closed_loop_images

    out: dict[str, Any] = {"share": a.share, "shapes": {}}
    for size, steps, batch in a.shapes:
        points = []
        for gpus in a.gpus:
            work = Path(tempfile.mkdtemp(prefix="gs-mg-"))
            doc = diffusion_doc(a, work, _free_port(), gpus=gpus, size=size, steps=steps, batch=batch)
            replicas = doc["applications"][0]["deployments"][1]["num_replicas"]
            body = {"prompt": PROMPT, "model": "bench", "size": f"{size}x{size}", "steps": steps,
                    "response_format": "url"}
            concurrency = a.concurrency or 8 * batch * replicas
            images = a.images_per_gpu * gpus
            try:
                with Graph(doc, gpus=gpus, work=work) as g:
                    # warm-up: every replica's kernels and batch shape
                    asyncio.run(closed_loop_images(g.url, body, total_requests=2 * batch * replicas,
                                                   concurrency=concurrency, headers=g.headers))
                    with TierCpu() as cpu:
                        res = asyncio.run(closed_loop_images(g.url, body, total_requests=images,
                                                             concurrency=concurrency, headers=g.headers))
                    point = {"gpus": gpus, "replicas": replicas, "ingress": doc["applications"][0]["deployments"][0][
                        "num_replicas"], "concurrency": concurrency, "deploy_s": g.deploy_s, **res.summary(),
                        "cpu_by_tier": cpu.summary()}
            finally:
                shutil.rmtree(work, ignore_errors=True)
            points.append(point)
            print(json.dumps({"shape": f"{size}:{steps}:{batch}", **{k: point[k] for k in (
                "gpus", "replicas", "images_per_s", "errors")}}), flush=True)
        base = next((p["images_per_s"] for p in points if p["gpus"] == 1), None)
        for p in points:
            if base:
                p["scaling_efficiency"] = round(p["images_per_s"] / (p["gpus"] * base), 4)
        out["shapes"][f"{size}x{size}_{steps}steps_batch{batch}"] = points
    return out


# ---- LLM: data parallel and tensor parallel ----------------------------------------------------
def model_dir(shape: str) -> Path:
    """config + tokenizer, no weights (`load_format: dummy`); the tiny model (with weights) on CPU."""
    from benchmarks.llm_vs_vllm import build_model_dir, word_tokenizer

    if shape in ("tiny", "llama-3.1-8b"):
        return build_model_dir(WORK / "models" / f"bench-{shape}", shape)
    out = WORK / "models" / "bench-llama-3.1-70b"
    if not (out / "config.json").exists():
        from transformers import LlamaConfig

        tok = word_tokenizer(LLAMA_31_70B["vocab_size"] - 256)
        LlamaConfig(**LLAMA_31_70B, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id, dtype="bfloat16").save_pretrained(out)
        tok.save_pretrained(out)
    return out


def llm_doc(a: argparse.Namespace, work: Path, port: int, *, shape: str, replicas: int, tp: int) -> dict:
    tiny = shape == "tiny"
    engine_kwargs: dict[str, Any] = {} if tiny else {"load_format": "dummy", "gpu_memory_utilization": 0.90,
                                                     "max_num_seqs": 256}
    model = {"name": "bench-llm", "model": str(model_dir(shape)), "engine": "transformers" if tiny else "vllm",
             "dtype": "float32" if tiny else "bfloat16", "max_model_len": 512 if tiny else 4096,
             "default_max_tokens": a.max_tokens, "stream_interval_ms": 20, "stream_coalesce_above": 16,
             "engine_kwargs": {**engine_kwargs, **a.engine_kwargs}}
    dep: dict[str, Any] = {"name": "LLM-bench-llm", "num_replicas": replicas, "max_ongoing_requests": 256,
                           "max_queued_requests": 1024}
    if tp > 1:
        model |= {"tensor_parallel_size": tp, "placement_strategy": "STRICT_PACK", "replica_cpus": 4}
    else:  # one whole GPU per replica (a fake one on CPU)
        dep["ray_actor_options"] = {"num_cpus": 1 if tiny else 4, "num_gpus": 1}
    args_ = {"work_dir": str(work), "tenancy": _bench_plan(), "llm_models": [model],
             "diffusion_models": [{"name": "img", "family": "sdxl", "model": str(sdxl_dir(True)),
                                   "device": "cpu", "native_resolution": 64, "size_multiple": 8, "min_side": 32, "max_side": 128,
                                   "default_steps": 2, "max_steps": 8}]}
    img = {"name": "Diffusion-img", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0}}
    return _doc(args_, [dep, img], port, ingress=a.ingress or 2)


def run_llm(a: argparse.Namespace, *, shape: str, label: str, replicas: int, tp: int) -> dict:
    from benchmarks.loadgen import chat_request, closed_loop

    work = Path(tempfile.mkdtemp(prefix="gs-mg-llm-"))
    doc = llm_doc(a, work, _free_port(), shape=shape, replicas=replicas, tp=tp)
    body = {"model": "bench-llm", "max_tokens": a.max_tokens, "temperature": 0.0,
            "messages": [{"role": "user", "content": " ".join(f"w{i}" for i in range(a.prompt_words))}]}
    levels = []
    try:
        with Graph(doc, gpus=replicas * tp, work=work) as g:
            asyncio.run(closed_loop(g.url, chat_request(body), total_requests=4, concurrency=4, headers=g.headers))
            for c in a.concurrency:
                with TierCpu() as cpu:
                    res = asyncio.run(closed_loop(g.url, chat_request(body), total_requests=max(c * a.rounds, 4),
                                                  concurrency=c, headers=g.headers))
                levels.append({"concurrency": c, **res.summary(), "cpu_by_tier": cpu.summary()})
                print(json.dumps({"run": label, "concurrency": c, "tokens_per_s": levels[-1].get("tokens_per_s"),
                                  "ttft_p50_s": levels[-1].get("ttft_p50_s"), "errors": res.errors}), flush=True)
            deploy_s = g.deploy_s
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"label": label, "shape": shape, "replicas": replicas, "tensor_parallel_size": tp,
            "gpus": replicas * tp, "deploy_s": deploy_s, "levels": levels}


def run_llm_dp(a: argparse.Namespace) -> dict:
    shape = "tiny" if a.tiny else "llama-3.1-8b"
    runs = [run_llm(a, shape=shape, label=f"dp{n}", replicas=n, tp=1) for n in a.gpus]
    one = next((r for r in runs if r["replicas"] == 1), None)
    ratios = {}
    for r in runs:
        if one and r is not one:
            ratios[f"dp{r['replicas']}_over_dp1"] = {
                str(lv["concurrency"]): round(lv["tokens_per_s"] / base["tokens_per_s"], 4)
                for lv, base in zip(r["levels"], one["levels"], strict=True) if base.get("tokens_per_s")}
    return {"runs": runs, "tokens_per_s_ratio": ratios}


def run_llm_tp(a: argparse.Namespace) -> dict:
    if a.tiny:
        raise SystemExit("llm-tp needs vLLM on GPUs (the transformers engine has no tensor parallelism)")
    return {"runs": [run_llm(a, shape="llama-3.1-70b", label=f"tp{a.tp}", replicas=1, tp=a.tp)]}


# ---- CLI ---------------------------------------------------------------------------------------
def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",")]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["diffusion", "llm-dp", "llm-tp"])
    ap.add_argument("--gpus", type=_ints, default=None, help="GPU counts (diffusion, llm-dp: replica counts)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny models, fake GPUs")
    ap.add_argument("--model", default=None, help="diffusion model dir (default: .work/models/sdxl-full)")
    ap.add_argument("--shapes", type=lambda s: [tuple(_ints(p.replace(":", ","))) for p in s.split(",")],
                    default=None, help="SIZE:STEPS:BATCH,... (diffusion)")
    ap.add_argument("--share", type=float, default=0.5, help="GPU share per diffusion replica")
    ap.add_argument("--replica-cpus", type=float, default=2.0)
    ap.add_argument("--ingress", type=int, default=None, help="ingress replicas (default: max(2, GPUs))")
    ap.add_argument("--images-per-gpu", type=int, default=64)
    ap.add_argument("--concurrency", type=_ints, default=None)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--engine-kwargs", type=json.loads, default={},
                    help='LLM: more vLLM kwargs, e.g. \'{"quantization": "fp8"}\' for the 70B shape on 80 GB cards')
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--prompt-words", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=4, help="LLM: requests per client per level")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--name", default=None)
    a = ap.parse_args(argv)
    a.gpus = a.gpus or ([1, 2] if a.phase == "llm-dp" else [1, 2])
    if a.phase == "diffusion":
        a.shapes = a.shapes or ([(64, 2, 4)] if a.tiny else [(512, 4, 8), (1024, 30, 4)])
        a.concurrency = a.concurrency[0] if a.concurrency else None
    else:
        a.concurrency = a.concurrency or [1, 8, 32]
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    started = time.perf_counter()
    m = machine()
    result: dict[str, Any] = {"benchmark": f"multi_gpu-{a.phase}",
                              "date": datetime.now(UTC).isoformat(timespec="seconds"),
                              "machine": m, "gpu_count": m["gpu_count"], "tiny": a.tiny,
                              "args": {k: v for k, v in vars(a).items() if k not in ("out",)}}
    run = {"diffusion": run_diffusion, "llm-dp": run_llm_dp, "llm-tp": run_llm_tp}[a.phase]
    result[a.phase] = run(a)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    tag = "tiny-cpu" if a.tiny else f"{m['gpu'].replace(' ', '_')}x{m['gpu_count']}"
    a.out.mkdir(parents=True, exist_ok=True)
    out = a.out / f"{a.name or f'multi_gpu-{a.phase}-{tag}'}.json"
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
