"""img2img (and inpainting) vs txt2img images/s on one GPU, same run, same engine.

    python -m benchmarks.img2img_speed --out R.json                      # full SDXL, 1024², 30 steps, fp16
    python -m benchmarks.img2img_speed --tiny --device cpu --out R.json  # CI smoke (tests/)

Everything runs through `DiffusionEngine.generate_images` (text encoding, VAE encode of the init
image, denoising, VAE decode with slicing, PIL images) on the full-size SDXL architecture with
random weights built from config (same FLOPs; no weights can be downloaded), batch 1 and 4 unless
`--batches`. img2img at strength 0.6 runs the last int(30 x 0.6) = 18 of 30 steps, so its expected
speed-up over txt2img is at most 30/18 = 1.67x, minus the VAE encode. One warm-up call per mode
and batch size first (the img2img/inpaint pipelines are built on first use).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from deployments.diffusion import img2img  # noqa: E402
from deployments.diffusion.engine import DiffusionEngine  # noqa: E402
from deployments.diffusion.types import ImageTask, InputImage  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"
MODES = ("txt2img", "img2img", "inpaint")


def _png(array: np.ndarray) -> InputImage:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    data = buf.getvalue()
    return InputImage(data, hashlib.sha256(data).hexdigest())


def inputs(size: int) -> tuple[InputImage, InputImage]:
    """A smooth random init image (noise PNGs compress badly and are not what users send) and a
    mask repainting the right half."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    init = np.array(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))
    mask = np.zeros((size, size), np.uint8)
    mask[:, size // 2:] = 255
    return _png(init), _png(mask)


def build_engine(args: argparse.Namespace) -> DiffusionEngine:
    if args.tiny:
        from deployments.diffusion.tiny import tiny_sdxl_pipeline

        pipe = tiny_sdxl_pipeline().to(args.device)
    else:
        from benchmarks.full_models import full_sdxl_pipeline

        pipe = full_sdxl_pipeline(args.device, torch.float16)
    return DiffusionEngine("bench", pipe, "sdxl", batch_invariant=False, vae_slicing=True)


def tasks(args: argparse.Namespace, mode: str, batch: int, seed0: int, init: InputImage,
          mask: InputImage) -> list[ImageTask]:
    extra: dict[str, Any] = {}
    if mode != "txt2img":
        extra = {"init_image": init, "strength": args.strength, "mask": mask if mode == "inpaint" else None}
    return [ImageTask(prompt=PROMPT, negative_prompt="", seed=seed0 + i, width=args.size, height=args.size,
                      steps=args.steps, guidance_scale=5.0, **extra) for i in range(batch)]


def timed(engine: DiffusionEngine, ts: list[ImageTask], device: str) -> float:
    t0 = time.perf_counter()
    out = engine.generate_images(ts)
    if device == "cuda":
        torch.cuda.synchronize()
    for o in out:
        if isinstance(o, Exception):
            raise o
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random SDXL (CPU smoke test) instead of full size")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=None, help="side in px (default 1024; 64 with --tiny)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--strength", type=float, default=0.6)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--reps", type=int, default=2, help="timed calls per mode and batch size (after a warm-up)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.size = args.size or (64 if args.tiny else 1024)
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= set(MODES):
        ap.error(f"--modes: choose from {MODES}")
    batches = [int(b) for b in args.batches.split(",")]
    init, mask = inputs(args.size)
    engine = build_engine(args)
    result: dict[str, Any] = {
        "benchmark": "img2img_speed", "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "size": args.size, "steps": args.steps, "strength": args.strength,
        "steps_run": {m: args.steps if m == "txt2img" else img2img.steps_run(args.steps, args.strength)
                      for m in modes},
        "rows": [],
    }
    for batch in batches:
        row: dict[str, Any] = {"batch": batch}
        for mode in modes:
            timed(engine, tasks(args, mode, batch, 100, init, mask), args.device)  # warm-up (builds pipelines)
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            total = sum(timed(engine, tasks(args, mode, batch, 1000 * r, init, mask), args.device)
                        for r in range(args.reps))
            row[mode] = {"images_per_s": round(batch * args.reps / total, 4),
                         "batch_s": round(total / args.reps, 3)}
            if args.device == "cuda":
                row[mode]["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            print(f"batch {batch} {mode}: {row[mode]}", flush=True)
        for mode in modes:
            if mode != "txt2img" and "txt2img" in row:
                row[f"{mode}_vs_txt2img"] = round(row[mode]["images_per_s"] / row["txt2img"]["images_per_s"], 3)
        result["rows"].append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
