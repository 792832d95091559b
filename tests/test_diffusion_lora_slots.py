"""Placeholder slots for compiled engines (deployments/diffusion/lora_slots.py, issue 21): with
`lora.hotswap_target_rank`, every slot holds a zero LoRA from the start, adapters are written into
it in place, and a slot a request doesn't use runs at weight 0. On CPU with the tiny SDXL, not
compiled (what compiling changes is measured by benchmarks/lora_compile_hotswap.py); the eager
replica without hotswap is the reference for every pixel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from adapter_files import lora_tensors

from deployments.adapters import AdapterIncompatible, DirAdapterSource
from deployments.diffusion.config import DiffusionModelConfig
from deployments.diffusion.server import DiffusionServer
from deployments.diffusion.tiny import save_adapter, tiny_sdxl_lora, tiny_sdxl_te_lora
from tests.test_diffusion_lora import server, task
from tests.test_diffusion_lora_te import run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
RANK = 8


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> DirAdapterSource:
    """ink/neon: rank 4 on the attention projections (inside the default targets); wide: rank 4
    on proj_in (outside them); te_only: text-encoder weights alone; big: rank 16 > RANK."""
    root = tmp_path_factory.mktemp("slot-adapters")
    for seed, name in enumerate(("ad_ink", "ad_neon"), start=1):
        save_adapter(root / name, *tiny_sdxl_lora(seed=seed))
    cfg, te = tiny_sdxl_te_lora(seed=5)
    save_adapter(root / "ad_te_only", cfg, {k: v for k, v in te.items() if not k.startswith("unet.")})
    save_adapter(root / "ad_wide", {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["proj_in"]},
                 lora_tensors(4, modules=("down_blocks.1.attentions.0.proj_in",), dims=(32, 32)))
    save_adapter(root / "ad_big", *tiny_sdxl_lora(seed=3, rank=16))
    return DirAdapterSource(root)


def slot_server(models: Path, adapters: DirAdapterSource, slots: int = 2, **lora: object) -> DiffusionServer:
    return DiffusionServer(DiffusionModelConfig(
        name="tiny", family="sdxl", model=str(models / "sdxl-tiny"), device="cpu", native_resolution=64,
        size_multiple=8, min_side=32, max_side=128, default_steps=2, max_steps=8,
        lora={"max_adapters_per_replica": slots, "hotswap_target_rank": RANK, **lora}), adapters=adapters)


def lora_params(s: DiffusionServer) -> dict[str, torch.Tensor]:
    return {n: p for n, p in s.engine.pipeline.unet.named_parameters() if ".lora_" in n}


async def test_placeholders_are_there_from_the_start_and_draw_the_base(tiny_models_dir: Path,
                                                                       adapters: DirAdapterSource) -> None:
    s = slot_server(tiny_models_dir, adapters)
    params = lora_params(s)
    # 4 projections x 2 attentions (attn1, attn2) per transformer block, 2 slots, lora_A + lora_B.
    blocks = sum(1 for n, _ in s.engine.pipeline.unet.named_modules() if n.endswith("attn1"))
    assert len(params) == blocks * 2 * 4 * 2 * 2
    assert all(p.shape[0 if ".lora_A." in n else 1] == RANK and not p.any() for n, p in params.items())
    plain = DiffusionServer(DiffusionModelConfig(  # a replica that never had a LoRA layer
        name="tiny", family="sdxl", model=str(tiny_models_dir / "sdxl-tiny"), device="cpu", native_resolution=64,
        size_multiple=8, min_side=32, max_side=128, default_steps=2, max_steps=8))
    assert plain.loras is None
    for seed in (3, 4):
        assert await run(s, task(seed)) == await run(plain, task(seed)), "placeholder slots change the base image"


async def test_adapters_written_into_slots_match_an_eager_replica(tiny_models_dir: Path,
                                                                  adapters: DirAdapterSource) -> None:
    eager, hot = server(tiny_models_dir, adapters), slot_server(tiny_models_dir, adapters)
    storage = {n: p.data_ptr() for n, p in lora_params(hot).items()}
    base = await run(eager, task(6))
    for loras in ((("ink", 1.0),), (("neon", 0.6),), (("ink", 0.7), ("neon", 1.0)), (), (("neon", 1.0),),
                  (("ink", 0.0),)):
        got = await run(hot, task(6, *loras))
        assert got == await run(eager, task(6, *loras)), loras
        assert (got == base) == (not any(w for _, w in loras)), loras
    # Written in place: the same parameters (nothing for a compiled UNet to see as new), all slots active.
    assert {n: p.data_ptr() for n, p in lora_params(hot).items()} == storage
    q = hot.engine.pipeline.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_q")
    assert q.active_adapters == ["slot0", "slot1"] and not q.disable_adapters
    assert all(isinstance(v, torch.Tensor) for v in q.scaling.values())
    assert hot.loras is not None and hot.loras.loads == 2


async def test_eviction_puts_the_placeholder_back(tiny_models_dir: Path, adapters: DirAdapterSource) -> None:
    s = slot_server(tiny_models_dir, adapters, slots=1)
    base = await run(s, task(2))
    ink = await run(s, task(2, ("ink", 1.0)))
    neon = await run(s, task(2, ("neon", 1.0)))  # one slot: ink is evicted, neon written over it
    assert len({base, ink, neon}) == 3 and s.loras is not None and s.loras.loaded() == ["ad_neon"]
    for held in s.__dict__["_test_held"].values():  # Serve evicts both sets: the next group frees the slot
        held.__del__()
    s.__dict__["_test_held"].clear()
    assert await run(s, task(2)) == base
    assert s.loras.loaded() == [] and s.loras.unloads == 2
    assert not any(p.any() for p in lora_params(s).values()), "the evicted adapter's weights are still in the slot"
    assert await run(s, task(2, ("ink", 1.0))) == ink  # and the slot takes an adapter again


async def test_adapters_the_placeholder_cannot_hold_are_refused_when_staged(tiny_models_dir: Path,
                                                                            adapters: DirAdapterSource) -> None:
    s = slot_server(tiny_models_dir, adapters)
    before = {n: p.clone() for n, p in lora_params(s).items()}
    for aid, words in (("ad_wide", "outside this model's lora.hotswap_target_modules"),
                       ("ad_te_only", "has no UNet weights"),
                       ("ad_big", "rank 16, more than this model's lora.hotswap_target_rank \\(8\\)"),
                       ("ad_ink+ad_wide", "outside")):
        with pytest.raises(AdapterIncompatible, match=words):
            await s.stage_adapters(aid)
    assert s.loras is not None and s.loras.stats()["lora_staged"] == 0 and not s.loras._holds
    assert all(torch.equal(p, before[n]) for n, p in lora_params(s).items())
    # The same adapter is fine on a replica whose placeholder covers proj_in.
    wide = slot_server(tiny_models_dir, adapters, hotswap_target_modules=["to_q", "proj_in"])
    assert await run(wide, task(1, ("wide", 1.0))) == await run(server(tiny_models_dir, adapters), task(1, ("wide", 1.0)))
    with pytest.raises(AdapterIncompatible, match="to_k"):  # ink targets to_k, which that one doesn't cover
        await wide.stage_adapters("ad_ink")


def test_target_modules_are_checked(tiny_models_dir: Path, adapters: DirAdapterSource) -> None:
    with pytest.raises(ValueError, match=r"\['to_qq'\] match no UNet layer"):
        slot_server(tiny_models_dir, adapters, hotswap_target_modules=["to_q", "to_qq"])
    with pytest.raises(ValueError, match="to_out'.*ModuleList"):
        slot_server(tiny_models_dir, adapters, hotswap_target_modules=["to_out"])
    for bad in ([], ["to_q", "to_q"], [".to_q"], [""]):
        with pytest.raises(ValueError, match="hotswap_target_modules"):
            DiffusionModelConfig(name="m", family="sdxl", model="x", lora={"hotswap_target_rank": 8,
                                                                           "hotswap_target_modules": bad})
    default = DiffusionModelConfig(name="m", family="sdxl", model="x", lora={"hotswap_target_rank": 8})
    assert default.lora.hotswap_target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
