"""Adapter archives for tests: a zipped PEFT LoRA directory built from random tensors."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save


def lora_tensors(rank: int = 4, *, seed: int = 0, modules: tuple[str, ...] = ("down_blocks.1.attentions.0.proj_in",),
                 dims: tuple[int, int] = (32, 32), prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        out[f"{prefix}{m}.lora_A.weight"] = torch.randn(rank, dims[1], generator=g)
        out[f"{prefix}{m}.lora_B.weight"] = torch.randn(dims[0], rank, generator=g)
    return out


def peft_zip(tensors: dict[str, torch.Tensor] | None = None, *, config: dict[str, Any] | None = None,
             rank: int = 4, seed: int = 0, folder: str = "", extra: dict[str, bytes] | None = None) -> bytes:
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["proj_in"]}
    cfg.update(config or {})
    files = {"adapter_config.json": json.dumps(cfg).encode(),
             "adapter_model.safetensors": st_save(tensors if tensors is not None else lora_tensors(rank, seed=seed))}
    files.update(extra or {})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(folder + name, data)
    return buf.getvalue()


def zip_dir(d: Path) -> bytes:
    """An adapter directory (e.g. a tiny one from `genserve models build-tiny`) as the upload's zip:
    its `adapter_*` files under a folder named like it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(d.iterdir()):
            if f.name.startswith("adapter_"):
                zf.write(f, f"{d.name}/{f.name}")
    return buf.getvalue()
