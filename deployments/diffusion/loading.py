"""Load a diffusers pipeline from a hub id or a local directory through `from_pretrained`.

The same code loads `stabilityai/stable-diffusion-xl-base-1.0` on a GPU host and the tiny
random-weight models (see `tiny.py`) in tests.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import diffusers
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.deprecated import wuerstchen

Family = Literal["sdxl", "wuerstchen"]
FAMILIES: tuple[Family, ...] = ("sdxl", "wuerstchen")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DEVICES = ("cpu", "cuda")
# type[Any]: mypy resolves diffusers' lazy exports to its dummy placeholder classes (no from_pretrained).
_PIPELINE_CLASSES: dict[str, type[Any]] = {
    "sdxl": StableDiffusionXLPipeline,
    "wuerstchen": wuerstchen.WuerstchenCombinedPipeline,
}


def register_wuerstchen_model_classes() -> None:
    """Make the Würstchen model classes resolvable as `diffusers.<Name>`.

    diffusers 0.42 moved Würstchen to `diffusers.pipelines.deprecated.wuerstchen` but its
    `save_pretrained` still writes `["diffusers", "WuerstchenDiffNeXt"]` (and the same for
    WuerstchenPrior and PaellaVQModel) into model_index.json, and `from_pretrained` then fails with
    "`diffusers` has no class WuerstchenDiffNeXt". Loading looks components up as attributes of the
    `diffusers` module, so setting them there is enough. Idempotent.
    """
    for name in ("PaellaVQModel", "WuerstchenDiffNeXt", "WuerstchenPrior"):
        if not hasattr(diffusers, name):
            setattr(diffusers, name, getattr(wuerstchen, name))


def _looks_local(model_id_or_path: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else that is path-shaped is meant as a directory.
    return (
        os.path.exists(model_id_or_path)
        or model_id_or_path.startswith(("/", ".", "~"))
        or model_id_or_path.count("/") > 1
        or os.sep in model_id_or_path.replace("/", "")
    )


def _check_local_dir(path: Path) -> None:
    if not path.is_dir():
        raise ValueError(f"model path {str(path)!r} does not exist or is not a directory")
    if not (path / "model_index.json").is_file():
        raise ValueError(
            f"model path {str(path)!r} is not a diffusers pipeline directory (no model_index.json)"
        )


def load_pipeline(
    model_id_or_path: str,
    family: Family,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    variant: str | None = None,
) -> Any:
    """Load the `family` pipeline from a hub id or local dir, cast to `dtype`, moved to `device`.

    `variant` picks weight files such as `diffusion_pytorch_model.fp16.safetensors` (hub repos
    publish `"fp16"`). The progress bar is disabled: replicas report progress through callbacks.
    """
    if family not in _PIPELINE_CLASSES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if device.split(":")[0] not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES} (optionally 'cuda:N'), got {device!r}")

    source = model_id_or_path
    if _looks_local(model_id_or_path):
        local = Path(model_id_or_path).expanduser()
        _check_local_dir(local)
        source = str(local)
    if family == "wuerstchen":
        register_wuerstchen_model_classes()

    pipeline = _PIPELINE_CLASSES[family].from_pretrained(
        source, dtype=DTYPES[dtype], variant=variant, use_safetensors=True
    )
    pipeline = pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
