"""Speed-ups for a loaded pipeline, chosen in config (`optimize:` of a diffusion model,
`OptimizeConfig` in deployments/diffusion/config.py).

Eager stays the default: compiling the SDXL UNet takes minutes per (batch, size) shape, which
matters more than per-image speed for autoscaled replicas that start often. Each option keeps the
arithmetic the same up to float rounding; the GPU benchmark reports the fidelity against eager on
the same seed (PSNR, max abs pixel difference).
"""

from __future__ import annotations

from typing import Any

import torch

from deployments.diffusion.config import OptimizeConfig


def _denoisers(pipeline: Any, family: str) -> list[tuple[Any, str]]:
    """(owner, attribute) of the modules that run every step."""
    if family == "sdxl":
        return [(pipeline, "unet")]
    return [(pipeline.prior_pipe, "prior"), (pipeline.decoder_pipe, "decoder")]


def apply(pipeline: Any, family: str, options: OptimizeConfig) -> Any:
    if not options.enabled:
        return pipeline
    if options.fuse_qkv and hasattr(pipeline, "fuse_qkv_projections"):
        pipeline.fuse_qkv_projections()  # one GEMM for q, k, v in self-attention
    for owner, attr in _denoisers(pipeline, family):
        module = getattr(owner, attr)
        if options.channels_last:
            module.to(memory_format=torch.channels_last)
        if options.compile != "none":
            setattr(owner, attr, torch.compile(module, mode=options.compile, fullgraph=False, dynamic=False))
    if family == "sdxl" and options.channels_last:
        pipeline.vae.to(memory_format=torch.channels_last)
    if family == "sdxl" and options.compile != "none":
        pipeline.vae.decode = torch.compile(pipeline.vae.decode, mode=options.compile, dynamic=False)
    return pipeline
