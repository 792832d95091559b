"""genserve's diffusion benchmarks, each comparison measured side by side in ONE run.

    python -m benchmarks.serving_suite --phases raw,serve,fractional,optimize [--tiny --device cpu]

Phases (each writes its part of one JSON file under --out):
  raw         batching curve of the raw diffusers pipeline: images/s, batch latency p50/p95 and
              peak GPU memory per (resolution, steps, batch size).
  serve       the same pipeline behind the whole Serve graph over HTTP (API key auth, prompt
              rendering, @serve.batch, PNG encoding, result storage: response_format=url) vs the
              raw pipeline at the same batch size, raw measured before and after; cold start
              (deploy → first image) and GPU utilisation while serving.
  fractional  two replicas at num_gpus 0.5 vs one replica at num_gpus 1.0, same load; GPU idle.
  optimize    eager vs the optimized engine (torch.compile, channels-last, fused QKV) at the
              large size: images/s, compile time, fidelity on the same seeds (PSNR, max |Δ|).
  curve       batching curve THROUGH the graph: max_batch_size changed in place by `serve deploy`,
              images/s, p95 and the replica's memory probe per batch size; an oversize image → 422.
  memory      peak GPU memory and images/s with the VAE decoding whole batches vs one image at a time.
  wuerstchen  the Würstchen v2 architecture through genserve's engine: images/s, peak memory per batch.

`--tiny --device cpu` runs the same code on the tiny CPU models (the CI smoke test); only the
ratios measured in one run, on one machine, mean anything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a lighthouse on a cliff at dawn, watercolor, soft light"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class GpuSampler:
    """Samples GPU utilisation with nvidia-smi while a phase runs (idle = samples at 0 %)."""

    def __init__(self, period_ms: int = 200) -> None:
        self.period_ms = period_ms
        self.samples: list[float] = []
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 f"-lms={self.period_ms}"], stdout=subprocess.PIPE, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                self.samples.append(float(line.strip().split(",")[0]))
            except ValueError:
                pass

    def __exit__(self, *exc: Any) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=5)

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        return {"mean_util_pct": round(statistics.mean(self.samples), 1),
                "idle_fraction": round(sum(s == 0 for s in self.samples) / len(self.samples), 3),
                "samples": len(self.samples)}


# -- models -----------------------------------------------------------------------------------


def model_dir(args: argparse.Namespace) -> Path:
    if args.tiny:
        from deployments.diffusion.tiny import build_all_tiny

        return build_all_tiny(args.models)["sdxl"]
    from benchmarks.full_models import build_full_sdxl

    return build_full_sdxl(args.models / "sdxl-full", device=args.device)


def load_raw(path: Path, device: str, dtype: str, *, vae_slicing: bool = True):
    """The plain diffusers pipeline; VAE slicing as the engine's default (`vae_slicing: true`), so
    raw and graph decode the same way."""
    from deployments.diffusion.loading import load_pipeline

    pipe = load_pipeline(str(path), "sdxl", dtype=dtype, device=device)
    if vae_slicing:
        pipe.vae.enable_slicing()
    return pipe


def raw_batch(pipe, *, batch: int, size: int, steps: int, seed0: int = 0, guidance: float = 5.0):
    gens = [torch.Generator("cpu").manual_seed(seed0 + i) for i in range(batch)]
    return pipe(prompt=[PROMPT] * batch, height=size, width=size, num_inference_steps=steps,
                guidance_scale=guidance, generator=gens, output_type="pil").images


def time_raw(pipe, device: str, *, batch: int, size: int, steps: int, reps: int) -> dict:
    raw_batch(pipe, batch=batch, size=size, steps=steps)  # warm-up (kernels, allocator)
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    lat = []
    for r in range(reps):
        t0 = time.perf_counter()
        raw_batch(pipe, batch=batch, size=size, steps=steps, seed0=100 * r)
        _sync(device)
        lat.append(time.perf_counter() - t0)
    total = sum(lat)
    out = {"batch": batch, "size": size, "steps": steps, "reps": reps, "images_per_s": round(batch * reps / total, 4),
           "batch_p50_s": round(float(np.percentile(lat, 50)), 4), "batch_p95_s": round(float(np.percentile(lat, 95)), 4)}
    if device == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


# -- phases -----------------------------------------------------------------------------------


def phase_raw(args: argparse.Namespace, path: Path) -> dict:
    pipe = load_raw(path, args.device, args.dtype)
    curve = []
    for size, steps in args.curve:
        for b in args.batches:
            reps = max(1, args.raw_images // (b * max(1, steps // 4)))
            reps = min(reps, args.max_reps)
            try:
                curve.append(time_raw(pipe, args.device, batch=b, size=size, steps=steps, reps=reps))
            except torch.cuda.OutOfMemoryError:
                curve.append({"batch": b, "size": size, "steps": steps, "error": "CUDA out of memory"})
                torch.cuda.empty_cache()
            print("raw", curve[-1], flush=True)
    del pipe
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return {"curve": curve}


def _serve_doc(path: Path, work: Path, *, port: int, batch: int, size: int, steps: int, device: str, dtype: str,
               replicas: int, num_gpus: float, tiny: bool, env: dict | None = None, native: int | None = None,
               user_config: dict | None = None) -> dict:
    native = native or (64 if tiny else 1024)
    args = {
        "work_dir": str(work),
        "diffusion_models": [{
            "name": "bench", "family": "sdxl", "model": str(path), "dtype": dtype, "device": device,
            "native_resolution": native, "size_multiple": 8, "min_side": 32, "max_side": 2048,
            "default_steps": steps, "max_steps": 200, "batch_invariant": False,
            "batching": {"max_batch_size": batch, "batch_wait_timeout_s": 0.05,
                         "max_batch_megapixels": batch * max(size, native) ** 2 / 1e6},
        }],
        "tenancy": {"plans": [{"name": "bench", "requests_per_minute": None, "tokens_per_minute": None,
                               "images_per_minute": None, "max_concurrent_requests": None, "max_image_side": None,
                               "max_steps": None, "monthly_budget_usd": None, "priority": 1}],
                    "default_plan": "bench"},
    }
    actor: dict[str, Any] = {"num_cpus": 1}
    if env:
        actor["runtime_env"] = {"env_vars": env}
    if device == "cuda":
        actor["num_gpus"] = num_gpus
    return {
        "proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "bench", "route_prefix": "/", "import_path": "serve_app.graph:build_app", "args": args,
            "deployments": [
                {"name": "Ingress", "num_replicas": 2, "max_ongoing_requests": 1024,
                 "ray_actor_options": {"num_cpus": 1}},
                # Room for a batch running, one gathering and one finishing (PNG + return): below
                # that, batches stop filling (measured: 3x batch gave a mean batch of 5.3 of 8).
                {"name": "Diffusion-bench", "num_replicas": replicas, "max_ongoing_requests": 6 * batch,
                 "max_queued_requests": 4096, "ray_actor_options": actor,
                 **({"user_config": user_config} if user_config else {})},
            ],
        }],
    }


def _ray_init(args: argparse.Namespace) -> None:
    """A local cluster for one graph run; workers keep the caller's PYTHONPATH (on the GPU host
    Ray itself lives there)."""
    import ray

    ray.init(num_cpus=max(8, os.cpu_count() or 2), num_gpus=1 if args.device == "cuda" else 0,
             include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "PATH")}})


def run_graph(args: argparse.Namespace, path: Path, *, batch: int, size: int, steps: int, replicas: int,
              num_gpus: float, images: int, label: str, env: dict | None = None) -> dict:
    import ray
    from ray import serve

    from benchmarks.loadgen import closed_loop_images
    from serve_app import launcher

    work = Path(tempfile.mkdtemp(prefix=f"gs-{label}-"))
    port = _free_port()
    doc = _serve_doc(path, work, port=port, batch=batch, size=size, steps=steps, device=args.device,
                     dtype=args.dtype, replicas=replicas, num_gpus=num_gpus, tiny=args.tiny, env=env)
    _ray_init(args)
    try:
        t0 = time.perf_counter()
        launcher.deploy(doc)
        launcher.wait_running("bench", timeout_s=900)
        running_s = time.perf_counter() - t0
        key = (work / "local_api_key").read_text().strip()
        url = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {key}"}
        body = {"prompt": PROMPT, "model": "bench", "size": f"{size}x{size}", "steps": steps, "response_format": "url"}
        first = asyncio.run(closed_loop_images(url, body, total_requests=1, concurrency=1, headers=headers))
        cold_start_s = time.perf_counter() - t0
        concurrency = args.concurrency or 8 * batch * replicas
        asyncio.run(closed_loop_images(url, body, total_requests=2 * batch * replicas, concurrency=concurrency,
                                       headers=headers))  # warm-up: every replica's kernels and batch shape
        with GpuSampler() as gpu:
            res = asyncio.run(closed_loop_images(url, body, total_requests=images, concurrency=concurrency,
                                                 headers=headers))
        stats = serve.get_deployment_handle("Diffusion-bench", app_name="bench").stats.remote().result()
        out = {"label": label, "replicas": replicas, "num_gpus": num_gpus, "batch": batch, "size": size,
               "steps": steps, "concurrency": concurrency, **res.summary(),
               "deploy_to_running_s": round(running_s, 2), "cold_start_first_image_s": round(cold_start_s, 2),
               "first_request_s": round(first.wall_s, 3), "model_load_s_one_replica": round(stats["load_s"], 2),
               "gpu": gpu.summary()}
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(label, out, flush=True)
    return out


def phase_serve(args: argparse.Namespace, path: Path) -> dict:
    size, steps = args.serve_shape
    batch = args.serve_batch
    reps = max(1, args.serve_images // batch)
    pipe = load_raw(path, args.device, args.dtype)
    with GpuSampler() as g1:
        before = time_raw(pipe, args.device, batch=batch, size=size, steps=steps, reps=reps)
    del pipe
    if args.device == "cuda":
        torch.cuda.empty_cache()
    graph = run_graph(args, path, batch=batch, size=size, steps=steps, replicas=1, num_gpus=1.0,
                      images=args.serve_images, label="graph_1x1.0")
    extra = {}
    if args.diagnose:
        # Same graph with the denoising loop run on the replica's event-loop thread (nothing else
        # in that process runs meanwhile): isolates GIL contention inside the replica.
        extra["graph_denoise_on_loop"] = run_graph(
            args, path, batch=batch, size=size, steps=steps, replicas=1, num_gpus=1.0, images=args.serve_images,
            label="graph_1x1.0_denoise_on_loop", env={"GENSERVE_DENOISE_ON_LOOP": "1"})
    pipe = load_raw(path, args.device, args.dtype)
    after = time_raw(pipe, args.device, batch=batch, size=size, steps=steps, reps=reps)
    del pipe
    raw_ips = statistics.mean([before["images_per_s"], after["images_per_s"]])
    return {"raw_before": {**before, "gpu": g1.summary()}, "raw_after": after, "graph": graph, **extra,
            "ratio_graph_over_raw": round(graph["images_per_s"] / raw_ips, 4),
            **{f"ratio_{k}_over_raw": round(v["images_per_s"] / raw_ips, 4) for k, v in extra.items()}}


def phase_fractional(args: argparse.Namespace, path: Path) -> dict:
    size, steps = args.serve_shape
    batch = args.serve_batch
    one = run_graph(args, path, batch=batch, size=size, steps=steps, replicas=1, num_gpus=1.0,
                    images=args.serve_images, label="graph_1x1.0")
    two = run_graph(args, path, batch=batch, size=size, steps=steps, replicas=2, num_gpus=0.5,
                    images=args.serve_images, label="graph_2x0.5")
    return {"one_full": one, "two_half": two, "ratio_two_half_over_one": round(two["images_per_s"] / one["images_per_s"], 4)}


def phase_curve(args: argparse.Namespace, path: Path) -> dict:
    """Batching curve through the whole graph: one deployment per (size, steps), `max_batch_size`
    changed in place by `serve deploy` (user_config), images/s and request p95 per batch size, and
    the replica's own memory probe (peak GPU memory of a full batch of that shape) at each size."""
    import ray
    from ray import serve

    from benchmarks.loadgen import closed_loop_images
    from serve_app import launcher

    out: dict[str, Any] = {"points": [], "oversize": []}
    for size, steps in args.curve:
        work = Path(tempfile.mkdtemp(prefix="gs-curve-"))
        port = _free_port()
        mp = size * size / 1e6

        def doc(b: int) -> dict:
            # Only user_config changes between points (app args fixed at the largest batch).
            return _serve_doc(path, work, port=port, batch=max(args.batches), size=size, steps=steps, device=args.device,
                              dtype=args.dtype, replicas=1, num_gpus=1.0, tiny=args.tiny, native=size,
                              user_config={"max_batch_size": b, "batch_wait_timeout_s": 0.05,
                                           "max_batch_megapixels": b * mp})

        _ray_init(args)
        try:
            launcher.deploy(doc(args.batches[0]))
            launcher.wait_running("bench", timeout_s=900)
            key = (work / "local_api_key").read_text().strip()
            url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
            body = {"prompt": PROMPT, "model": "bench", "size": f"{size}x{size}", "steps": steps,
                    "response_format": "url"}
            handle = serve.get_deployment_handle("Diffusion-bench", app_name="bench")
            for b in args.batches:
                t0 = time.perf_counter()
                launcher.deploy(doc(b))  # user_config only: the replica is reconfigured, not replaced
                while handle.stats.remote().result()["max_batch_size"] != b:
                    time.sleep(0.5)
                reconfigure_s = time.perf_counter() - t0
                images = max(2 * b, args.curve_images if size <= 512 else args.curve_images // 8)
                asyncio.run(closed_loop_images(url, body, total_requests=b, concurrency=b, headers=headers))
                with GpuSampler() as gpu:
                    res = asyncio.run(closed_loop_images(url, body, total_requests=images, concurrency=2 * b,
                                                         headers=headers))
                stats = handle.stats.remote().result()
                probe = stats.get("memory_probe") or {}
                point = {"size": size, "steps": steps, "max_batch_size": b, "concurrency": 2 * b, **res.summary(),
                         "reconfigure_s": round(reconfigure_s, 2), "gpu": gpu.summary(),
                         "memory_probe": probe.get("shapes"), "memory_cap_gib": probe.get("cap_gib")}
                out["points"].append(point)
                print("curve", point, flush=True)
            # An image larger than the replica's whole budget is refused before it reaches the GPU.
            import httpx

            big = max(2048, size * 2)
            r = httpx.post(f"{url}/v1/images/generations", headers=headers, timeout=60,
                           json={**body, "size": f"{big}x{big}"})
            out["oversize"].append({"size": f"{big}x{big}", "budget_mp": round(args.batches[-1] * mp, 3),
                                    "status": r.status_code, "code": r.json().get("error", {}).get("code")})
        finally:
            serve.shutdown()
            ray.shutdown()
            shutil.rmtree(work, ignore_errors=True)
    return out


def phase_memory(args: argparse.Namespace, path: Path) -> dict:
    """Peak GPU memory with the VAE decoding the whole batch vs one image at a time (vae_slicing),
    and what slicing costs in images/s, raw pipeline, same process."""
    pipe = load_raw(path, args.device, args.dtype)
    out: dict[str, Any] = {"rows": []}
    for size, steps, batch in args.memory_shapes:
        for slicing in (False, True):
            if slicing:
                pipe.vae.enable_slicing()
            else:
                pipe.vae.disable_slicing()
            try:
                row = time_raw(pipe, args.device, batch=batch, size=size, steps=steps, reps=args.memory_reps)
            except torch.cuda.OutOfMemoryError:
                row = {"batch": batch, "size": size, "steps": steps, "error": "CUDA out of memory"}
                torch.cuda.empty_cache()
            row["vae_slicing"] = slicing
            out["rows"].append(row)
            print("memory", row, flush=True)
    del pipe
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return out


def phase_wuerstchen(args: argparse.Namespace, path: Path) -> dict:
    """Würstchen v2 architecture (random weights) through genserve's engine: images/s vs batch size."""
    from benchmarks.full_models import build_full_wuerstchen
    from deployments.diffusion.engine import DiffusionEngine
    from deployments.diffusion.types import ImageTask

    wpath = build_full_wuerstchen(args.models / "wuerstchen-full", device=args.device)
    engine = DiffusionEngine.from_pretrained("wuerstchen", str(wpath), "wuerstchen", dtype=args.dtype,
                                             device=args.device, decoder_steps=args.wuerstchen_decoder_steps)
    size, steps = args.wuerstchen_shape
    rows = []
    for b in args.wuerstchen_batches:
        tasks = [ImageTask(prompt=PROMPT, negative_prompt="", seed=i, width=size, height=size, steps=steps,
                           guidance_scale=4.0) for i in range(b)]
        engine.generate_images(tasks)  # warm-up
        _sync(args.device)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        lat = []
        for _ in range(args.wuerstchen_reps):
            t0 = time.perf_counter()
            out = engine.generate_images(tasks)
            _sync(args.device)
            lat.append(time.perf_counter() - t0)
            if any(isinstance(o, Exception) for o in out):
                raise next(o for o in out if isinstance(o, Exception))
        row = {"batch": b, "size": size, "prior_steps": steps, "decoder_steps": args.wuerstchen_decoder_steps,
               "images_per_s": round(b * len(lat) / sum(lat), 4), "batch_p50_s": round(statistics.median(lat), 4)}
        if args.device == "cuda":
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        rows.append(row)
        print("wuerstchen", row, flush=True)
    return {"rows": rows}


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def phase_optimize(args: argparse.Namespace, path: Path) -> dict:
    from deployments.diffusion.config import OptimizeConfig
    from deployments.diffusion.optimize import apply as apply_optimizations

    size, steps = args.optimize_shape
    batch = args.optimize_batch
    reps = args.optimize_reps
    pipe = load_raw(path, args.device, args.dtype)
    eager = time_raw(pipe, args.device, batch=batch, size=size, steps=steps, reps=reps)
    ref = [np.asarray(im) for im in raw_batch(pipe, batch=batch, size=size, steps=steps, seed0=7)]
    results: dict[str, Any] = {"eager": eager, "variants": []}
    for spec in args.optimize_variants:
        opts = OptimizeConfig(**spec)
        del pipe
        if args.device == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
        pipe = apply_optimizations(load_raw(path, args.device, args.dtype), "sdxl", opts)
        t0 = time.perf_counter()
        raw_batch(pipe, batch=batch, size=size, steps=steps)  # compiles
        _sync(args.device)
        compile_s = time.perf_counter() - t0
        timed = time_raw(pipe, args.device, batch=batch, size=size, steps=steps, reps=reps)
        imgs = [np.asarray(im) for im in raw_batch(pipe, batch=batch, size=size, steps=steps, seed0=7)]
        fidelity = {"psnr_db_min": round(min(_psnr(a, b) for a, b in zip(ref, imgs, strict=False)), 2),
                    "max_abs_diff": int(max(np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(ref, imgs, strict=False)))}
        v = {"options": spec, "first_call_s": round(compile_s, 1), **timed, "fidelity": fidelity,
             "speedup_over_eager": round(timed["images_per_s"] / eager["images_per_s"], 3)}
        results["variants"].append(v)
        print("optimize", v, flush=True)
    return results


def _pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in p.split(":")) for p in text.split(",")]  # type: ignore[misc]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", default="raw,serve,fractional,optimize")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--tiny", action="store_true", help="tiny random models (CPU smoke run)")
    ap.add_argument("--models", type=Path, default=Path(os.environ.get("GENSERVE_WORK", REPO / ".work")) / "models")
    ap.add_argument("--curve", type=_pairs, default=None, help="SIZE:STEPS,... for the raw curve")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--raw-images", type=int, default=32)
    ap.add_argument("--max-reps", type=int, default=8)
    ap.add_argument("--serve-shape", type=lambda s: _pairs(s)[0], default=None)
    ap.add_argument("--serve-batch", type=int, default=8)
    ap.add_argument("--serve-images", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=None)
    ap.add_argument("--diagnose", action="store_true", help="serve phase: also run with denoising on the loop")
    ap.add_argument("--optimize-shape", type=lambda s: _pairs(s)[0], default=None)
    ap.add_argument("--optimize-batch", type=int, default=1)
    ap.add_argument("--optimize-reps", type=int, default=3)
    ap.add_argument("--optimize-variants", type=json.loads,
                    default=[{"compile": "default", "channels_last": True, "fuse_qkv": True}])
    ap.add_argument("--curve-images", type=int, default=64, help="curve phase: images per point at <=512 px "
                    "(1/8 of it above)")
    ap.add_argument("--memory-shapes", type=lambda s: [tuple(int(x) for x in p.split(":")) for p in s.split(",")],
                    default=None, help="SIZE:STEPS:BATCH,... for the memory phase")
    ap.add_argument("--memory-reps", type=int, default=2)
    ap.add_argument("--wuerstchen-shape", type=lambda s: _pairs(s)[0], default=None)
    ap.add_argument("--wuerstchen-batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 4])
    ap.add_argument("--wuerstchen-reps", type=int, default=2)
    ap.add_argument("--wuerstchen-decoder-steps", type=int, default=12)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--name", default=None)
    a = ap.parse_args()
    a.dtype = a.dtype or ("float16" if a.device == "cuda" else "float32")
    a.batches = [int(b) for b in a.batches.split(",")]
    a.curve = a.curve or ([(64, 2)] if a.tiny else [(512, 4), (1024, 30)])
    a.serve_shape = a.serve_shape or ((64, 2) if a.tiny else (512, 4))
    a.optimize_shape = a.optimize_shape or ((64, 2) if a.tiny else (1024, 30))
    a.memory_shapes = a.memory_shapes or ([(64, 2, 4)] if a.tiny else [(1024, 2, 8), (512, 4, 8)])
    a.wuerstchen_shape = a.wuerstchen_shape or ((128, 2) if a.tiny else (1024, 30))
    if a.tiny:
        a.wuerstchen_decoder_steps = 2

    started = time.perf_counter()
    path = model_dir(a)
    result: dict[str, Any] = {
        "benchmark": "serving_suite", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu",
                    "cpu_count": os.cpu_count(), "platform": platform.platform()},
        "versions": _versions(), "model": "tiny SDXL (random)" if a.tiny else "SDXL architecture, random weights",
        "dtype": a.dtype, "model_build_s": round(time.perf_counter() - started, 1), "vae_slicing": True,
        "serve_env": {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")},
    }
    name = a.name or f"serving_suite-{'tiny-cpu' if a.tiny else result['machine']['device'].replace(' ', '_')}"
    a.out.mkdir(parents=True, exist_ok=True)
    out = a.out / f"{name}.json"
    phases = {"raw": phase_raw, "serve": phase_serve, "fractional": phase_fractional, "optimize": phase_optimize,
              "curve": phase_curve, "memory": phase_memory, "wuerstchen": phase_wuerstchen}
    for ph in a.phases.split(","):
        t0 = time.perf_counter()
        result[ph] = phases[ph](a, path)
        result[ph]["phase_s"] = round(time.perf_counter() - t0, 1)
        out.write_text(json.dumps(result, indent=2) + "\n")  # partial results survive a later failure
    print(json.dumps({k: v for k, v in result.items() if k not in ("raw",)}, indent=1)[-6000:])
    print(f"wrote {out}")


def _versions() -> dict:
    import diffusers
    import ray
    import transformers

    return {"torch": torch.__version__, "ray": ray.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


if __name__ == "__main__":
    main()
