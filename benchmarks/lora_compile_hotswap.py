"""Does a compiled SDXL engine hot-swap LoRA adapters without recompiling? (issue 21, docs/lora.md)

Runs genserve's real order on CPU with the tiny SDXL (inductor, mode "default", no CUDA graphs):
`DiffusionServer` loads the engine (`optimize.apply` wraps the split UNet for compiling), then
`LoraManager` fills both slots with zero placeholder adapters (deployments/diffusion/lora_slots.py),
then the warm-up compiles the size bucket with them; requests then write adapters into the slots,
use them alone and together, run without them, and share one call with different adapter sets
(mixed-adapter batches). Each step reports the Dynamo frames compiled
during it (0 = no recompile) and the recompile reasons Dynamo logged. No timing claims: compile
counts only. The result before the placeholders (main at b38166b: the first adapter per slot
recompiled the UNet) is benchmarks/results/lora_compile_hotswap_cpu_before.json.

    python -m benchmarks.lora_compile_hotswap [--out benchmarks/results/lora_compile_hotswap.json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class _Reasons(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # "Recompiling function X ... triggered by the following guard failure(s): - 1/0: <reason>"
        self.lines += [line.strip()[:300] for line in record.getMessage().splitlines() if line.strip().startswith("-")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=os.path.join(os.environ.get("GENSERVE_WORK", ".work"), "models"))
    ap.add_argument("--out", default="")
    ap.add_argument("--reference", action="store_true",
                    help="only the reference: the same request on a compiled replica without LoRA (no placeholder "
                    "layers); its png_sha256 should equal the no-adapter rows' of the main run")
    args = ap.parse_args()

    import torch
    import torch._dynamo.utils as dyn_utils

    from deployments.adapters import DirAdapterSource
    from deployments.diffusion.config import DiffusionModelConfig
    from deployments.diffusion.server import DiffusionServer
    from deployments.diffusion.tiny import save_adapter, tiny_sdxl_lora, tiny_sdxl_te_lora
    from deployments.diffusion.types import ImageTask, LoraUse

    torch._logging.set_logs(recompiles=True)
    reasons = _Reasons()
    logging.getLogger("torch._dynamo").addHandler(reasons)

    work = Path(tempfile.mkdtemp(prefix="lora-compile-"))
    cfg, te_weights = tiny_sdxl_te_lora(seed=5)
    save_adapter(work / "ad_te", cfg, te_weights)
    for i, name in enumerate(("ad_a", "ad_b"), start=1):
        save_adapter(work / name, *tiny_sdxl_lora(seed=i))
    config = DiffusionModelConfig(
        name="tiny", family="sdxl", model=str(Path(args.models) / "sdxl-tiny"), device="cpu", native_resolution=64,
        size_multiple=8, min_side=32, max_side=128, default_steps=2, max_steps=8,
        optimize={"compile": "default", "buckets": ["32x32"], "warmup_batch_sizes": [1],
                  "cache_dir": str(work / "cache")},
        lora={"enabled": False} if args.reference else {"max_adapters_per_replica": 2, "hotswap_target_rank": 8})

    def frames() -> int:
        return int(dyn_utils.counters["frames"]["ok"])

    rows: list[dict[str, Any]] = []
    n0 = frames()
    server = DiffusionServer(config, adapters=DirAdapterSource(work))
    rows.append({"step": "engine load + warm-up (compile), no LoRA" if args.reference else
                 "engine load + LoraManager (2 placeholder slots) + warm-up (compile)",
                 "frames_compiled": frames() - n0})
    held: dict[str, Any] = {}

    async def request(label: str, loras: tuple[tuple[str, float], ...]) -> None:
        for aid, _ in loras:
            if aid not in held:
                held[aid] = await server.stage_adapters(aid)
        before, n_reasons = frames(), len(reasons.lines)
        task = ImageTask(prompt="a red cube", negative_prompt="", seed=1, width=32, height=32, steps=2,
                         guidance_scale=5.0, loras=tuple(LoraUse(a, w) for a, w in loras))
        png = (await server.generate(task)).png
        # The image's hash: requests with the same adapters and weights (or none) must draw the same
        # pixels, e.g. every no-adapter row the first one's.
        rows.append({"step": label, "frames_compiled": frames() - before,
                     "png_sha256": hashlib.sha256(png).hexdigest()[:12],
                     "recompile_reasons": reasons.lines[n_reasons:][:12]})

    def mixed(label: str, sets: list[tuple[tuple[str, float], ...]]) -> None:
        """One engine call with a task per adapter set: placeholder slots run them as one pipeline
        call (per-row weights, lora_rows.py), at another batch size than the warm-up's."""
        before, n_reasons = frames(), len(reasons.lines)
        tasks = [ImageTask(prompt="a red cube", negative_prompt="", seed=1, width=32, height=32, steps=2,
                           guidance_scale=5.0, loras=tuple(LoraUse(a, w) for a, w in loras)) for loras in sets]
        images = server.engine.generate_images(tasks)
        rows.append({"step": label, "frames_compiled": frames() - before,
                     "group_sizes": [im.info.get("genserve_batch_size") for im in images],
                     "recompile_reasons": reasons.lines[n_reasons:][:12]})

    async def scenario() -> None:
        await request("no adapter", ())
        await request("ad_a w=1.0 (first adapter into slot0's placeholder)", (("ad_a", 1.0),))
        await request("ad_a w=1.0 again", (("ad_a", 1.0),))
        await request("ad_a w=0.5 (weight change)", (("ad_a", 0.5),))
        await request("no adapter after an adapter (slots at weight 0)", ())
        await request("ad_b w=1.0 (first adapter into slot1's placeholder)", (("ad_b", 1.0),))
        await request("ad_a + ad_b (two slots in one image)", (("ad_a", 0.7), ("ad_b", 1.0)))
        await request("ad_te w=1.0 (written over LRU ad_a; text encoders loaded)", (("ad_te", 1.0),))
        await request("ad_a w=1.0 (written back over LRU ad_b)", (("ad_a", 1.0),))
        await request("ad_b w=1.0 (written over ad_te; its text-encoder layers deleted)", (("ad_b", 1.0),))
        for aid in list(held):  # Serve's LRU evicts every set: the next group puts the placeholders back
            held.pop(aid).__del__()
        await request("no adapter after eviction (placeholders back)", ())
        await request("ad_a w=1.0 (into a cleared slot)", (("ad_a", 1.0),))
        held["ad_b"] = await server.stage_adapters("ad_b")
        mixed("mixed batch: ad_a, none, ad_b w=0.5 in one call", [(("ad_a", 1.0),), (), (("ad_b", 0.5),)])
        mixed("mixed batch: other weights and size (4 images)",
              [(("ad_b", 1.0),), (("ad_a", 0.3), ("ad_b", 0.6)), (), (("ad_a", 0.9),)])

    asyncio.run(request("reference: no adapter, compiled replica without LoRA layers", ()) if args.reference
                else scenario())
    result = {"torch": torch.__version__, "device": "cpu", "compile": "default", "rows": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
