"""What streamed partial images cost the GPU: images/s with `--partial` previews per image vs none,
in one run, on one engine.

    python -m benchmarks.partial_images --out R.json                    # full SDXL fp16, 1024², 30 steps, batch 4
    python -m benchmarks.partial_images --tiny --device cpu --out R.json  # CI smoke (tests/)

Both modes run through `DiffusionEngine.generate_images` (text encoding, denoising, VAE decode with
slicing) with the replica's preview decoder (deployments/diffusion/previews.py: the tiny VAE on a
worker thread and a CUDA side stream), on the full-size SDXL architecture with random weights
(same FLOPs) and a random `AutoencoderTiny` of TAESD-XL's shape. Batches alternate between the
modes (ABAB...) so clock and thermal drift hit both alike. Reported per mode: seconds per batch,
images/s (from the median batch), and for the previews: how many were decoded, how long after the
batch ended the last one was ready (`flush_s`: it overlaps the next batch on a replica), and
whether the images were the same as without previews (they should be: previews only read).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from deployments.diffusion.engine import DiffusionEngine  # noqa: E402
from deployments.diffusion.previews import PreviewDecoder  # noqa: E402
from deployments.diffusion.types import ImageTask  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_engine(args: argparse.Namespace) -> DiffusionEngine:
    from diffusers import AutoencoderTiny

    if args.tiny:
        from deployments.diffusion.tiny import tiny_sdxl_pipeline, tiny_taesd

        pipe, vae = tiny_sdxl_pipeline().to(args.device), tiny_taesd()
        dtype = torch.float32
    else:
        from benchmarks.full_models import full_sdxl_pipeline

        dtype = torch.float16
        pipe = full_sdxl_pipeline(args.device, dtype)
        torch.manual_seed(0)
        vae = AutoencoderTiny()  # the defaults are TAESD's (and TAESD-XL's) architecture
    engine = DiffusionEngine("bench", pipe, "sdxl", batch_invariant=False, vae_slicing=True)
    engine.previews = PreviewDecoder(vae.to(args.device, dtype).eval(), max_side=args.max_side)
    return engine


def run_batch(engine: DiffusionEngine, args: argparse.Namespace, partial: int, batch_no: int
              ) -> tuple[float, float, int, list[Any]]:
    """(batch seconds, seconds until its last preview was ready after the batch, previews, images)."""
    tasks = [ImageTask(prompt=PROMPT, negative_prompt="", seed=1000 + i, width=args.size, height=args.size,
                       steps=args.steps, guidance_scale=5.0, task_id=f"b{batch_no}:{i}", partial_images=partial)
             for i in range(args.batch)]
    got: list[int] = []
    _sync(args.device)
    t0 = time.perf_counter()
    images = engine.generate_images(tasks, on_preview=lambda task_id, p: got.append(p.index))
    _sync(args.device)
    batch_s = time.perf_counter() - t0
    assert engine.previews is not None
    for t in tasks:
        asyncio.run(engine.previews.flush(t.task_id or ""))
    flush_s = time.perf_counter() - t0 - batch_s
    for im in images:
        if isinstance(im, Exception):
            raise im
    return batch_s, flush_s, len(got), images


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random models (CPU smoke)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=None, help="square side (default 1024; tiny 64)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--partial", type=int, default=3, help="partial images per image (0-3)")
    ap.add_argument("--reps", type=int, default=3, help="batches per mode (after one warm-up each)")
    ap.add_argument("--max-side", type=int, default=512, help="previews downscaled to this side (the config's)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.size = args.size or (64 if args.tiny else 1024)

    engine = build_engine(args)
    modes = {"none": 0, "partial": args.partial}
    rows: dict[str, dict[str, list[Any]]] = {m: {"batch_s": [], "flush_s": [], "previews": []} for m in modes}
    first: dict[str, list[Any]] = {}
    batch_no = 0
    for rep in range(args.reps + 1):  # rep 0 warms both modes up (cuDNN autotune, allocator, decoder)
        for mode, partial in modes.items():
            batch_no += 1
            batch_s, flush_s, previews, images = run_batch(engine, args, partial, batch_no)
            if rep == 0:
                first[mode] = images
                continue
            rows[mode]["batch_s"].append(round(batch_s, 4))
            rows[mode]["flush_s"].append(round(flush_s, 4))
            rows[mode]["previews"].append(previews)
    summary: dict[str, Any] = {}
    for mode, r in rows.items():
        median = statistics.median(r["batch_s"])
        summary[mode] = {**r, "median_batch_s": round(median, 4), "images_per_s": round(args.batch / median, 4)}
    diff = max(int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
               for a, b in zip(first["none"], first["partial"], strict=True))
    result = {
        "benchmark": "partial_images", "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {"tiny": args.tiny, "device": args.device, "size": args.size, "steps": args.steps,
                   "batch": args.batch, "partial_images": args.partial, "reps": args.reps,
                   "preview_max_side": args.max_side, "dtype": "float32" if args.tiny else "float16"},
        "host": {"python": platform.python_version(), "torch": torch.__version__,
                 "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
        **summary,
        "loss_percent": round(100 * (1 - summary["partial"]["images_per_s"] / summary["none"]["images_per_s"]), 2),
        "images_max_abs_diff": diff,
        "preview_failures": engine.previews.failed if engine.previews else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("loss_percent", "images_max_abs_diff")}
                     | {m: summary[m]["images_per_s"] for m in modes}))
    return result


if __name__ == "__main__":
    main()
