"""Style/character references through the tiny random IP-Adapter (CPU): tasks without references
keep their pixels, scale 0 equals no reference, the seed rule and cancellation with references,
the embedding cache, validation and config. (deployments/diffusion/ip_adapter.py)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from deployments.diffusion import tiny
from deployments.diffusion.config import DiffusionModelConfig, IPAdapterConfig
from deployments.diffusion.engine import DiffusionEngine, GenerationCancelled
from deployments.diffusion.types import ImageTask, InputImage, Reference
from tests.test_diffusion_img2img import INIT_A, INIT_B, noise_image

REF_A, REF_B = noise_image(21), noise_image(22)


def adapter_config(models: Path, **kw: object) -> IPAdapterConfig:
    return IPAdapterConfig(repo=str(models / tiny.IP_ADAPTER_DIR), subfolder=tiny.IP_ADAPTER_SUBFOLDER,
                           weight_name=tiny.IP_ADAPTER_WEIGHTS, style_blocks={"up": {"block_0": [0.0, 1.0]}},
                           **kw)  # type: ignore[arg-type]


@dataclass
class Loaded:
    engine: DiffusionEngine
    before: dict[str, np.ndarray]  # pixels of plain tasks before the adapter was loaded
    plain_procs: dict[str, object]


def task(seed: int = 7, refs: tuple[Reference, ...] = (), **kw: object) -> ImageTask:
    fields: dict = {"prompt": "a red cat", "negative_prompt": "", "width": 64, "height": 64, "steps": 3,
                    "guidance_scale": 5.0} | kw
    return ImageTask(seed=seed, references=refs, **fields)


PLAIN = {"txt2img": task(3), "img2img": task(3, init_image=INIT_A, strength=0.75), "no-cfg": task(4, guidance_scale=1.0)}


def pixels(image: object) -> np.ndarray:
    assert isinstance(image, Image.Image), image
    return np.array(image)


def one(engine: DiffusionEngine, t: ImageTask) -> np.ndarray:
    return pixels(engine.generate_images([t])[0])


@pytest.fixture(scope="module")
def loaded(tiny_models_dir: Path) -> Loaded:
    engine = DiffusionEngine.from_pretrained("sdxl-tiny", str(tiny_models_dir / "sdxl-tiny"), "sdxl")
    before = {k: one(engine, t) for k, t in PLAIN.items()}
    procs = dict(engine.pipeline.unet.attn_processors)
    engine.load_ip_adapter(adapter_config(tiny_models_dir))
    return Loaded(engine, before, procs)


def style(image: InputImage = REF_A, scale: float = 1.0) -> Reference:
    return Reference("style", image, scale)


def character(image: InputImage = REF_A, scale: float = 1.0) -> Reference:
    return Reference("character", image, scale)


def test_tasks_without_references_keep_their_pixels(loaded: Loaded) -> None:
    engine = loaded.engine
    for k, t in PLAIN.items():
        assert np.array_equal(one(engine, t), loaded.before[k]), k
    [ref] = engine.generate_images([task(3, (character(),))])  # the adapter on for one group...
    assert isinstance(ref, Image.Image)
    for k, t in PLAIN.items():  # ...and off again after it
        assert np.array_equal(one(engine, t), loaded.before[k]), k
    assert engine.pipeline.unet.attn_processors == loaded.plain_procs  # the very same processor objects
    assert engine.pipeline.unet.encoder_hid_proj is None


def test_references_change_the_image_and_scale_zero_is_none(loaded: Loaded) -> None:
    engine = loaded.engine
    plain = loaded.before["txt2img"]
    assert np.array_equal(one(engine, task(3, (style(scale=0.0),))), plain)
    assert np.array_equal(one(engine, task(3, (character(scale=0.0), style(REF_B, 0.0)))), plain)
    styled, char = one(engine, task(3, (style(),))), one(engine, task(3, (character(),)))
    assert not np.array_equal(styled, plain) and not np.array_equal(char, plain)
    assert not np.array_equal(styled, char)  # style acts on its blocks only (style_blocks)
    assert not np.array_equal(char, one(engine, task(3, (character(scale=0.4),))))  # the scale counts
    assert not np.array_equal(char, one(engine, task(3, (character(REF_B),))))  # and the image
    both = one(engine, task(3, (style(REF_B), character())))
    assert not np.array_equal(both, char)
    with_init = one(engine, task(3, (character(),), init_image=INIT_A, strength=0.75))
    assert not np.array_equal(with_init, loaded.before["img2img"])


def test_seed_rule_and_cancel_mid_batch_with_references(loaded: Loaded) -> None:
    """Same references in one group: batched equals alone; a task cancelled at step 1 leaves the
    batch (its rows of the image embeddings too) and the others stay bit-identical."""
    engine = loaded.engine
    refs = (style(REF_B, 0.7), character())
    tasks = [task(1, refs, task_id="a"), task(2, refs, prompt="a dog", task_id="b"), task(3, refs, task_id="c")]
    alone = [one(engine, t) for t in tasks]
    assert [pixels(im).tolist() for im in engine.generate_images(tasks)] == [a.tolist() for a in alone]
    rows: list[int] = []
    hook = engine.pipeline.unet.register_forward_pre_hook(lambda m, args: rows.append(int(args[0].shape[0])))
    try:
        out = engine.generate_images(tasks, should_cancel=lambda tid: tid == "b" and bool(rows))
    finally:
        hook.remove()
    assert isinstance(out[1], GenerationCancelled)
    assert np.array_equal(pixels(out[0]), alone[0]) and np.array_equal(pixels(out[2]), alone[2])
    assert rows == [6, 4, 4]


def test_embeddings_are_computed_once_per_image(loaded: Loaded) -> None:
    adapter = loaded.engine.references
    assert adapter is not None
    fresh = noise_image(99)
    misses = adapter.cache_misses
    loaded.engine.generate_images([task(1, (character(fresh),)), task(2, (character(fresh),))])
    loaded.engine.generate_images([task(3, (character(fresh),))])
    assert adapter.cache_misses == misses + 1
    first = adapter.embedding(fresh)
    assert adapter.embedding(fresh) is first
    adapter.config = adapter.config.model_copy(update={"embedding_cache": 1})  # bounded LRU
    try:
        adapter.embedding(noise_image(98))
        assert adapter.embedding(fresh) is not first  # evicted, computed again (same values)
        assert torch.equal(adapter.embedding(fresh)[0], first[0])
    finally:
        adapter.config = adapter.config.model_copy(update={"embedding_cache": 256})


def test_reference_validation_names_the_parameter(loaded: Loaded) -> None:
    engine = loaded.engine
    forged = InputImage(REF_A.png, INIT_B.sha256)
    with pytest.raises(ValueError, match=r"`references\[1\].image.sha256` does not match"):
        engine.validate(task(1, (style(), character(forged))))
    with pytest.raises(ValueError, match=r"`references\[0\].scale` has to be a finite number >= 0"):
        engine.validate(task(1, (style(scale=-1.0),)))
    with pytest.raises(ValueError, match=r"`references\[0\].kind` has to be one of"):
        engine.validate(task(1, (Reference("pose", REF_A, 1.0),)))  # type: ignore[arg-type]


def test_ip_adapter_config(tiny_models_dir: Path) -> None:
    base = {"name": "w", "family": "wuerstchen", "model": "x", "native_resolution": 1024, "size_multiple": 128}
    with pytest.raises(ValidationError, match="ip_adapter: the wuerstchen family has no IP-Adapter"):
        DiffusionModelConfig.model_validate({**base, "ip_adapter": {"repo": "r", "weight_name": "w.safetensors"}})
    with pytest.raises(ValidationError, match="weight_name"):
        IPAdapterConfig.model_validate({"repo": "r"})
    # A style_blocks map that does not fit the UNet fails at load, not at the first request.
    engine = DiffusionEngine.from_pretrained("s", str(tiny_models_dir / "sdxl-tiny"), "sdxl")
    bad = adapter_config(tiny_models_dir).model_copy(update={"style_blocks": {"up": {"block_0": [0.0, 1.0, 0.0]}}})
    with pytest.raises(ValueError):
        engine.load_ip_adapter(bad)
