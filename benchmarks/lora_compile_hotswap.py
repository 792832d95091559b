"""Does a compiled SDXL engine hot-swap LoRA adapters without recompiling? (issue 21, docs/lora.md)

Runs genserve's real order on CPU with the tiny SDXL (inductor, mode "default", no CUDA graphs):
`DiffusionServer` loads the engine, `optimize.apply` compiles the split UNet and the warm-up
compiles the size bucket, then `LoraManager` calls `enable_lora_hotswap`; requests then load
adapters into one slot. Each step reports the Dynamo frames compiled during it (0 = no
recompile) and the recompile reasons Dynamo logged. No timing claims: compile counts only.

    python -m benchmarks.lora_compile_hotswap [--out benchmarks/results/lora_compile_hotswap.json]
"""

from __future__ import annotations

import argparse
import asyncio
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
        lora={"max_adapters_per_replica": 1, "hotswap_target_rank": 8})

    def frames() -> int:
        return int(dyn_utils.counters["frames"]["ok"])

    rows: list[dict[str, Any]] = []
    n0 = frames()
    server = DiffusionServer(config, adapters=DirAdapterSource(work))
    rows.append({"step": "engine load + warm-up (compile) + LoraManager(enable_lora_hotswap)",
                 "frames_compiled": frames() - n0})
    held: dict[str, Any] = {}

    async def request(label: str, loras: tuple[tuple[str, float], ...]) -> None:
        for aid, _ in loras:
            if aid not in held:
                held[aid] = await server.stage_adapters(aid)
        before, n_reasons = frames(), len(reasons.lines)
        task = ImageTask(prompt="a red cube", negative_prompt="", seed=1, width=32, height=32, steps=2,
                         guidance_scale=5.0, loras=tuple(LoraUse(a, w) for a, w in loras))
        await server.generate(task)
        rows.append({"step": label, "frames_compiled": frames() - before,
                     "recompile_reasons": reasons.lines[n_reasons:][:12]})

    async def scenario() -> None:
        await request("no adapter", ())
        await request("ad_a w=1.0 (first load into slot0: hotswap=False)", (("ad_a", 1.0),))
        await request("ad_a w=1.0 again", (("ad_a", 1.0),))
        await request("ad_a w=0.5 (weight change)", (("ad_a", 0.5),))
        await request("ad_b w=1.0 (hotswap into slot0)", (("ad_b", 1.0),))
        await request("ad_a w=1.0 (hotswap back)", (("ad_a", 1.0),))
        await request("no adapter (disable_lora)", ())
        await request("ad_a w=1.0 (enable again)", (("ad_a", 1.0),))
        await request("ad_te w=1.0 (UNet hotswap + text encoders reloaded)", (("ad_te", 1.0),))
        await request("ad_b w=1.0 (hotswap)", (("ad_b", 1.0),))

    asyncio.run(scenario())
    result = {"torch": torch.__version__, "device": "cpu", "compile": "default", "rows": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
