"""DiffusionEngine on the tiny models (CPU): batching, seeds, weights, tiling, progress, and PNG
results through `png.image_result` (the one builder the deployment uses)."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.diffusion.engine import BATCH_SIZE, COMPUTE_S, DiffusionEngine, GenerationCancelled
from deployments.diffusion.png import encode_png, image_result
from deployments.diffusion.types import ImageResult, ImageTask, WeightedPrompt


@pytest.fixture(scope="module")
def sdxl(tiny_models_dir: Path) -> DiffusionEngine:
    return DiffusionEngine.from_pretrained("sdxl-tiny", str(tiny_models_dir / "sdxl-tiny"), "sdxl")


@pytest.fixture(scope="module")
def wuerstchen(tiny_models_dir: Path) -> DiffusionEngine:
    return DiffusionEngine.from_pretrained(
        "wuerstchen-tiny", str(tiny_models_dir / "wuerstchen-tiny"), "wuerstchen", decoder_steps=2
    )


def task(seed: int = 7, prompt: str = "a red cat", size: int = 64, **kw: object) -> ImageTask:
    fields: dict = {"negative_prompt": "", "steps": 2, "guidance_scale": 5.0} | kw
    return ImageTask(prompt=prompt, seed=seed, width=size, height=size, **fields)


def pixels(image: object) -> np.ndarray:
    assert isinstance(image, Image.Image), image
    return np.array(image)


def one(engine: DiffusionEngine, t: ImageTask) -> np.ndarray:
    return pixels(engine.generate_images([t])[0])


def generate(engine: DiffusionEngine, tasks: list[ImageTask]) -> list[ImageResult | Exception]:
    """Denoise, then build each result the way the deployment does (`png.image_result`)."""
    return [img if isinstance(img, Exception) else image_result(
        t, img, model=engine.name, batch_size=int(img.info[BATCH_SIZE]), compute_s=float(img.info[COMPUTE_S]))
        for t, img in zip(tasks, engine.generate_images(tasks), strict=True)]


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])  # with and without CFG's doubled batch
def test_seed_gives_same_pixels_alone_and_in_batch_sdxl(sdxl: DiffusionEngine, guidance_scale: float) -> None:
    tasks = [
        task(1, "a dog", guidance_scale=guidance_scale),
        task(7, guidance_scale=guidance_scale),
        task(3, "x", negative_prompt="blurry", guidance_scale=guidance_scale),
        task(4, guidance_scale=guidance_scale),
    ]
    batch = [pixels(img) for img in sdxl.generate_images(tasks)]
    for t, in_batch in zip(tasks, batch, strict=False):
        assert np.array_equal(one(sdxl, t), in_batch), t
    assert not np.array_equal(batch[1], batch[3])  # other seed, same prompt


def test_seed_gives_same_pixels_alone_and_in_batch_wuerstchen(wuerstchen: DiffusionEngine) -> None:
    alone = one(wuerstchen, task(7, size=128))
    batch = wuerstchen.generate_images(
        [task(1, "a dog", 128), task(7, size=128), task(3, "x", 128), task(4, size=128)]
    )
    assert np.array_equal(alone, pixels(batch[1]))
    assert not np.array_equal(alone, pixels(batch[3]))


def test_groups_mixed_sizes_and_steps_in_input_order(sdxl: DiffusionEngine) -> None:
    tasks = [task(1), task(2, size=32), task(3, steps=3), task(4), task(5, size=48)]
    results = generate(sdxl, tasks)
    assert all(isinstance(r, ImageResult) for r in results), results
    assert [(r.width, r.height, r.steps, r.seed) for r in results] == [  # type: ignore[union-attr]
        (64, 64, 2, 1), (32, 32, 2, 2), (64, 64, 3, 3), (64, 64, 2, 4), (48, 48, 2, 5)
    ]
    assert [r.batch_size for r in results] == [2, 1, 1, 2, 1]  # type: ignore[union-attr]
    assert all(r.compute_s > 0 and r.model == "sdxl-tiny" for r in results)  # type: ignore[union-attr]
    last = Image.open(io.BytesIO(results[3].png))  # type: ignore[union-attr]
    assert np.array_equal(np.array(last.convert("RGB")), one(sdxl, task(4)))


def test_per_task_negative_prompts_in_one_group(sdxl: DiffusionEngine) -> None:
    a, b = sdxl.generate_images([task(5, negative_prompt="blurry"), task(5, negative_prompt="")])
    assert not np.array_equal(pixels(a), pixels(b))
    assert np.array_equal(pixels(a), one(sdxl, task(5, negative_prompt="blurry")))


def test_multi_prompt_weights(sdxl: DiffusionEngine) -> None:
    plain = one(sdxl, task(9, "a red cat"))
    # One part: sum(w*e)/sum(w) is that part's embedding whatever its weight.
    single = one(sdxl, task(9, "a red cat", weighted_prompts=(WeightedPrompt("a red cat", 2.0),)))
    assert np.array_equal(plain, single)
    parts = (WeightedPrompt("a red cat", 2.0), WeightedPrompt("green grass", -0.5))
    mixed = one(sdxl, task(9, "a red cat::2 green grass::-0.5", weighted_prompts=parts))
    assert not np.array_equal(plain, mixed)
    flipped = (WeightedPrompt("a red cat", -0.5), WeightedPrompt("green grass", 2.0))
    assert not np.array_equal(mixed, one(sdxl, task(9, weighted_prompts=flipped)))


def test_multi_prompt_weights_wuerstchen(wuerstchen: DiffusionEngine) -> None:
    plain = one(wuerstchen, task(9, "a red cat", 128))
    parts = (WeightedPrompt("a red cat", 1.0), WeightedPrompt("a blue sky", 1.0))
    assert not np.array_equal(plain, one(wuerstchen, task(9, size=128, weighted_prompts=parts)))


def test_weights_summing_to_zero_are_rejected(sdxl: DiffusionEngine) -> None:
    parts = (WeightedPrompt("a", 1.0), WeightedPrompt("b", -1.0))
    bad, good = sdxl.generate_images([task(1, weighted_prompts=parts), task(2)])
    assert isinstance(bad, ValueError) and "must sum to more than 0" in str(bad)
    assert isinstance(good, Image.Image)


def test_tile_changes_image_and_is_undone(sdxl: DiffusionEngine) -> None:
    before = one(sdxl, task(11))
    tiled = one(sdxl, task(11, tile=True))
    assert not np.array_equal(before, tiled)
    assert np.array_equal(before, one(sdxl, task(11)))
    modes = {m.padding_mode for m in sdxl.pipeline.unet.modules() if isinstance(m, torch.nn.Conv2d)}
    assert modes == {"zeros"}


def test_tile_wuerstchen(wuerstchen: DiffusionEngine) -> None:
    assert not np.array_equal(one(wuerstchen, task(11, size=128)), one(wuerstchen, task(11, size=128, tile=True)))


def test_progress_reports_every_step_for_every_task(sdxl: DiffusionEngine, wuerstchen: DiffusionEngine) -> None:
    seen: list[tuple[str | None, int, int]] = []
    sdxl.generate_images([task(1, task_id="a"), task(2)], on_step=lambda *a: seen.append(a))
    assert seen == [("a", 1, 2), (None, 1, 2), ("a", 2, 2), (None, 2, 2)]
    seen.clear()
    wuerstchen.generate_images([task(1, size=128, task_id="w")], on_step=lambda *a: seen.append(a))
    assert seen == [("w", s, 4) for s in (1, 2, 3, 4)]  # 2 prior + 2 decoder steps


@pytest.mark.parametrize("family", ["sdxl", "wuerstchen"])
def test_cancel_stops_the_group_early(family: str, sdxl: DiffusionEngine, wuerstchen: DiffusionEngine) -> None:
    engine, size = (sdxl, 64) if family == "sdxl" else (wuerstchen, 128)
    steps: list[int] = []
    results = engine.generate_images(
        [task(1, size=size, steps=4, task_id="job"), task(2, size=size, steps=4, task_id="job"),
         task(3, size=32 if family == "sdxl" else 256)],
        on_step=lambda tid, step, total: steps.append(step) if tid == "job" else None,
        should_cancel=lambda tid: tid == "job" and bool(steps),
    )
    assert steps == [1, 1]  # stopped after the first step, not 4 (or 6)
    assert all(isinstance(r, GenerationCancelled) for r in results[:2])
    assert isinstance(results[2], Image.Image)  # another group is unaffected


def test_cancel_does_not_stop_a_group_with_other_requests(sdxl: DiffusionEngine) -> None:
    steps: list[int] = []
    job, plain = sdxl.generate_images(
        [task(1, task_id="job"), task(2)],
        on_step=lambda tid, step, total: steps.append(step) if tid is None else None,
        should_cancel=lambda tid: True,
    )
    assert isinstance(job, GenerationCancelled)
    assert steps == [1, 2] and np.array_equal(pixels(plain), one(sdxl, task(2)))


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])  # with and without CFG's doubled rows
def test_cancelled_task_leaves_the_batch_at_the_next_step(sdxl: DiffusionEngine, guidance_scale: float) -> None:
    """A job cancelled mid-batch stops costing compute at the next step (its rows leave the
    denoiser's batch) while the others in the batch finish bit-identical to lone runs."""
    tasks = [task(1, task_id="job", steps=4, guidance_scale=guidance_scale),
             task(2, "a dog", steps=4, guidance_scale=guidance_scale),
             task(3, task_id="other", steps=4, guidance_scale=guidance_scale)]
    rows: list[int] = []  # rows the denoiser saw per step (one U-Net call per step)
    hook = sdxl.pipeline.unet.register_forward_pre_hook(lambda m, args: rows.append(int(args[0].shape[0])))
    steps: list[int] = []
    try:
        job, dog, other = sdxl.generate_images(
            tasks, on_step=lambda tid, step, total: steps.append(step) if tid == "job" else None,
            should_cancel=lambda tid: tid == "job" and bool(steps))
    finally:
        hook.remove()
    per_task = 2 if guidance_scale > 1 else 1
    assert rows == [3 * per_task] + [2 * per_task] * 3  # the cancelled row left after step 1
    assert isinstance(job, GenerationCancelled) and "step 1 of 4" in str(job) and steps == [1]
    assert np.array_equal(pixels(dog), one(sdxl, tasks[1]))
    assert np.array_equal(pixels(other), one(sdxl, tasks[2]))


def test_failing_group_does_not_sink_others(sdxl: DiffusionEngine) -> None:
    def on_step(task_id: str | None, step: int, total: int) -> None:
        if task_id == "boom":
            raise RuntimeError("disk on fire")

    bad, good = sdxl.generate_images([task(1, task_id="boom"), task(2, size=32)], on_step=on_step)
    assert isinstance(bad, RuntimeError) and "disk on fire" in str(bad)
    assert isinstance(good, Image.Image)
    sdxl.health()  # not a CUDA failure: the engine stays usable


def test_cuda_failure_marks_engine_unhealthy(tiny_models_dir: Path) -> None:
    engine = DiffusionEngine.from_pretrained("h", str(tiny_models_dir / "sdxl-tiny"), "sdxl")
    engine.health()

    def on_step(task_id: str | None, step: int, total: int) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    [result] = engine.generate_images([task(1)], on_step=on_step)
    assert isinstance(result, torch.cuda.OutOfMemoryError)
    with pytest.raises(RuntimeError, match="unusable.*CUDA out of memory"):
        engine.health()


def test_png_carries_generation_parameters_only_when_asked(sdxl: DiffusionEngine) -> None:
    t = task(42, "Ünïcödé 猫", negative_prompt="blurry", guidance_scale=6.5)
    [private] = generate(sdxl, [t])
    assert isinstance(private, ImageResult) and Image.open(io.BytesIO(private.png)).text == {}  # privacy default
    [result] = generate(sdxl, [replace(t, embed_metadata=True)])
    assert isinstance(result, ImageResult)
    image = Image.open(io.BytesIO(result.png))
    assert image.format == "PNG" and image.size == (64, 64)
    assert image.text == {
        "prompt": "Ünïcödé 猫", "negative_prompt": "blurry", "seed": "42", "steps": "2",
        "guidance_scale": "6.5", "model": "sdxl-tiny", "width": "64", "height": "64",
    }


def test_encode_png_is_lossless() -> None:
    source = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    decoded = Image.open(io.BytesIO(encode_png(source, {"seed": 1})))
    assert np.array_equal(np.array(decoded), np.array(source)) and decoded.text == {"seed": "1"}


def test_validation_messages(sdxl: DiffusionEngine, wuerstchen: DiffusionEngine) -> None:
    assert (sdxl.size_multiple, sdxl.min_size) == (8, 32)
    assert (wuerstchen.size_multiple, wuerstchen.min_size) == (128, 128)
    with pytest.raises(ValueError, match=r"^`width` and `height` have to be divisible by 8 for model 'sdxl-tiny' "
                                         r"but are 7 and 7\.$"):
        sdxl.validate(task(size=7))
    with pytest.raises(ValueError, match="must be between 32 and any size above for model 'sdxl-tiny' but are 16 and 16"):
        sdxl.validate(task(size=16))
    with pytest.raises(ValueError, match="divisible by 128 for model .wuerstchen-tiny. but are 64 and 64"):
        wuerstchen.validate(task(size=64))
    with pytest.raises(ValueError, match="`steps`"):
        sdxl.validate(task(steps=0))
    with pytest.raises(ValueError, match="`seed`"):
        sdxl.validate(task(seed=-1))
    with pytest.raises(ValueError, match=r"`seed` has to be an integer from 0 to 4294967295"):
        sdxl.validate(task(seed=2**32))  # one seed limit on both sides (rules.SEED_MAX), not 2**64 here
    with pytest.raises(ValueError, match="`guidance_scale`"):
        sdxl.validate(task(guidance_scale=float("nan")))
    bad, good = generate(sdxl, [task(1, size=7), task(2)])
    assert isinstance(bad, ValueError) and isinstance(good, ImageResult)


def test_wuerstchen_native_size_and_larger(wuerstchen: DiffusionEngine) -> None:
    small, wide = wuerstchen.generate_images([task(1, size=128), replace(task(2, size=128), width=256)])
    assert pixels(small).shape == (128, 128, 3) and pixels(wide).shape == (128, 256, 3)


def test_config_size_rules_must_lie_within_the_pipeline(sdxl: DiffusionEngine) -> None:
    """The model config's size rules (what the ingress checks) are the engine's too, once the engine
    has checked at load that its pipeline can draw every size they accept."""
    from deployments.diffusion.rules import SizeRules

    strict = DiffusionEngine("sdxl-tiny", sdxl.pipeline, "sdxl", size_rules=SizeRules(16, 32, 64))
    with pytest.raises(ValueError, match="divisible by 16"):
        strict.validate(task(size=40))
    with pytest.raises(ValueError, match="between 32 and 64"):
        strict.validate(task(size=128))
    with pytest.raises(ValueError, match=r"size_multiple \(4\) must be a multiple of 8"):
        DiffusionEngine("sdxl-tiny", sdxl.pipeline, "sdxl", size_rules=SizeRules(4, 32))
    with pytest.raises(ValueError, match=r"min_side \(16\) at least 32"):
        DiffusionEngine("sdxl-tiny", sdxl.pipeline, "sdxl", size_rules=SizeRules(8, 16))
