"""Speed-ups for a loaded pipeline, chosen in config (`optimize:` of a diffusion model,
`OptimizeConfig` in deployments/diffusion/config.py; measured effects in docs/optimize.md).

SDXL with compile or a draft tier: the UNet runs as three pieces (`unet_split.py`), each compiled
with a dynamic batch dimension, so one graph per size bucket serves every batch size; with
`reduce-overhead` / `max-autotune` each piece replays as a CUDA graph. The VAE's per-image decode is
compiled without CUDA graphs (it is a few large kernels; launch cost doesn't matter there).
Compiled code is cached on disk (`cache_dir`): a new replica on the same host loads it instead of
compiling. Everything but `fp8` and the draft tier keeps the arithmetic up to float rounding; the
GPU benchmark (benchmarks/engine_speed.py) reports the fidelity against eager on the same seeds.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deployments.diffusion import unet_split
from deployments.diffusion.buckets import Bucket, parse
from deployments.diffusion.config import OptimizeConfig

log = logging.getLogger(__name__)
_STATE = "_genserve_speed"
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass
class SpeedState:
    """What `sdxl.run` needs at call time: the size buckets and the draft tier."""

    options: OptimizeConfig
    buckets: list[Bucket] = field(default_factory=list)
    split: unet_split.SplitUNet | None = None


def state(pipeline: Any) -> SpeedState | None:
    return getattr(pipeline, _STATE, None)


def cache_dir(options: OptimizeConfig) -> Path:
    if options.cache_dir:
        return Path(options.cache_dir)
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    return Path(os.environ.get("GENSERVE_WORK", ".work")) / "compile-cache"


def configure_compile_cache(options: OptimizeConfig) -> Path:
    """Point Inductor's FX-graph/AOT and Triton caches at `cache_dir` (before the first compile)."""
    path = cache_dir(options).resolve()
    (path / "triton").mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    os.environ["TRITON_CACHE_DIR"] = str(path / "triton")
    import torch._functorch.config
    import torch._inductor.config as inductor

    inductor.fx_graph_cache = True
    inductor.autotune_local_cache = True
    torch._functorch.config.enable_autograd_cache = True
    inductor.conv_1x1_as_mm = True  # 1x1 convs (UNet skip/proj convs) as GEMMs: channels-last friendly
    # One graph per bucket and piece; don't let dynamo fall back to eager after its default 8.
    limit = max(64, 4 * len(options.buckets) + 8)
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))
    return path


def _denoisers(pipeline: Any, family: str) -> list[tuple[Any, str]]:
    """(owner, attribute) of the modules that run every step."""
    if family == "sdxl":
        return [(pipeline, "unet")]
    return [(pipeline.prior_pipe, "prior"), (pipeline.decoder_pipe, "decoder")]


def _fp8(module: torch.nn.Module) -> int:
    """float8 weights + dynamic per-row activation scales for the large linear layers (torchao).
    Returns the number of layers converted."""
    try:
        from torchao.quantization import PerRow, quantize_
    except ImportError as exc:
        raise RuntimeError("optimize.fp8 needs torchao (pip install torchao)") from exc
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig as Fp8
        config = Fp8(granularity=PerRow())
    except ImportError:  # older torchao
        from torchao.quantization import float8_dynamic_activation_float8_weight

        config = float8_dynamic_activation_float8_weight(granularity=PerRow())
    chosen: list[str] = []

    def wanted(m: torch.nn.Module, fqn: str) -> bool:
        # _scaled_mm wants both dims multiples of 16; tiny layers (time embeddings) don't gain.
        ok = (isinstance(m, torch.nn.Linear) and m.in_features % 16 == 0 and m.out_features % 16 == 0
              and m.in_features >= 512)
        if ok:
            chosen.append(fqn)
        return ok

    quantize_(module, config, filter_fn=wanted)
    return len(chosen)


def apply(pipeline: Any, family: str, options: OptimizeConfig) -> Any:
    if not options.enabled:
        return pipeline
    speed = SpeedState(options, [parse(b) for b in options.buckets])
    setattr(pipeline, _STATE, speed)
    if options.compiled:
        log.info("compile cache: %s", configure_compile_cache(options))
    if options.fuse_qkv and hasattr(pipeline, "fuse_qkv_projections"):
        # One GEMM for q, k, v in self-attention (k, v in cross-attention). Before any LoRA layer
        # exists: LoraManager, created after this, composes adapters onto the fused layers (lora_fused.py).
        pipeline.fuse_qkv_projections()
    if options.fp8:
        n = sum(_fp8(getattr(owner, attr)) for owner, attr in _denoisers(pipeline, family))
        log.info("fp8: %d linear layers", n)
    for owner, attr in _denoisers(pipeline, family):
        if options.channels_last:
            getattr(owner, attr).to(memory_format=torch.channels_last)
    if family == "sdxl":
        if options.compiled or options.draft.enabled:
            compile_fn = None
            if options.compiled:
                def compile_fn(f: Any) -> Any:
                    return torch.compile(f, mode=options.compile, fullgraph=False, dynamic=False)
            speed.split = unet_split.install(pipeline.unet, compile_fn)
            speed.split.cudagraphs = options.compile in _CUDAGRAPH_MODES
        vae = pipeline.vae
        if options.channels_last:
            vae.to(memory_format=torch.channels_last)
        if options.compiled:
            # `decode` (slicing, dtype up-cast) stays eager; the per-slice `_decode` is compiled.
            mode = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}.get(
                options.compile, options.compile)
            vae._decode = torch.compile(vae._decode, mode=mode, dynamic=False)
    elif options.compiled:
        for owner, attr in _denoisers(pipeline, family):
            setattr(owner, attr, torch.compile(getattr(owner, attr), mode=options.compile, fullgraph=False,
                                               dynamic=False))
    return pipeline
