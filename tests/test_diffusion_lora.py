"""LoRA adapters on one diffusion replica (deployments/diffusion/lora.py), on CPU with the tiny
SDXL model and the tiny random adapters `genserve models build-tiny` makes: weights, batching
with mixed adapter sets, eviction, and that tasks without adapters are untouched."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from deployments.adapters import DirAdapterSource, multiplexed_id
from deployments.diffusion.config import DiffusionModelConfig
from deployments.diffusion.server import DiffusionServer
from deployments.diffusion.types import ImageTask, LoraUse


@pytest.fixture(scope="module")
def adapters(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> DirAdapterSource:
    root = tmp_path_factory.mktemp("adapters")
    for name in ("ink", "neon", "moss"):  # ids as the registry would give them: any stable string here
        shutil.copytree(tiny_models_dir / "sdxl-tiny-loras" / name, root / f"ad_{name}")
    return DirAdapterSource(root)


def server(models: Path, adapters: DirAdapterSource, slots: int = 4, batch: int = 4) -> DiffusionServer:
    return DiffusionServer(DiffusionModelConfig(
        name="tiny", family="sdxl", model=str(models / "sdxl-tiny"), device="cpu", native_resolution=64,
        size_multiple=8, min_side=32, max_side=128, default_steps=2, max_steps=8,
        batching={"max_batch_size": batch, "batch_wait_timeout_s": 0.05},
        lora={"max_adapters_per_replica": slots}), adapters=adapters)


def task(seed: int = 7, *loras: tuple[str, float]) -> ImageTask:
    return ImageTask(prompt="a red cube", negative_prompt="", seed=seed, width=64, height=64, steps=2,
                     guidance_scale=5.0, loras=tuple(LoraUse(f"ad_{n}", w) for n, w in loras))


HELD: dict[tuple[int, str], object] = {}  # what Serve's multiplexed LRU holds (never evicting, here)


async def run(s: DiffusionServer, t: ImageTask) -> bytes:
    """What DiffusionDeployment does per request: hold the task's adapter set, then generate."""
    if t.loras:
        mid = multiplexed_id([u.adapter_id for u in t.loras])
        if (id(s), mid) not in HELD:
            HELD[id(s), mid] = await s.stage_adapters(mid)
    return (await s.generate(t)).png


async def test_weights_sets_and_base_images(tiny_models_dir: Path, adapters: DirAdapterSource) -> None:
    s = server(tiny_models_dir, adapters)
    base = await run(s, task())  # before any adapter was loaded: what a replica that never loaded one draws
    ink = await run(s, task(7, ("ink", 1.0)))
    neon = await run(s, task(7, ("neon", 1.0)))
    assert len({base, ink, neon}) == 3, "each adapter changes the image, differently"
    assert await run(s, task(7, ("ink", 0.0))) == base, "weight 0 is the base image"
    assert await run(s, task(7, ("ink", 0.5))) not in (base, ink)
    both = await run(s, task(7, ("ink", 1.0), ("neon", 0.7)))
    assert both not in (base, ink, neon)
    # Loaded adapters, disabled: pixel-identical to the base image; the same set again: the same PNG.
    assert await run(s, task()) == base
    assert await run(s, task(7, ("ink", 1.0))) == ink
    assert sorted(s.loras.loaded()) == ["ad_ink", "ad_neon"]  # type: ignore[union-attr]


async def test_mixed_sets_in_one_batch_match_running_alone(tiny_models_dir: Path, adapters: DirAdapterSource) -> None:
    s = server(tiny_models_dir, adapters, batch=8)
    sets = [(), (("ink", 1.0),), (("neon", 0.8),), (("ink", 0.3), ("moss", 1.0))]
    alone = [await run(s, task(11, *ls)) for ls in sets]
    for i in range(2):  # every set twice in one burst: the batcher mixes them, groups split them
        results = await asyncio.gather(*(s.generate(task(11, *ls)) for ls in sets * 2))  # sets held by run()
        batched = [r.png for r in results]
        assert batched[:4] == alone and batched[4:] == alone, f"round {i}"
        assert max(r.batch_size for r in results) > 1, "the burst never shared a batch: the test proves nothing"
    assert len(set(alone)) == 4


async def test_eviction_with_two_slots_stays_correct(tiny_models_dir: Path, adapters: DirAdapterSource) -> None:
    s = server(tiny_models_dir, adapters, slots=2)
    first = {n: await run(s, task(3, (n, 1.0))) for n in ("ink", "neon", "moss")}
    assert s.loras is not None and len(s.loras.loaded()) == 2 and s.loras.unloads >= 1
    again = {n: await run(s, task(3, (n, 1.0))) for n in ("ink", "moss", "neon", "ink")}
    assert again == first
    base = await run(s, task(3))
    fresh = server(tiny_models_dir, adapters)
    assert await run(fresh, task(3)) == base
    # Three adapters in one image need three slots: refused before any pipeline work.
    with pytest.raises(ValueError, match="max_adapters_per_replica"):
        await s.generate(task(3, ("ink", 1.0), ("neon", 1.0), ("moss", 1.0)))


async def test_evicted_set_is_fetched_again_when_its_task_runs(tiny_models_dir: Path,
                                                               adapters: DirAdapterSource) -> None:
    s = server(tiny_models_dir, adapters, slots=2)
    ink = await run(s, task(5, ("ink", 1.0)))
    HELD.pop((id(s), "ad_ink")).__del__()  # Serve evicted the set (it calls __del__): the staged copy goes
    assert s.loras is not None and "ad_ink" not in s.loras._staged
    assert (await s.generate(task(5, ("ink", 1.0)))).png == ink


async def test_model_without_adapter_source_refuses_loras(tiny_models_dir: Path) -> None:
    s = DiffusionServer(DiffusionModelConfig(
        name="tiny", family="sdxl", model=str(tiny_models_dir / "sdxl-tiny"), device="cpu", native_resolution=64,
        size_multiple=8, min_side=32, max_side=128, default_steps=2, max_steps=8))
    with pytest.raises(ValueError, match="serves no LoRA adapters"):
        await s.generate(task(1, ("ink", 1.0)))
