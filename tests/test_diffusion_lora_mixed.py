"""Mixed-adapter batches in placeholder-slot mode (deployments/diffusion/lora_rows.py, issue 21):
tasks with different adapter sets share one pipeline call, each UNet row weighing the slots its
task uses. On CPU with the tiny SDXL, not compiled.

Tolerance: with batch invariance (the CPU default) every task's rows run as their own UNet call, so
a task's image must equal its image alone bit for bit. Without it (what a GPU replica runs), one
call computes all rows and CPU kernels round differently by batch size (hooks.per_task_calls), so
those images are compared as 8-bit pixels at most 2 levels apart (the same bound the fused-q/k/v
tests use); an adapter moves the tiny model's pixels by far more (asserted), so a row that got
another row's weights cannot pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deployments.adapters import DirAdapterSource
from deployments.diffusion.config import DiffusionModelConfig
from deployments.diffusion.engine import BATCH_SIZE, GenerationCancelled
from deployments.diffusion.server import DiffusionServer
from deployments.diffusion.tiny import save_adapter, tiny_sdxl_lora, tiny_sdxl_te_lora
from deployments.diffusion.types import ImageTask
from tests.test_diffusion_lora import task

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
RANK = 8
TOLERANCE = 2  # 8-bit levels, batched without batch invariance


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> DirAdapterSource:
    root = tmp_path_factory.mktemp("mixed-adapters")
    for seed, name in enumerate(("ad_a", "ad_b", "ad_c"), start=1):
        save_adapter(root / name, *tiny_sdxl_lora(seed=seed))
    save_adapter(root / "ad_te", *tiny_sdxl_te_lora(seed=5))
    return DirAdapterSource(root)


def make(models: Path, adapters: DirAdapterSource, *, slots: int = 4, rank: int | None = RANK,
         invariant: bool = True) -> DiffusionServer:
    s = DiffusionServer(DiffusionModelConfig(
        name="tiny", family="sdxl", model=str(models / "sdxl-tiny"), device="cpu", native_resolution=64,
        size_multiple=8, min_side=32, max_side=128, default_steps=2, max_steps=8, batch_invariant=invariant,
        lora={"max_adapters_per_replica": slots, "hotswap_target_rank": rank}), adapters=adapters)
    assert s.loras is not None
    for aid in ("ad_a", "ad_b", "ad_c", "ad_te"):
        s.loras.stage((aid,))  # what Serve's multiplexed loader does before the task arrives
    return s


def pixels(image: Image.Image | Exception) -> np.ndarray:
    assert isinstance(image, Image.Image), image
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def generate(s: DiffusionServer, tasks: list[ImageTask], **kw: object) -> list[Image.Image | Exception]:
    return s.engine.generate_images(tasks, **kw)  # type: ignore[arg-type]


BATCH = [task(21, ("a", 1.0)), task(22), task(23, ("b", 0.8)), task(24, ("a", 0.5)), task(25, ("a", 0.7), ("b", 1.0))]


def test_a_mixed_batch_is_one_call_and_each_image_equals_it_alone(tiny_models_dir: Path,
                                                                  adapters: DirAdapterSource) -> None:
    s = make(tiny_models_dir, adapters)
    batched = generate(s, BATCH)
    assert all(isinstance(im, Image.Image) and im.info[BATCH_SIZE] == len(BATCH) for im in batched), \
        "the adapter sets did not share one pipeline call"
    alone = [generate(s, [t])[0] for t in BATCH]
    for t, got, want in zip(BATCH, batched, alone, strict=True):
        assert np.array_equal(pixels(got), pixels(want)), t.loras
    # Alone, each equals the ordinary (eager, no placeholder) manager's image; the no-adapter row is
    # the base image of a replica that never had a LoRA layer.
    eager = make(tiny_models_dir, adapters, rank=None)
    for t, want in zip(BATCH, alone, strict=True):
        assert np.array_equal(pixels(generate(eager, [t])[0]), pixels(want)), t.loras
    plain = DiffusionServer(DiffusionModelConfig(
        name="tiny", family="sdxl", model=str(tiny_models_dir / "sdxl-tiny"), device="cpu", native_resolution=64,
        size_multiple=8, min_side=32, max_side=128, default_steps=2, max_steps=8))
    assert np.array_equal(pixels(batched[1]), pixels(plain.engine.generate_images([BATCH[1]])[0]))
    # The adapters do change the images (a row with another row's weights could not pass).
    base_a = pixels(generate(s, [task(21)])[0])
    assert np.abs(pixels(batched[0]) - base_a).max() > 10 * TOLERANCE


def test_without_batch_invariance_rows_weigh_their_own_adapters(tiny_models_dir: Path,
                                                                 adapters: DirAdapterSource) -> None:
    """One UNet call for all rows (the GPU path): the per-row weights themselves are exercised."""
    s = make(tiny_models_dir, adapters, invariant=False)
    batched = generate(s, BATCH)
    assert all(im.info[BATCH_SIZE] == len(BATCH) for im in batched)  # type: ignore[union-attr]
    alone = [pixels(generate(s, [t])[0]) for t in BATCH]
    for t, got, want in zip(BATCH, batched, alone, strict=True):
        assert np.abs(pixels(got) - want).max() <= TOLERANCE, t.loras
    # Same seed, different adapters: what a row with the wrong weights would look like is far off.
    wrong = pixels(generate(s, [task(21, ("b", 0.8))])[0])
    assert np.abs(wrong - alone[0]).max() > 10 * TOLERANCE


def test_the_union_of_adapters_must_fit_the_slots(tiny_models_dir: Path, adapters: DirAdapterSource) -> None:
    s = make(tiny_models_dir, adapters, slots=2)
    tasks = [task(31, ("a", 1.0)), task(32, ("b", 1.0)), task(33, ("c", 1.0)), task(34), task(35, ("a", 0.6))]
    batched = generate(s, tasks)
    # First fit in order: {a, b} takes tasks 0, 1, 3, 4; c runs on its own.
    assert [im.info[BATCH_SIZE] for im in batched] == [4, 4, 1, 4, 4]  # type: ignore[union-attr]
    for t, got in zip(tasks, batched, strict=True):
        assert np.array_equal(pixels(got), pixels(generate(s, [t])[0])), t.loras


def test_adapters_with_text_encoder_weights_keep_their_own_group(tiny_models_dir: Path,
                                                                 adapters: DirAdapterSource) -> None:
    """The text encoders run per prompt, not per row: such an adapter's set is its own group."""
    s = make(tiny_models_dir, adapters)
    tasks = [task(41, ("te", 1.0)), task(42, ("a", 1.0)), task(43), task(44, ("te", 1.0))]
    assert s.engine.group_key(tasks[0]) != s.engine.group_key(tasks[1]) == s.engine.group_key(tasks[2])
    batched = generate(s, tasks)
    assert [im.info[BATCH_SIZE] for im in batched] == [2, 2, 2, 2]  # type: ignore[union-attr]
    eager = make(tiny_models_dir, adapters, rank=None)
    for t, got in zip(tasks, batched, strict=True):
        assert np.array_equal(pixels(got), pixels(generate(eager, [t])[0])), t.loras
    # The ordinary manager keeps one adapter set per call.
    assert eager.engine.group_key(tasks[1]) != eager.engine.group_key(tasks[2])


def test_a_cancelled_task_leaves_and_the_others_keep_their_weights(tiny_models_dir: Path,
                                                                   adapters: DirAdapterSource) -> None:
    from dataclasses import replace

    s = make(tiny_models_dir, adapters, invariant=False)
    tasks = [replace(t, task_id=f"t{i}", steps=3) for i, t in enumerate(BATCH[:4])]
    stepped: list[int] = []

    def cancel(task_id: str) -> bool:  # t1 (no adapters) leaves after the first step
        return task_id == "t1" and len(stepped) >= 4

    out = generate(s, tasks, on_step=lambda tid, step, total: stepped.append(step), should_cancel=cancel)
    assert isinstance(out[1], GenerationCancelled)
    for j in (0, 2, 3):
        want = pixels(generate(s, [tasks[j]])[0])
        assert np.abs(pixels(out[j]) - want).max() <= TOLERANCE, tasks[j].loras
