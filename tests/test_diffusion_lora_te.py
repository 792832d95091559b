"""Text-encoder LoRAs (issue 21): SDXL LoRAs often carry weights for text_encoder and
text_encoder_2 besides the UNet. On CPU with the tiny SDXL, through the replica's real path
(`DiffusionServer` -> `LoraManager` -> `load_lora_weights`/`set_adapters`/`disable_lora`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deployments.adapters import DirAdapterSource
from deployments.diffusion.config import DiffusionModelConfig
from deployments.diffusion.server import DiffusionServer
from deployments.diffusion.tiny import save_adapter, tiny_sdxl_lora, tiny_sdxl_te_lora
from deployments.diffusion.types import ImageTask
from tests.test_diffusion_lora import server, task

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def te_adapters(tmp_path_factory: pytest.TempPathFactory) -> DirAdapterSource:
    """ad_te: UNet + both text encoders; ad_teunet: the same adapter's UNet part alone;
    ad_plain: another UNet-only adapter (the shape of the shipped tiny ones)."""
    root = tmp_path_factory.mktemp("te-adapters")
    cfg, weights = tiny_sdxl_te_lora(seed=5)
    assert {k.split(".")[0] for k in weights} == {"unet", "text_encoder", "text_encoder_2"}
    save_adapter(root / "ad_te", cfg, weights)
    save_adapter(root / "ad_teunet", cfg, {k: v for k, v in weights.items() if k.startswith("unet.")})
    save_adapter(root / "ad_plain", *tiny_sdxl_lora(seed=6))
    return DirAdapterSource(root)


async def run(s: DiffusionServer, t: ImageTask) -> bytes:
    """What DiffusionDeployment does per request: hold the task's adapter set (for the server's
    lifetime here: Serve never evicts), then generate."""
    if t.loras:
        held = s.__dict__.setdefault("_test_held", {})
        mid = "+".join(sorted(u.adapter_id for u in t.loras))
        if mid not in held:
            held[mid] = await s.stage_adapters(mid)
    return (await s.generate(t)).png


def hotswap_server(models: Path, adapters: DirAdapterSource) -> DiffusionServer:
    """One slot with `hotswap_target_rank` (what a compiled engine uses; not compiled here, the
    loading path is the same): every new adapter is hot-swapped into slot0."""
    return DiffusionServer(DiffusionModelConfig(
        name="tiny", family="sdxl", model=str(models / "sdxl-tiny"), device="cpu", native_resolution=64,
        size_multiple=8, min_side=32, max_side=128, default_steps=2, max_steps=8,
        lora={"max_adapters_per_replica": 1, "hotswap_target_rank": 8}), adapters=adapters)


def te_layers(pipeline: object, slot: str | None = None) -> dict[str, int]:
    """LoRA layers (lora_A entries) per text encoder, for one slot or any."""
    out = {}
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipeline, name)
        out[name] = sum(1 for m in encoder.modules() if hasattr(m, "lora_A")
                        for key in m.lora_A if slot is None or key == slot)
    return out


async def test_text_encoder_part_counts_weight_zero_is_base(tiny_models_dir: Path,
                                                             te_adapters: DirAdapterSource) -> None:
    s = server(tiny_models_dir, te_adapters)
    base = await run(s, task(7))
    te = await run(s, task(7, ("te", 1.0)))
    unet_only = await run(s, task(7, ("teunet", 1.0)))
    assert s.loras is not None
    assert te_layers(s.loras.pipeline, s.loras._loaded["ad_te"]) == {"text_encoder": 8, "text_encoder_2": 8}
    assert len({base, te, unet_only}) == 3, "the text-encoder part changes the image beyond the UNet part"
    assert await run(s, task(7, ("te", 0.0))) == base, "weight 0 (text encoders included) is the base image"
    assert await run(s, task(7)) == base


async def test_switching_leaves_no_text_encoder_weights_active(tiny_models_dir: Path,
                                                                te_adapters: DirAdapterSource) -> None:
    alone = {}
    for name in ("te", "plain"):  # each on a fresh replica that never saw the other
        alone[name] = await run(server(tiny_models_dir, te_adapters), task(9, (name, 0.8)))
    base = await run(server(tiny_models_dir, te_adapters), task(9))
    s = server(tiny_models_dir, te_adapters)
    for name in ("te", "plain", "te", "plain"):
        assert await run(s, task(9, (name, 0.8))) == alone[name], name
    assert await run(s, task(9)) == base
    both = await run(s, task(9, ("te", 0.8), ("plain", 0.8)))
    assert both not in alone.values()
    assert await run(s, task(9, ("plain", 0.8))) == alone["plain"]


async def test_unload_frees_the_text_encoders(tiny_models_dir: Path, te_adapters: DirAdapterSource) -> None:
    s = server(tiny_models_dir, te_adapters, slots=1)
    assert s.loras is not None
    base = await run(s, task(4))
    te = await run(s, task(4, ("te", 1.0)))
    assert te_layers(s.loras.pipeline)["text_encoder"] > 0
    plain = await run(s, task(4, ("plain", 1.0)))  # one slot: ad_te is evicted (delete_adapters)
    assert s.loras.loaded() == ["ad_plain"]
    assert te_layers(s.loras.pipeline) == {"text_encoder": 0, "text_encoder_2": 0}, "text encoders keep the LoRA"
    assert plain == await run(server(tiny_models_dir, te_adapters), task(4, ("plain", 1.0)))
    assert await run(s, task(4)) == base
    assert await run(s, task(4, ("te", 1.0))) == te  # loaded again into the same slot


async def test_hotswap_slot_swaps_text_encoder_weights_too(tiny_models_dir: Path,
                                                             te_adapters: DirAdapterSource) -> None:
    """diffusers refuses `hotswap=True` for text encoders, and a hot-swapped slot is never deleted:
    the manager swaps the UNet part in place and replaces the text-encoder part itself."""
    alone = {}
    for name in ("te", "plain"):
        alone[name] = await run(server(tiny_models_dir, te_adapters), task(2, (name, 1.0)))
    for order in (("plain", "te", "plain", "te"), ("te", "plain", "te")):
        s = hotswap_server(tiny_models_dir, te_adapters)
        assert s.loras is not None
        for name in order:
            assert await run(s, task(2, (name, 1.0))) == alone[name], order
            n = 8 if name == "te" else 0
            assert te_layers(s.loras.pipeline) == {"text_encoder": n, "text_encoder_2": n}
        assert s.loras.loads == len(order) and s.loras.unloads == len(order) - 1  # all in slot0


async def test_hotswap_weights_are_tensors_and_still_apply(tiny_models_dir: Path,
                                                            te_adapters: DirAdapterSource) -> None:
    """A compiled UNet recompiles for every distinct float in PEFT's `scaling` (measured with
    benchmarks/lora_compile_hotswap.py); with hotswap the manager keeps them as tensors, and the
    weights must still mean what they do on an eager replica."""
    eager, hot = server(tiny_models_dir, te_adapters), hotswap_server(tiny_models_dir, te_adapters)
    assert hot.loras is not None
    for loras in ((("plain", 1.0),), (("plain", 0.5),), (("te", 0.3),), (("plain", 0.0),), ()):
        assert await run(hot, task(8, *loras)) == await run(eager, task(8, *loras)), loras
        scalings = [v for m in hot.loras.pipeline.unet.modules() for v in getattr(m, "scaling", {}).values()]
        assert scalings and all(isinstance(v, torch.Tensor) for v in scalings)
    assert await run(hot, task(8, ("plain", 0.0))) == await run(hot, task(8))
