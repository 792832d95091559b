"""Partial images on a replica (deployments/diffusion/previews.py), on CPU with the tiny SDXL model and
its tiny TAESD-style decoder: which steps, what reaches the caller and in which order, that the
images themselves don't change, that a failing decoder never fails an image, and the config rules."""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from deployments.diffusion.config import DiffusionModelConfig
from deployments.diffusion.previews import preview_steps
from deployments.diffusion.progress import TaskProgress
from deployments.diffusion.types import ImageTask, PartialImage


def _config(models: Path, **update: object) -> DiffusionModelConfig:
    return DiffusionModelConfig.model_validate({
        "name": "tiny", "family": "sdxl", "model": str(models / "sdxl-tiny"), "native_resolution": 64,
        "size_multiple": 8, "min_side": 32, "max_side": 128, "default_steps": 2, "max_steps": 8,
        "previews": {"vae": str(models / "taesd-tiny")}, **update})


@pytest.fixture(scope="module")
def engines(tiny_models_dir: Path):  # type: ignore[no-untyped-def]
    from deployments.diffusion.engine import DiffusionEngine

    with_previews = DiffusionEngine.from_config(_config(tiny_models_dir), "cpu")
    without = DiffusionEngine.from_config(_config(tiny_models_dir, previews=None), "cpu")
    return with_previews, without


def _task(task_id: str | None, seed: int, partial: int, steps: int = 8, **kw: object) -> ImageTask:
    size = {"width": 64, "height": 48, **kw}
    return ImageTask(prompt=f"a cat {seed}", negative_prompt="", seed=seed, steps=steps, guidance_scale=5.0,
                     task_id=task_id, partial_images=partial, **size)  # type: ignore[arg-type]


def test_preview_steps_are_evenly_spaced_and_never_the_last() -> None:
    assert preview_steps(30, 3) == (8, 15, 22)
    assert preview_steps(8, 2) == (3, 5)
    assert preview_steps(8, 1) == (4,)
    assert preview_steps(2, 3) == (1,)  # a 2-step loop has one step that isn't the final image
    assert preview_steps(1, 3) == () and preview_steps(30, 0) == ()


def _collect(engine, tasks, **kw):  # type: ignore[no-untyped-def]
    got: list[tuple[str, PartialImage]] = []
    lock = threading.Lock()

    def on_preview(task_id: str, p: PartialImage) -> None:
        with lock:
            got.append((task_id, p))

    images = engine.generate_images(tasks, on_preview=on_preview, **kw)
    for task in tasks:  # what the runner does before it returns an image: wait for its previews
        if task.task_id:
            asyncio.run(engine.previews.flush(task.task_id))
    return images, got


def test_previews_reach_the_caller_and_leave_the_images_unchanged(engines) -> None:  # type: ignore[no-untyped-def]
    engine, plain = engines
    tasks = [_task("a", 1, 3), _task("b", 2, 0), _task("c", 3, 2), _task(None, 4, 3)]
    images, got = _collect(engine, tasks)
    by_task: dict[str, list[PartialImage]] = {}
    for task_id, p in got:
        by_task.setdefault(task_id, []).append(p)
    # Only tasks that asked (and have an id to deliver to), at the evenly spaced steps, in order.
    assert sorted(by_task) == ["a", "c"], sorted(by_task)
    assert [(p.index, p.step, p.total) for p in by_task["a"]] == [(0, 2, 8), (1, 4, 8), (2, 6, 8)]
    assert [(p.index, p.step) for p in by_task["c"]] == [(0, 3), (1, 5)]
    for p in by_task["a"] + by_task["c"]:
        decoded = Image.open(io.BytesIO(p.png))
        decoded.load()
        assert decoded.format == "PNG" and decoded.size == (64, 48) == (p.width, p.height)
        assert np.asarray(decoded).std() > 0  # a decoded picture, not a blank
    # Previews read the latents and change nothing: same pixels as a replica without a decoder.
    for a, b in zip(images, plain.generate_images(tasks), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_previews_are_downscaled_to_max_side(tiny_models_dir: Path) -> None:
    from deployments.diffusion.engine import DiffusionEngine

    engine = DiffusionEngine.from_config(_config(tiny_models_dir, previews={
        "vae": str(tiny_models_dir / "taesd-tiny"), "max_side": 32}), "cpu")
    _, got = _collect(engine, [_task("s", 5, 1, width=128, height=64)])
    assert [(p.width, p.height) for _, p in got] == [(32, 16)]
    assert Image.open(io.BytesIO(got[0][1].png)).size == (32, 16)


def test_a_cancelled_task_gets_no_more_previews(engines) -> None:  # type: ignore[no-untyped-def]
    engine, _ = engines
    cancelled: set[str] = set()

    def on_step(task_id: str | None, step: int, total: int) -> None:
        if task_id == "x" and step == 3:
            cancelled.add("x")

    images, got = _collect(engine, [_task("x", 6, 3), _task("y", 7, 3)], on_step=on_step,
                           should_cancel=lambda t: t in cancelled)
    assert [p.step for t, p in got if t == "x"] == [2]  # step 4 and 6 came after it left the batch
    assert [p.step for t, p in got if t == "y"] == [2, 4, 6]
    assert type(images[0]).__name__ == "GenerationCancelled" and isinstance(images[1], Image.Image)


def test_a_failing_decoder_drops_previews_not_images(engines) -> None:  # type: ignore[no-untyped-def]
    engine, _ = engines
    previews = engine.previews
    failed_before = previews.failed

    def broken(latents):  # type: ignore[no-untyped-def]
        raise RuntimeError("decoder out of memory")

    previews._pixels = broken
    try:
        images, got = _collect(engine, [_task("f", 8, 2)])
    finally:
        del previews._pixels
    assert got == [] and previews.failed == failed_before + 2
    assert isinstance(images[0], Image.Image)


async def test_progress_streams_previews_before_the_result() -> None:
    progress = TaskProgress("m")
    release = asyncio.Event()

    async def run() -> str:
        await release.wait()
        return "image"

    events: list = []

    async def consume() -> None:
        async for e in progress.stream_steps("t", run()):
            events.append(e)

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0)
    partial = PartialImage(index=0, step=1, total=2, png=b"png", width=1, height=1)

    def engine_thread() -> None:
        progress.on_step("t", 1, 2)
        progress.on_preview("t", partial)

    t = threading.Thread(target=engine_thread)
    t.start()
    t.join()
    release.set()  # the result is ready at once: the events handed over before it still come first
    await consumer
    assert events == [{"step": 1, "total": 2}, partial, "image"], events


def test_previews_config_rules(tiny_models_dir: Path) -> None:
    with pytest.raises(ValidationError, match="previews: model 'w' is wuerstchen"):
        DiffusionModelConfig.model_validate({"name": "w", "family": "wuerstchen", "model": "x", "size_multiple": 128,
                                             "previews": {"vae": "madebyollin/taesd"}})
    with pytest.raises(ValidationError, match="max_side"):
        _config(tiny_models_dir, previews={"vae": "v", "max_side": 4})


def test_a_task_asking_for_more_than_three_partial_images_is_refused(engines) -> None:  # type: ignore[no-untyped-def]
    engine, _ = engines
    [out] = engine.generate_images([_task("z", 9, 4)])
    assert isinstance(out, ValueError) and "`partial_images` must be between 0 and 3, got 4" in str(out)
