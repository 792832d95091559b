"""The diffusion engine's speed on one GPU: eager vs `optimize` variants, side by side in one run.

    python -m benchmarks.engine_speed --out R.json                         # full SDXL, 1024², 30 steps
    python -m benchmarks.engine_speed --tiny --device cpu --out R.json     # CI smoke (tests/)

Everything runs through `DiffusionEngine.generate_images` (text encoding, denoising, VAE decode
with slicing, PIL images), batch 1 unless `--batches`, on the full-size SDXL architecture with
random weights built from config (same FLOPs; no weights can be downloaded). For each variant:
first call (the compile, cold cache), images/s, per-step and fixed cost (from a 30- and a 2-step
run), peak memory, and fidelity vs eager on the same seeds (PSNR, max |Δ| of 8-bit pixels; a
variant counts as lossless at PSNR >= 40 dB). Draft tiers (`--draft N,...`) run on the first
compiled variant: images/s vs that variant's default quality and PSNR vs it. `--warm-start` starts
a fresh process on the same compile cache and times a replica's start (build, apply, bucket
warm-up) and its first image. With random weights an image-quality score (CLIP score, FID)
means nothing: PSNR against the default on the same seeds is the only fidelity measure here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from deployments.diffusion.config import DiffusionModelConfig, DraftConfig, OptimizeConfig  # noqa: E402
from deployments.diffusion.engine import DiffusionEngine  # noqa: E402
from deployments.diffusion.types import ImageTask  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"
FIDELITY_SEEDS = (7, 8)


@dataclasses.dataclass(frozen=True)
class DraftTask(ImageTask):
    """An ImageTask asking for the draft tier (the request field is plumbed separately)."""

    quality: str = "draft"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_pipeline(args: argparse.Namespace):
    if args.tiny:
        from deployments.diffusion.tiny import tiny_sdxl_pipeline

        return tiny_sdxl_pipeline().to(args.device)
    from benchmarks.full_models import full_sdxl_pipeline

    return full_sdxl_pipeline(args.device, torch.float16)


def make_engine(args: argparse.Namespace, options: OptimizeConfig) -> DiffusionEngine:
    from deployments.diffusion.optimize import apply

    pipe = apply(build_pipeline(args), "sdxl", options)
    return DiffusionEngine("bench", pipe, "sdxl", batch_invariant=False, vae_slicing=True)


def free(engine: DiffusionEngine | None, device: str) -> None:
    if engine is not None:
        del engine.pipeline
    torch._dynamo.reset()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def tasks(args: argparse.Namespace, *, batch: int, seed0: int, steps: int | None = None,
          draft: bool = False) -> list[ImageTask]:
    cls = DraftTask if draft else ImageTask
    return [cls(prompt=PROMPT, negative_prompt="", seed=seed0 + i, width=args.size, height=args.size,
                steps=steps or args.steps, guidance_scale=5.0) for i in range(batch)]


def generate(engine: DiffusionEngine, ts: list[ImageTask], device: str) -> tuple[list[Any], float]:
    t0 = time.perf_counter()
    out = engine.generate_images(ts)
    _sync(device)
    for o in out:
        if isinstance(o, Exception):
            raise o
    return out, time.perf_counter() - t0


def speed(engine: DiffusionEngine, args: argparse.Namespace, *, batch: int = 1, draft: bool = False,
          steps: int | None = None) -> dict[str, Any]:
    generate(engine, tasks(args, batch=batch, seed0=1000, steps=steps, draft=draft), args.device)  # warm
    lat = [generate(engine, tasks(args, batch=batch, seed0=100 * r, steps=steps, draft=draft), args.device)[1]
           for r in range(args.reps)]
    return {"batch": batch, "reps": args.reps, "images_per_s": round(batch * len(lat) / sum(lat), 4),
            "batch_p50_s": round(statistics.median(lat), 4), "batch_min_s": round(min(lat), 4)}


def breakdown(engine: DiffusionEngine, args: argparse.Namespace, full_s: float) -> dict[str, float]:
    """Per-step and fixed cost from the full run and a 2-step run (text encoding + VAE decode)."""
    generate(engine, tasks(args, batch=1, seed0=1, steps=2), args.device)
    short = min(generate(engine, tasks(args, batch=1, seed0=1, steps=2), args.device)[1] for _ in range(2))
    per_step = (full_s - short) / (args.steps - 2)
    return {"per_step_ms": round(1000 * per_step, 2), "fixed_ms": round(1000 * (short - 2 * per_step), 1)}


def pixels(engine: DiffusionEngine, args: argparse.Namespace, *, draft: bool = False) -> list[np.ndarray]:
    return [np.asarray(generate(engine, tasks(args, batch=1, seed0=s, draft=draft), args.device)[0][0])
            for s in FIDELITY_SEEDS]


def fidelity(ref: list[np.ndarray], imgs: list[np.ndarray]) -> dict[str, float]:
    def psnr(a: np.ndarray, b: np.ndarray) -> float:
        mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
        return 99.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)

    return {"psnr_db_min": round(min(psnr(a, b) for a, b in zip(ref, imgs, strict=False)), 2),
            "max_abs_diff": int(max(np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(ref, imgs, strict=False)))}


def peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def run_variant(args: argparse.Namespace, spec: dict, ref: list[np.ndarray], eager: dict,
                result: dict, save) -> None:
    options = OptimizeConfig(**spec)
    if args.draft and not result.get("draft") and not options.draft.enabled:
        # The draft rows swap the tier's settings in later; the UNet split they need is installed at
        # apply time only when a draft tier is configured (an eager variant has no split otherwise,
        # and its "draft" rows would silently run the full UNet). Default-quality tasks don't use it.
        first_interval, first_fraction = args.draft[0]
        options = options.model_copy(update={"draft": DraftConfig(cache_interval=max(first_interval, 2),
                                                                  steps_fraction=first_fraction)})
    t0 = time.perf_counter()
    engine = make_engine(args, options)
    build_s = time.perf_counter() - t0
    _, first_s = generate(engine, tasks(args, batch=1, seed0=1000), args.device)
    v: dict[str, Any] = {"options": spec, "build_apply_s": round(build_s, 1), "first_call_s": round(first_s, 1)}
    v.update(speed(engine, args))
    v["speedup_over_eager"] = round(v["images_per_s"] / eager["images_per_s"], 3)
    v["breakdown"] = breakdown(engine, args, v["batch_min_s"])
    mine = pixels(engine, args)
    v["fidelity_vs_eager"] = fidelity(ref, mine)
    for b in args.batches[1:]:
        v.setdefault("batches", []).append(speed(engine, args, batch=b))
    v["peak_mem_gib"] = peak_gib(args.device)
    result["variants"].append(v)
    save()
    print("variant", json.dumps(v), flush=True)
    if args.draft and not result.get("draft"):
        run_drafts(args, engine, options, mine, ref, v, result, save)
    free(engine, args.device)


def run_drafts(args, engine, options, default_px, ref, default_row, result, save) -> None:
    from deployments.diffusion.optimize import state

    rows = []
    for spec in args.draft:
        interval, fraction = spec
        state(engine.pipeline).options = options.model_copy(
            update={"draft": DraftConfig(cache_interval=interval, steps_fraction=fraction)})
        row: dict[str, Any] = {"cache_interval": interval, "steps_fraction": fraction}
        row.update(speed(engine, args, draft=True))
        row["speedup_over_default"] = round(row["images_per_s"] / default_row["images_per_s"], 3)
        row["speedup_over_eager"] = round(row["images_per_s"] / result["eager"]["images_per_s"], 3)
        px = pixels(engine, args, draft=True)
        row["fidelity_vs_default"] = fidelity(default_px, px)
        row["fidelity_vs_eager"] = fidelity(ref, px)
        split = state(engine.pipeline).split
        row["unet_calls"] = dict(split.counts) if split else None
        rows.append(row)
        print("draft", json.dumps(row), flush=True)
        result["draft"] = {"on": default_row["options"], "rows": rows}
        save()
    state(engine.pipeline).options = options


def warm_start(args: argparse.Namespace, spec: dict) -> dict:
    """A replica's start in this (fresh) process: build, apply, bucket warm-up, first image."""
    t0 = time.perf_counter()
    size = f"{args.size}x{args.size}"
    config = DiffusionModelConfig(name="bench", family="sdxl", model="random", dtype="float16",
                                  optimize={**spec, "buckets": [size], "warmup_batch_sizes": [1]})
    engine = make_engine(args, config.optimize)
    build_s = time.perf_counter() - t0
    from deployments.diffusion.warmup import warm_up

    rows = warm_up(engine, config)
    warm_s = time.perf_counter() - t0 - build_s
    _, first_s = generate(engine, tasks(args, batch=1, seed0=5), args.device)
    return {"options": spec, "build_apply_s": round(build_s, 1), "warmup_s": round(warm_s, 1), "warmup": rows,
            "first_image_after_warmup_s": round(first_s, 2), "start_to_first_image_s":
            round(time.perf_counter() - t0, 1), "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1])
    ap.add_argument("--variants", type=json.loads, default=[
        {"compile": "reduce-overhead", "channels_last": True, "fuse_qkv": True}])
    ap.add_argument("--draft", type=lambda s: [(int(p.split(":")[0]), float(p.split(":")[1]) if ":" in p else 1.0)
                                              for p in s.split(",")] if s else [],
                    default=[], help="INTERVAL[:STEPS_FRACTION],... on the first variant")
    ap.add_argument("--warm-start", action="store_true", help="time a fresh process's start on the same cache "
                    "for the first compiled variant")
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("GENSERVE_WORK", REPO / ".work"))
                    / "compile-cache")
    ap.add_argument("--keep-cache", action="store_true", help="don't empty the cache first (default: cold)")
    ap.add_argument("--start-only", type=json.loads, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    a.size = a.size or (64 if a.tiny else 1024)
    a.steps = a.steps or (4 if a.tiny else 30)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(a.cache_dir)
    if a.start_only is not None:
        a.out.write_text(json.dumps(warm_start(a, a.start_only), indent=2) + "\n")
        return
    if not a.keep_cache:
        shutil.rmtree(a.cache_dir, ignore_errors=True)
    result: dict[str, Any] = {
        "benchmark": "engine_speed", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu",
                    "cpu_count": os.cpu_count(), "platform": platform.platform()},
        "versions": versions(), "model": "tiny SDXL (random)" if a.tiny else "SDXL architecture, random weights",
        "dtype": "float32" if a.tiny else "float16", "size": a.size, "steps": a.steps, "guidance": 5.0,
        "vae_slicing": True, "cache_dir": str(a.cache_dir), "variants": []}
    a.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        a.out.write_text(json.dumps(result, indent=2) + "\n")  # partial results survive a later failure

    engine = make_engine(a, OptimizeConfig())
    eager = speed(engine, a)
    eager["breakdown"] = breakdown(engine, a, eager["batch_min_s"])
    for b in a.batches[1:]:
        eager.setdefault("batches", []).append(speed(engine, a, batch=b))
    eager["peak_mem_gib"] = peak_gib(a.device)
    ref = pixels(engine, a)
    result["eager"] = eager
    save()
    print("eager", json.dumps(eager), flush=True)
    free(engine, a.device)
    for i, spec in enumerate(a.variants):
        try:
            run_variant(a, spec, ref, eager, result, save)
        except Exception as exc:  # one variant's failure (e.g. fp8 without torchao) must not sink the rest
            result["variants"].append({"options": spec, "error": f"{type(exc).__name__}: {exc}"[:2000]})
            save()
            print("variant failed", spec, repr(exc), flush=True)
            free(None, a.device)
        if i == 0 and a.warm_start:
            side = a.out.with_suffix(".start.json")
            cmd = [sys.executable, "-m", "benchmarks.engine_speed", "--out", str(side), "--size", str(a.size),
                   "--steps", str(a.steps), "--device", a.device, "--cache-dir", str(a.cache_dir),
                   "--start-only", json.dumps(spec)] + (["--tiny"] if a.tiny else [])
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            row = json.loads(side.read_text()) if proc.returncode == 0 else {"error": proc.stderr[-3000:]}
            row["process_s"] = round(time.perf_counter() - t0, 1)
            result["warm_start"] = row
            save()
            print("warm start", json.dumps(row), flush=True)
    print(f"wrote {a.out}")


def versions() -> dict:
    import diffusers
    import transformers

    out = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
           "python": platform.python_version()}
    try:
        import torchao

        out["torchao"] = torchao.__version__
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        out["torchao"] = f"unavailable: {type(exc).__name__}"
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


if __name__ == "__main__":
    main()
