"""LoRA serving on one diffusion replica (issue 21): Zipf traffic over many adapters vs the same
traffic without adapters, in one run, through `DiffusionServer` (the replica's batcher, adapter
groups inside batches, `LoraManager` slots) on one GPU.

    python -m benchmarks.lora_serving --out R.json                       # full SDXL, 20 x rank-32, 1024²
    python -m benchmarks.lora_serving --tiny --device cpu --out R.json   # CI smoke (tests/)
    python -m benchmarks.lora_serving --hotswap-rank 32 --out R.json     # placeholder slots, mixed batches

Modes: by default the ordinary manager (`load_lora_weights`, one pipeline call per adapter set in a
batch). `--hotswap-rank R` sets `lora.hotswap_target_rank`: every slot holds a rank-R placeholder
and tasks with different adapter sets share one pipeline call (per-row slot weights, lora_rows.py);
every slot's LoRA then runs on every row, so that mode also measures a replica that serves no
adapters at all (`no_lora_plain`, twice, first, before the placeholders exist) and reports
`throughput_ratio` against it (`throughput_ratio_vs_slot_base`: against the slot replica's own
no-adapter runs). `pipeline_calls` counts the calls of each run and their mean rows (group size).

Adapters: random PEFT LoRAs (`LoraConfig` on the UNet's attention projections, lora_B random and
scaled small) built on the full-size random SDXL UNet, saved in PEFT's file format and read back
through the replica's real path (`DirAdapterSource` -> `read_adapter` -> `load_lora_weights`).
Serve's multiplexed LRU (`max_num_models_per_replica`) is emulated in-process with the same
policy (an OrderedDict of held sets; evicting calls the set's `__del__`), since this measures one
replica, not routing. Reported: images/s with and without adapters and their ratio (target
>= 0.9), the adapter cold load p95 (fetch from local disk + load into the pipeline) and the warm
switch p95 (`set_adapters` among loaded adapters; target <= 200 ms), slot loads/unloads.
The multiplexed routing hit rate over 2 replicas is benchmarks/lora_routing.py's (a Serve cluster).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from deployments.adapters import DirAdapterSource, multiplexed_id  # noqa: E402
from deployments.diffusion.config import DiffusionModelConfig  # noqa: E402
from deployments.diffusion.engine import DiffusionEngine  # noqa: E402
from deployments.diffusion.server import DiffusionServer  # noqa: E402
from deployments.diffusion.types import ImageTask, LoraUse  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"


def p95(xs: list[float]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, round(0.95 * (len(s) - 1)))]


def build_pipeline(args: argparse.Namespace) -> Any:
    if args.tiny:
        from deployments.diffusion.tiny import tiny_sdxl_pipeline

        return tiny_sdxl_pipeline().to(args.device)
    from benchmarks.full_models import full_sdxl_pipeline

    return full_sdxl_pipeline(args.device, torch.float16)


def build_adapters(pipe: Any, root: Path, n: int, rank: int, scale: float) -> list[str]:
    from deployments.diffusion.tiny import save_adapter, tiny_sdxl_lora

    ids = []
    for i in range(n):
        cfg, weights = tiny_sdxl_lora(seed=100 + i, rank=rank, unet=pipe.unet)
        weights = {k: (v * scale if ".lora_B." in k else v).to(torch.float16 if not_cpu(pipe) else torch.float32).cpu()
                   for k, v in weights.items()}
        ids.append(f"ad_bench{i:02d}")
        save_adapter(root / ids[-1], cfg, weights)
    return ids


def not_cpu(pipe: Any) -> bool:
    return torch.device(pipe.device).type != "cpu"


def zipf_picks(ids: list[str], n: int, s: float, seed: int) -> list[str]:
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) ** s for k in range(len(ids))]
    return rng.choices(ids, weights=weights, k=n)


class ServeLRU:
    """Serve's `_ModelMultiplexWrapper` policy: an LRU of held sets; evicting calls `__del__`."""

    def __init__(self, server: DiffusionServer, size: int) -> None:
        self.server, self.size = server, size
        self.held: OrderedDict[str, Any] = OrderedDict()
        self.lock = asyncio.Lock()

    async def hold(self, model_id: str) -> None:
        if model_id in self.held:
            self.held.move_to_end(model_id)
            return
        async with self.lock:
            if model_id in self.held:
                return
            if len(self.held) >= self.size:
                _, evicted = self.held.popitem(last=False)
                evicted.__del__()
            self.held[model_id] = await self.server.stage_adapters(model_id)


async def run_traffic(server: DiffusionServer, lru: ServeLRU, picks: list[str | None], args: argparse.Namespace
                      ) -> dict[str, Any]:
    sem = asyncio.Semaphore(args.concurrency)
    latencies: list[float] = []

    async def one(i: int, adapter: str | None) -> None:
        loras = (LoraUse(adapter, 1.0),) if adapter else ()
        task = ImageTask(prompt=PROMPT, negative_prompt="", seed=i, width=args.size, height=args.size,
                         steps=args.steps, guidance_scale=5.0, loras=loras)
        async with sem:
            t0 = time.perf_counter()
            if adapter:
                await lru.hold(multiplexed_id([adapter]))
            await server.generate(task)
            latencies.append(time.perf_counter() - t0)

    calls = len(GROUPS)
    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, a) for i, a in enumerate(picks)))
    wall = time.perf_counter() - t0
    groups = GROUPS[calls:]
    return {"images": len(picks), "wall_s": round(wall, 3), "images_per_s": round(len(picks) / wall, 4),
            "latency_p50_s": round(statistics.median(latencies), 4), "latency_p95_s": round(p95(latencies) or 0, 4),
            "pipeline_calls": len(groups), "mean_group_size": round(statistics.mean(groups), 3) if groups else None}


GROUPS: list[int] = []  # tasks per pipeline call (engine._run_group), all runs in order


def count_groups(engine: DiffusionEngine) -> None:
    inner = engine._run_group

    def counted(tasks: list[ImageTask], *a: Any, **kw: Any) -> Any:
        GROUPS.append(len(tasks))
        return inner(tasks, *a, **kw)

    engine._run_group = counted  # type: ignore[method-assign]


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    pipe = build_pipeline(args)
    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    t0 = time.perf_counter()
    ids = build_adapters(pipe, work, args.adapters, args.rank, args.lora_scale)
    # Building them through PEFT left empty LoRA wrappers on the UNet: back to the plain layers a
    # replica starts with (placeholder slots need them; the baseline shouldn't pay for wrappers).
    pipe.unet.unload_lora()
    build_s = time.perf_counter() - t0
    engine = DiffusionEngine("bench", pipe, "sdxl", batch_invariant=False, vae_slicing=True)
    count_groups(engine)

    def config(**lora: Any) -> DiffusionModelConfig:
        return DiffusionModelConfig(
            name="bench", family="sdxl", model="none", device=args.device, native_resolution=args.size,
            size_multiple=8, min_side=8, max_side=max(args.size, 64), default_steps=args.steps,
            max_steps=max(args.steps, 1), batching={"max_batch_size": args.batch, "batch_wait_timeout_s": 0.01},
            probe_memory=False, lora=lora)

    plain = None
    if args.hotswap_rank is not None:  # a replica serving no adapters, before any LoRA layer exists
        no_adapters = DiffusionServer(config(enabled=False), engine=engine)
        await run_traffic(no_adapters, ServeLRU(no_adapters, 1), [None] * args.batch, args)
        plain = [await run_traffic(no_adapters, ServeLRU(no_adapters, 1), [None] * args.requests, args)
                 for _ in range(2)]  # twice: the first run after the short warm-up may still be warming
    server = DiffusionServer(config(max_adapters_per_replica=args.slots, hotswap_target_rank=args.hotswap_rank),
                             engine=engine, adapters=DirAdapterSource(work))
    lru = ServeLRU(server, args.slots)
    picks = zipf_picks(ids, args.requests, args.zipf_s, seed=1)
    # Warm-up (kernels, allocator) without adapters, then the two runs, same seeds, interleaved
    # order base -> lora -> base so drift shows up as a base/base difference.
    await run_traffic(server, lru, [None] * args.batch, args)
    base = await run_traffic(server, lru, [None] * args.requests, args)
    assert server.loras is not None
    server.loras.load_s.clear()
    server.loras.switch_s.clear()
    lora = await run_traffic(server, lru, list(picks), args)
    base2 = await run_traffic(server, lru, [None] * args.requests, args)
    loads, switches = list(server.loras.load_s), list(server.loras.switch_s)
    base_ips = (base["images_per_s"] + base2["images_per_s"]) / 2
    slots_mode: dict[str, Any] = {}
    if plain is not None:  # the honest baseline: placeholders cost every request, adapters or not
        slots_mode = {"no_lora_plain": plain[0], "no_lora_plain_again": plain[1],
                      "throughput_ratio_vs_slot_base": round(lora["images_per_s"] / base_ips, 4)}
        base_ips = (plain[0]["images_per_s"] + plain[1]["images_per_s"]) / 2
    counts = {a: picks.count(a) for a in ids}
    return {
        "benchmark": "lora_serving", "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "model": "tiny-sdxl" if args.tiny else "sdxl-architecture random weights fp16",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "adapter_build_s": round(build_s, 2),
        "adapter_bytes": sum(p.stat().st_size for p in work.rglob("*.safetensors")) // len(ids),
        "zipf_counts": counts,
        "mode": "placeholder slots, mixed batches" if plain is not None else "ordinary manager, one call per set",
        "no_lora": base, "no_lora_again": base2, "lora": lora, **slots_mode,
        "throughput_ratio": round(lora["images_per_s"] / base_ips, 4),
        "cold_load_ms": {"n": len(loads), "p50": round(1000 * statistics.median(loads), 2) if loads else None,
                         "p95": round(1000 * (p95(loads) or 0), 2)},
        "warm_switch_ms": {"n": len(switches),
                           "p50": round(1000 * statistics.median(switches), 2) if switches else None,
                           "p95": round(1000 * (p95(switches) or 0), 2)},
        "slot_loads": server.loras.loads, "slot_unloads": server.loras.unloads,
        "targets": {"throughput_ratio_min": 0.9, "warm_switch_p95_ms_max": 200},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--adapters", type=int, default=None, help="distinct adapters (default 20; tiny 5)")
    ap.add_argument("--rank", type=int, default=None, help="LoRA rank (default 32; tiny 4)")
    ap.add_argument("--lora-scale", type=float, default=0.01, help="lora_B is multiplied by this (random B at "
                    "full size would swamp the image; the FLOPs are the same)")
    ap.add_argument("--slots", type=int, default=8, help="lora.max_adapters_per_replica")
    ap.add_argument("--hotswap-rank", type=int, default=None, help="lora.hotswap_target_rank: placeholder slots "
                    "and mixed-adapter batches (must be >= --rank); default: the ordinary manager")
    ap.add_argument("--requests", type=int, default=None, help="images per run (default 160; tiny 24)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--batch", type=int, default=None, help="max_batch_size (default 8; tiny 4)")
    ap.add_argument("--zipf-s", type=float, default=1.1)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    a.size = a.size or (64 if a.tiny else 1024)
    a.steps = a.steps or (2 if a.tiny else 30)
    a.adapters = a.adapters or (5 if a.tiny else 20)
    a.rank = a.rank or (4 if a.tiny else 32)
    a.requests = a.requests or (24 if a.tiny else 160)
    a.batch = a.batch or (4 if a.tiny else 8)
    if a.hotswap_rank is not None and a.hotswap_rank < a.rank:
        ap.error(f"--hotswap-rank {a.hotswap_rank} is below the adapters' --rank {a.rank}")
    result = asyncio.run(bench(a))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("throughput_ratio", "cold_load_ms", "warm_switch_ms")}))


if __name__ == "__main__":
    main()
