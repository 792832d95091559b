"""LoRA adapters with `optimize.fuse_qkv` (issue 21): diffusers' `fuse_qkv_projections` makes the
attention run one fused `to_qkv` Linear (self-attention) and `to_kv` (cross-attention), so LoRA
layers on `to_q/to_k/to_v` alone would never be called. The same adapter and seed must draw the
same image fused and unfused, in the ordinary manager and in placeholder-slot mode. On CPU with
the tiny SDXL.

Tolerance: fusing changes the GEMM shapes, so the float sums differ in rounding; images are compared
as decoded 8-bit pixels, at most 2 levels apart (measured: 0-1). An adapter moves the tiny model's
pixels by far more than that (asserted below), so an ignored q/k/v part cannot pass."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.adapters import AdapterIncompatible, DirAdapterSource
from deployments.diffusion.config import DiffusionModelConfig
from deployments.diffusion.lora_fused import compose
from deployments.diffusion.server import DiffusionServer
from deployments.diffusion.tiny import save_adapter, tiny_sdxl_lora, tiny_sdxl_te_lora
from tests.test_diffusion_ip_adapter import adapter_config, character
from tests.test_diffusion_lora import task
from tests.test_diffusion_lora_te import run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TOLERANCE = 2  # 8-bit levels
SETS = ((("full", 1.0),), (("qv", 0.7),), (("full", 0.6), ("qv", 1.0)), (), (("te", 1.0),), (("full", 0.0),))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> DirAdapterSource:
    """full: rank 4 on to_q/to_k/to_v/to_out.0; qv: rank 2 on to_q and to_v only, alpha 4 (scale 2,
    folded into lora_B), so a fused layer gets parts of uneven presence; te: UNet + text encoders."""
    root = tmp_path_factory.mktemp("fused-adapters")
    save_adapter(root / "ad_full", *tiny_sdxl_lora(seed=1))
    cfg, weights = tiny_sdxl_lora(seed=2, rank=2)
    qv = {k: v for k, v in weights.items() if ".to_k." not in k and ".to_out." not in k}
    save_adapter(root / "ad_qv", {**cfg, "lora_alpha": 4, "target_modules": ["to_q", "to_v"]}, qv)
    save_adapter(root / "ad_te", *tiny_sdxl_te_lora(seed=5))
    return DirAdapterSource(root)


def make(models: Path, adapters: DirAdapterSource, *, fuse: bool, rank: int | None,
         ip: bool = False) -> DiffusionServer:
    return DiffusionServer(DiffusionModelConfig(
        name="tiny", family="sdxl", model=str(models / "sdxl-tiny"), device="cpu", native_resolution=64,
        size_multiple=8, min_side=32, max_side=128, default_steps=2, max_steps=8,
        optimize={"fuse_qkv": fuse}, lora={"max_adapters_per_replica": 2, "hotswap_target_rank": rank},
        ip_adapter=adapter_config(models) if ip else None), adapters=adapters)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def gap(a: bytes, b: bytes) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


@pytest.mark.parametrize("rank", [None, 8], ids=["eager-manager", "placeholder-slots"])
async def test_fused_qkv_draws_the_unfused_image(tiny_models_dir: Path, adapters: DirAdapterSource,
                                                 rank: int | None) -> None:
    plain, fused = (make(tiny_models_dir, adapters, fuse=f, rank=rank) for f in (False, True))
    attn = fused.engine.pipeline.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0")
    assert attn.attn1.fused_projections and hasattr(attn.attn1, "to_qkv") and hasattr(attn.attn2, "to_kv")
    base = await run(plain, task(9))
    for loras in SETS:
        want, got = await run(plain, task(9, *loras)), await run(fused, task(9, *loras))
        assert gap(got, want) <= TOLERANCE, f"{loras}: fused differs from unfused by {gap(got, want)} levels"
        if any(w for _, w in loras):
            assert gap(want, base) > 10 * TOLERANCE, f"{loras} barely changes the image: the test proves nothing"


async def test_fused_placeholders_live_on_the_fused_layers(tiny_models_dir: Path, adapters: DirAdapterSource) -> None:
    s = make(tiny_models_dir, adapters, fuse=True, rank=8)
    unet = s.engine.pipeline.unet
    block = "mid_block.attentions.0.transformer_blocks.0"
    qkv, kv = unet.get_submodule(f"{block}.attn1.to_qkv"), unet.get_submodule(f"{block}.attn2.to_kv")
    assert qkv.lora_A["slot0"].weight.shape[0] == 3 * 8 and kv.lora_A["slot1"].weight.shape[0] == 2 * 8
    storage = {n: p.data_ptr() for n, p in unet.named_parameters() if ".lora_" in n}
    await run(s, task(1, ("full", 1.0)))
    await run(s, task(1, ("qv", 1.0)))
    await run(s, task(1, ("te", 0.5), ("full", 1.0)))  # evicts qv, written over its slot
    # Written in place, scales kept as tensors: nothing new for a compiled UNet.
    assert {n: p.data_ptr() for n, p in unet.named_parameters() if ".lora_" in n} == storage
    assert all(isinstance(v, torch.Tensor) for v in qkv.scaling.values())
    assert qkv.active_adapters == ["slot0", "slot1"]


@pytest.mark.parametrize("rank", [None, 8], ids=["eager-manager", "placeholder-slots"])
async def test_fused_qkv_with_ip_adapter_references(tiny_models_dir: Path, adapters: DirAdapterSource,
                                                    rank: int | None) -> None:
    """A reference turns the IP-Adapter's processors on, and they call a fused UNet's cross-attention
    to_k/to_v, not its to_kv: the adapter must be there too."""
    plain, fused = (make(tiny_models_dir, adapters, fuse=f, rank=rank, ip=True) for f in (False, True))
    for refs in ((character(),), ()):
        base = await run(plain, replace(task(4), references=refs))
        for loras in ((("full", 1.0),), (("qv", 0.5), ("full", 0.8))):
            t = replace(task(4, *loras), references=refs)
            want, got = await run(plain, t), await run(fused, t)
            assert gap(got, want) <= TOLERANCE, f"{loras} {refs}: fused differs from unfused by {gap(got, want)} levels"
            assert gap(want, base) > 10 * TOLERANCE


def test_compose_is_the_sum_of_the_parts() -> None:
    """B A x on the fused layer = the parts' B_p A_p x stacked in q, k, v order (zeros for a part
    the adapter lacks), packed (ordinary manager) or in fixed rank blocks (placeholder slots)."""
    g = torch.Generator().manual_seed(0)
    groups = {"a.to_qkv": [("a.to_q", 6), ("a.to_k", 5), ("a.to_v", 4)]}
    sd = {"unet.a.to_q.lora_A.weight": torch.randn(2, 7, generator=g), "unet.a.to_q.lora_B.weight": torch.randn(6, 2, generator=g),
          "unet.a.to_v.lora_A.weight": torch.randn(3, 7, generator=g), "unet.a.to_v.lora_B.weight": torch.randn(4, 3, generator=g),
          "unet.a.to_out.0.lora_A.weight": torch.randn(2, 7, generator=g)}
    x = torch.randn(7, generator=g)
    want = torch.cat([sd[f"unet.a.to_{p}.lora_B.weight"] @ sd[f"unet.a.to_{p}.lora_A.weight"] @ x if p != "k"
                      else torch.zeros(5) for p in "qkv"])
    for block, rank in ((None, 5), (4, 12)):
        out = compose("ad_x", sd, groups, block_rank=block)
        a, b = out["unet.a.to_qkv.lora_A.weight"], out["unet.a.to_qkv.lora_B.weight"]
        assert a.shape == (rank, 7) and b.shape == (15, rank)
        torch.testing.assert_close(b @ (a @ x), want, rtol=1e-5, atol=1e-5)
        assert all(torch.equal(out[k], v) for k, v in sd.items()), "the separate layers keep their LoRA"
    assert compose("ad_x", sd, {}) == sd
    for extra in ("unet.a.to_k.lora_magnitude_vector", "unet.a.to_v.lora_B.bias", "unet.a.to_qkv.lora_A.weight"):
        with pytest.raises(AdapterIncompatible, match=f"'{extra}' can't be composed.*optimize.fuse_qkv"):
            compose("ad_x", {**sd, extra: torch.zeros(4)}, groups)
    with pytest.raises(AdapterIncompatible, match="to_q.lora_B"):  # lora_A without its lora_B
        compose("ad_x", {k: v for k, v in sd.items() if k != "unet.a.to_q.lora_B.weight"}, groups)


def test_fused_projection_as_a_hotswap_target_is_refused(tiny_models_dir: Path, adapters: DirAdapterSource) -> None:
    with pytest.raises(ValueError, match="fused projection .*attn1.to_qkv.*list to_q/to_k/to_v instead"):
        DiffusionServer(DiffusionModelConfig(
            name="tiny", family="sdxl", model=str(tiny_models_dir / "sdxl-tiny"), device="cpu", native_resolution=64,
            size_multiple=8, min_side=32, max_side=128, optimize={"fuse_qkv": True},
            lora={"hotswap_target_rank": 4, "hotswap_target_modules": ["to_q", "to_qkv"]}), adapters=adapters)
