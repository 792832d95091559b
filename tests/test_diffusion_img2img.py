"""img2img and inpainting on the tiny SDXL (CPU): shared weights, the seed rule with init images,
steps that run (strength), progress, cancellation mid-batch, validation, and Würstchen's refusal.
(deployments/diffusion/img2img.py, sdxl.py, engine.py)"""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deployments.diffusion import img2img
from deployments.diffusion.config import DiffusionModelConfig
from deployments.diffusion.engine import DiffusionEngine, GenerationCancelled
from deployments.diffusion.server import DiffusionServer
from deployments.diffusion.types import ImageResult, ImageTask, InputImage, Reference, WeightedPrompt


def png_input(image: Image.Image) -> InputImage:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    data = buf.getvalue()
    return InputImage(data, hashlib.sha256(data).hexdigest())


def noise_image(seed: int, size: tuple[int, int] = (64, 64)) -> InputImage:
    rng = np.random.default_rng(seed)
    return png_input(Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)))


def half_mask(size: tuple[int, int] = (64, 64)) -> InputImage:
    m = np.zeros((size[1], size[0]), np.uint8)
    m[:, size[0] // 2:] = 255  # repaint the right half
    return png_input(Image.fromarray(m))


INIT_A, INIT_B, MASK = noise_image(1), noise_image(2), half_mask()


@pytest.fixture(scope="module")
def sdxl(tiny_models_dir: Path) -> DiffusionEngine:
    return DiffusionEngine.from_pretrained("sdxl-tiny", str(tiny_models_dir / "sdxl-tiny"), "sdxl")


@pytest.fixture(scope="module")
def wuerstchen(tiny_models_dir: Path) -> DiffusionEngine:
    return DiffusionEngine.from_pretrained(
        "wuerstchen-tiny", str(tiny_models_dir / "wuerstchen-tiny"), "wuerstchen", decoder_steps=2)


def task(seed: int = 7, prompt: str = "a red cat", *, init: InputImage | None = INIT_A, strength: float = 0.75,
         steps: int = 4, **kw: object) -> ImageTask:
    fields: dict = {"negative_prompt": "", "guidance_scale": 5.0, "width": 64, "height": 64} | kw
    return ImageTask(prompt=prompt, seed=seed, steps=steps, init_image=init, strength=strength, **fields)


def pixels(image: object) -> np.ndarray:
    assert isinstance(image, Image.Image), image
    return np.array(image)


def one(engine: DiffusionEngine, t: ImageTask) -> np.ndarray:
    return pixels(engine.generate_images([t])[0])


def test_img2img_and_inpaint_share_the_loaded_weights(sdxl: DiffusionEngine) -> None:
    base = sdxl.pipeline
    i2i = img2img.pipeline_for(base, task())
    inpaint = img2img.pipeline_for(base, task(mask=MASK))
    assert type(i2i).__name__ == "StableDiffusionXLImg2ImgPipeline"
    assert type(inpaint).__name__ == "StableDiffusionXLInpaintPipeline"
    assert img2img.pipeline_for(base, task()) is i2i  # built once
    assert img2img.pipeline_for(base, task(init=None)) is base
    for pipe in (i2i, inpaint):
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            assert getattr(pipe, name) is getattr(base, name), name
        ptrs = {p.data_ptr() for p in pipe.unet.parameters()}
        assert ptrs == {p.data_ptr() for p in base.unet.parameters()}


def test_building_the_siblings_keeps_the_replicas_dtype(tiny_models_dir: Path) -> None:
    """diffusers' from_pipe casts to float32 unless told otherwise, and the weights are shared: the
    first img2img call once turned an fp16 replica's UNet, VAE and text encoders to float32 (every
    later request ~4x slower on an H100). No need to run the fp16 pipeline: the dtypes tell."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pretrained(str(tiny_models_dir / "sdxl-tiny"), torch_dtype=torch.float16)
    for t in (task(), task(mask=MASK)):
        sibling = img2img.pipeline_for(base, t)
        assert sibling.dtype == torch.float16
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert {p.dtype for p in getattr(base, name).parameters()} == {torch.float16}, name


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])  # with and without CFG's doubled batch
def test_seed_and_init_image_give_same_pixels_alone_and_batched(sdxl: DiffusionEngine, guidance_scale: float) -> None:
    tasks = [task(1, guidance_scale=guidance_scale), task(7, "a dog", init=INIT_B, guidance_scale=guidance_scale),
             task(1, init=INIT_B, guidance_scale=guidance_scale), task(3, guidance_scale=guidance_scale)]
    batch = [pixels(im) for im in sdxl.generate_images(tasks)]
    for t, in_batch in zip(tasks, batch, strict=True):
        assert np.array_equal(one(sdxl, t), in_batch), t
    assert not np.array_equal(batch[0], batch[2])  # same seed, other init image
    assert not np.array_equal(batch[0], batch[3])  # same init image, other seed


def test_inpaint_seed_rule_and_mask(sdxl: DiffusionEngine) -> None:
    tasks = [task(1, mask=MASK), task(2, "a dog", init=INIT_B, mask=MASK), task(3, mask=MASK)]
    batch = [pixels(im) for im in sdxl.generate_images(tasks)]
    for t, in_batch in zip(tasks, batch, strict=True):
        assert np.array_equal(one(sdxl, t), in_batch)
    assert not np.array_equal(batch[0], one(sdxl, task(1)))  # inpainting is not plain img2img
    assert batch[0].shape == (64, 64, 3)


def test_strength_and_init_image_change_the_image(sdxl: DiffusionEngine) -> None:
    plain = one(sdxl, task(5, init=None))
    low, high = one(sdxl, task(5, strength=0.5)), one(sdxl, task(5, strength=1.0))
    assert not np.array_equal(plain, low) and not np.array_equal(low, high)
    assert not np.array_equal(low, one(sdxl, task(5, strength=0.5, init=INIT_B)))
    # Multi-prompt weights reach the img2img pipeline too.
    parts = (WeightedPrompt("a red cat", 2.0), WeightedPrompt("green grass", -0.5))
    assert not np.array_equal(low, one(sdxl, task(5, strength=0.5, weighted_prompts=parts)))


def test_init_image_is_resized_to_the_task_size(sdxl: DiffusionEngine) -> None:
    wide, wide_mask = noise_image(3, (96, 48)), half_mask((96, 48))
    out = sdxl.generate_images([task(1, init=wide, width=64, height=32),
                                task(1, init=wide, mask=wide_mask, width=64, height=32)])
    assert [pixels(o).shape for o in out] == [(32, 64, 3), (32, 64, 3)]


@pytest.mark.parametrize(("steps", "strength", "runs"), [(4, 0.75, 3), (4, 0.5, 2), (10, 0.29, 2)])
def test_progress_counts_the_steps_that_run(sdxl: DiffusionEngine, steps: int, strength: float, runs: int) -> None:
    seen: list[tuple[str | None, int, int]] = []
    for t in (task(steps=steps, strength=strength, task_id="i"), task(steps=steps, strength=strength, mask=MASK,
                                                                      task_id="i")):
        seen.clear()
        assert sdxl.total_steps(t) == runs
        [image] = sdxl.generate_images([t], on_step=lambda *a: seen.append(a))
        assert isinstance(image, Image.Image)
        assert seen == [("i", s, runs) for s in range(1, runs + 1)]  # reaches 100 %


def cancel_at(engine: DiffusionEngine, tasks: list[ImageTask], victim: str,
              at: int) -> tuple[list[Image.Image | Exception], list[int], list[int]]:
    """Run `tasks`, cancelling `victim` once it reported step `at`: (results, the victim's steps,
    the rows of each UNet call)."""
    steps: list[int] = []
    rows: list[int] = []
    hook = engine.pipeline.unet.register_forward_pre_hook(lambda m, args: rows.append(int(args[0].shape[0])))
    try:
        out = engine.generate_images(
            tasks, on_step=lambda tid, step, total: steps.append(step) if tid == victim else None,
            should_cancel=lambda tid: tid == victim and len(steps) >= at)
    finally:
        hook.remove()
    return out, steps, rows


@pytest.mark.parametrize("inpaint", [False, True])
def test_randomized_cancel_mid_batch_leaves_the_others_identical(sdxl: DiffusionEngine, inpaint: bool) -> None:
    """A task cancelled at a random step of an img2img/inpaint batch gets GenerationCancelled; the
    others finish bit-identical to lone runs. img2img drops the cancelled rows at the next step;
    inpainting keeps them (its per-row init latents can't be shrunk: img2img.can_drop_rows)."""
    rng = random.Random(20)
    mask = MASK if inpaint else None
    tasks = [task(11, task_id="t0", mask=mask), task(12, "a dog", init=INIT_B, task_id="t1", mask=mask),
             task(13, task_id="t2", mask=mask)]
    alone = [one(sdxl, t) for t in tasks]
    runs = sdxl.total_steps(tasks[0])  # int(4 * 0.75) = 3
    for _ in range(2):
        victim, at = rng.randrange(3), rng.randrange(1, runs)
        out, steps, rows = cancel_at(sdxl, tasks, f"t{victim}", at)
        assert isinstance(out[victim], GenerationCancelled) and f"step {at} of {runs}" in str(out[victim])
        assert steps == list(range(1, at + 1))
        for j in range(3):
            if j != victim:
                assert np.array_equal(pixels(out[j]), alone[j]), (victim, at, j)
        expect = [6] * runs if inpaint else [6] * at + [4] * (runs - at)  # rows per UNet call (CFG: 2 per task)
        assert rows == expect


def test_validation_names_the_parameter(sdxl: DiffusionEngine) -> None:
    for strength in (0.0, 1.5, float("nan"), -0.1):
        with pytest.raises(ValueError, match=r"`strength` has to be a number in \(0, 1\]"):
            sdxl.validate(task(strength=strength))
    with pytest.raises(ValueError, match=r"`strength` \(0.2\) x `steps` \(4\) leaves no denoising step"):
        sdxl.validate(task(strength=0.2))
    with pytest.raises(ValueError, match="`mask` needs an image to edit"):
        sdxl.validate(task(init=None, mask=MASK))
    with pytest.raises(ValueError, match=r"`mask` must have the size of the image \(64x64\) but is 32x32"):
        sdxl.validate(task(mask=half_mask((32, 32))))
    with pytest.raises(ValueError, match="`init_image` is not a readable image"):
        sdxl.validate(task(init=InputImage(b"not a png", "0" * 64)))
    with pytest.raises(ValueError, match="`references`.*need an IP-Adapter.*'sdxl-tiny'"):
        sdxl.validate(task(references=(Reference("style", INIT_B, 0.5),)))
    sdxl.validate(task(references=(Reference("style", INIT_B, 0.0),)))  # scale 0: as if absent...
    [out] = sdxl.generate_images([task(init=None, references=(Reference("style", INIT_B, 0.0),))])
    assert isinstance(out, Image.Image)  # ...so it runs without an adapter too
    bad, good = sdxl.generate_images([task(strength=2.0), task()])
    assert isinstance(bad, ValueError) and isinstance(good, Image.Image)


@pytest.mark.parametrize(("field", "value", "param"), [
    ("init_image", INIT_A, "image (init_image, --iw)"), ("mask", MASK, "mask"),
    ("references", (Reference("character", INIT_A, 1.0),), "references (--sref/--cref/--oref)")])
def test_wuerstchen_refuses_image_inputs(wuerstchen: DiffusionEngine, field: str, value: object, param: str) -> None:
    t = replace(task(init=None, width=128, height=128), **{field: value})
    with pytest.raises(ValueError) as info:
        wuerstchen.validate(t)
    assert str(info.value).startswith(f"`{param}` is not supported by model 'wuerstchen-tiny'")
    [out] = wuerstchen.generate_images([t])
    assert isinstance(out, ValueError)


def test_server_runs_img2img_with_progress_to_the_end(tiny_models_dir: Path) -> None:
    server = DiffusionServer(DiffusionModelConfig(
        name="i2i", family="sdxl", model=str(tiny_models_dir / "sdxl-tiny"), device="cpu", native_resolution=64,
        size_multiple=8, min_side=32, max_side=128, default_steps=2, max_steps=8))
    t = task(4, steps=4, strength=0.5, task_id="srv")

    async def run() -> list[object]:
        return [e async for e in server.generate_stream(t)]

    events = asyncio.run(run())
    assert events[:-1] == [{"step": 1, "total": 2}, {"step": 2, "total": 2}]
    result = events[-1]
    assert isinstance(result, ImageResult) and (result.width, result.height) == (64, 64)
    decoded = np.array(Image.open(io.BytesIO(result.png)).convert("RGB"))
    assert np.array_equal(decoded, one(server.engine, t))
