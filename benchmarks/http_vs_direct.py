"""Images/s of one diffusion pipeline called directly vs the same pipeline behind the Serve graph
over HTTP, at the same batch size, steps and resolution, in ONE run (side by side).

    python -m benchmarks.http_vs_direct [--batch 8] [--steps 2] [--size 64] [--images 256]

Direct: `DiffusionEngine.generate` (denoise + PNG encode) on batches of `--batch` tasks.
Graph:  `--concurrency` HTTP clients sending single-image requests to a local cluster running
        Ingress + one Diffusion replica with `max_batch_size = --batch`.
Both sides use the same torch thread count (the replica's `num_cpus`). Direct is measured before
and after the graph, and averaged, to cancel drift. Writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_direct(model_dir: Path, *, batch: int, steps: int, size: int, images: int, threads: int) -> dict:
    import torch

    from deployments.diffusion.engine import DiffusionEngine
    from deployments.diffusion.types import ImageTask

    torch.set_num_threads(threads)
    engine = DiffusionEngine.from_pretrained("direct", str(model_dir), "sdxl", device="cpu")
    tasks = [ImageTask(prompt="a lighthouse at dawn", negative_prompt="", seed=i, width=size, height=size,
                       steps=steps, guidance_scale=5.0) for i in range(batch)]
    engine.generate(tasks)  # warm-up
    rounds = max(1, images // batch)
    t0 = time.perf_counter()
    for _ in range(rounds):
        engine.generate(tasks)
    wall = time.perf_counter() - t0
    return {"images": rounds * batch, "wall_s": round(wall, 3), "images_per_s": round(rounds * batch / wall, 3)}


def measure_graph(model_dir: Path, *, batch: int, steps: int, size: int, images: int, threads: int,
                  concurrency: int) -> dict:
    import ray
    from ray import serve

    from benchmarks.loadgen import closed_loop_images
    from serve_app import launcher

    port = _free_port()
    args = {
        "work_dir": str(REPO / ".work"),
        "diffusion_models": [{
            "name": "bench", "family": "sdxl", "model": str(model_dir), "native_resolution": 64,
            "size_multiple": 8, "min_side": 32, "max_side": 256, "default_steps": steps, "max_steps": 64,
            "batching": {"max_batch_size": batch, "batch_wait_timeout_s": 0.05},
        }],
    }
    doc = {
        "proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "bench", "route_prefix": "/", "import_path": "serve_app.graph:build_app", "args": args,
            "deployments": [
                {"name": "Ingress", "num_replicas": 1, "max_ongoing_requests": 512,
                 "ray_actor_options": {"num_cpus": 0.5}},
                {"name": "Diffusion-bench", "num_replicas": 1, "max_ongoing_requests": 4 * batch,
                 "ray_actor_options": {"num_cpus": threads}},
            ],
        }],
    }
    ray.init(num_cpus=max(4, threads + 2), include_dashboard=False, log_to_driver=False)
    try:
        launcher.deploy(doc)
        launcher.wait_running("bench", timeout_s=300)
        url = f"http://127.0.0.1:{port}"
        body = {"prompt": "a lighthouse at dawn", "model": "bench", "size": f"{size}x{size}", "steps": steps}
        asyncio.run(closed_loop_images(url, body, total_requests=2 * batch, concurrency=concurrency))  # warm-up
        res = asyncio.run(closed_loop_images(url, body, total_requests=images, concurrency=concurrency))
    finally:
        serve.shutdown()
        ray.shutdown()
    return res.summary()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads = the replica's num_cpus")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--models", type=Path, default=Path(os.environ.get("GENSERVE_WORK", REPO / ".work")) / "models")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    a = ap.parse_args()

    from deployments.diffusion.tiny import build_all_tiny

    model_dir = build_all_tiny(a.models)["sdxl"]
    common = dict(batch=a.batch, steps=a.steps, size=a.size, images=a.images, threads=a.threads)
    direct_before = measure_direct(model_dir, **common)
    graph = measure_graph(model_dir, concurrency=a.concurrency, **common)
    direct_after = measure_direct(model_dir, **common)
    direct_ips = statistics.mean([direct_before["images_per_s"], direct_after["images_per_s"]])
    ratio = graph["images_per_s"] / direct_ips
    import diffusers
    import ray
    import torch

    result = {
        "benchmark": "http_vs_direct", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "device": "cpu"},
        "versions": {"torch": torch.__version__, "ray": ray.__version__, "diffusers": diffusers.__version__},
        "params": {**common, "concurrency": a.concurrency, "model": "tiny SDXL (random weights)"},
        "direct_before": direct_before, "direct_after": direct_after, "graph_http": graph,
        "ratio_graph_over_direct": round(ratio, 3),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"http_vs_direct-cpu-b{a.batch}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"\ngraph over HTTP / direct = {ratio:.3f}  (wrote {path.relative_to(REPO)})")


if __name__ == "__main__":
    main()
