"""The CPU-testable parts of `optimize`: the split UNet (exactness, draft reuse), size buckets
(snapping, the warm-up plan, config checks) and the compile cache settings. Compiling itself and
every timing are measured on a GPU (benchmarks/engine_speed.py), never here."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from deployments.diffusion import unet_split
from deployments.diffusion.buckets import SDXL_BUCKETS, parse, snap
from deployments.diffusion.config import DiffusionModelConfig, OptimizeConfig
from deployments.diffusion.engine import DiffusionEngine
from deployments.diffusion.optimize import configure_compile_cache, state
from deployments.diffusion.types import ImageTask
from deployments.diffusion.warmup import warm_up, warmup_plan


@dataclasses.dataclass(frozen=True)
class DraftTask(ImageTask):
    quality: str = "draft"  # what `quality: "draft"` on a request sets (tests/test_draft_tier.py)


def _task(cls: type = ImageTask, *, seed: int = 3, width: int = 64, height: int = 64, steps: int = 4,
          guidance_scale: float = 5.0) -> ImageTask:
    return cls(prompt="a red cube", negative_prompt="", seed=seed, width=width, height=height, steps=steps,
               guidance_scale=guidance_scale)


def _engine(tiny_models_dir: Path, **optimize: object) -> DiffusionEngine:
    return DiffusionEngine.from_pretrained("sdxl-tiny", str(tiny_models_dir / "sdxl-tiny"), "sdxl",
                                           optimize=OptimizeConfig(**optimize))


def _pixels(engine: DiffusionEngine, task: ImageTask) -> np.ndarray:
    (out,) = engine.generate_images([task])
    assert isinstance(out, Image.Image), out
    return np.asarray(out).astype(int)


# -- split UNet and the draft tier -----------------------------------------------------------------


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_split_unet_gives_the_same_pixels_as_the_whole_unet(tiny_models_dir: Path, guidance_scale: float) -> None:
    plain = _engine(tiny_models_dir)
    split = _engine(tiny_models_dir, draft={"cache_interval": 2})
    assert unet_split.installed(plain.pipeline.unet) is None
    assert unet_split.installed(split.pipeline.unet) is not None
    # two tasks in a batch with batch invariance on (CPU default): per-task calls through the split
    tasks = [_task(seed=3, guidance_scale=guidance_scale), _task(seed=4, guidance_scale=guidance_scale)]
    a = [np.asarray(i) for i in plain.generate_images(tasks)]
    b = [np.asarray(i) for i in split.generate_images(tasks)]
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    # per_task_calls shadowed the split's forward for the call and must have put it back
    s = unet_split.installed(split.pipeline.unet)
    assert split.pipeline.unet.forward == s.forward
    assert s.counts["reused"] == 0  # default quality never reuses


def test_draft_task_reuses_deep_features_between_full_steps(tiny_models_dir: Path) -> None:
    engine = _engine(tiny_models_dir, draft={"cache_interval": 2})
    split = unet_split.installed(engine.pipeline.unet)
    default = _pixels(engine, _task(steps=4))
    before = dict(split.counts)
    draft = _pixels(engine, _task(DraftTask, steps=4))
    # steps 0 and 2 in full, 1 and 3 reuse (one UNet call per step: batch of one task)
    assert split.counts["full"] - before["full"] == 2 and split.counts["reused"] - before["reused"] == 2
    assert np.abs(draft - default).max() > 0  # it is an approximation...
    assert (_pixels(engine, _task(steps=4)) == default).all()  # ...that leaves default quality alone
    assert split.cached == {} and split.draft_interval == 0


def test_draft_reuse_is_per_task_under_batch_invariance(tiny_models_dir: Path) -> None:
    """Per-task UNet calls (CPU) keep one cache slot per task: a draft batch of two gives each task
    the image it gets alone."""
    engine = _engine(tiny_models_dir, draft={"cache_interval": 3})
    assert engine.batch_invariant
    alone = [_pixels(engine, _task(DraftTask, seed=s)) for s in (5, 6)]
    together = [np.asarray(i).astype(int) for i in engine.generate_images([_task(DraftTask, seed=s) for s in (5, 6)])]
    assert all((a == t).all() for a, t in zip(alone, together, strict=True))


def test_draft_steps_fraction_runs_fewer_steps(tiny_models_dir: Path) -> None:
    engine = _engine(tiny_models_dir, draft={"cache_interval": 0, "steps_fraction": 0.5})
    assert unet_split.installed(engine.pipeline.unet) is not None
    split = unet_split.installed(engine.pipeline.unet)
    before = split.counts["full"]
    _pixels(engine, _task(DraftTask, steps=4))
    assert split.counts["full"] - before == 2 and split.counts["reused"] == 0


def test_unsupported_calls_fall_back_to_the_original_forward(tiny_models_dir: Path) -> None:
    import torch

    engine = _engine(tiny_models_dir, draft={"cache_interval": 2})
    unet = engine.pipeline.unet
    split = unet_split.installed(unet)
    before = dict(split.counts)
    sample = torch.randn(1, unet.config.in_channels, 8, 8)
    ehs = torch.randn(1, 77, unet.config.cross_attention_dim)
    cond = {"text_embeds": torch.randn(1, unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim),
            "time_ids": torch.zeros(1, 6)}
    with torch.no_grad():
        masked = unet(sample, 10, ehs, added_cond_kwargs=cond, encoder_attention_mask=torch.ones(1, 77)).sample
        plain = unet(sample, 10, ehs, added_cond_kwargs=cond).sample
    assert split.counts["full"] - before["full"] == 1  # only the unmasked call went through the split
    assert masked.shape == plain.shape


# -- buckets ---------------------------------------------------------------------------------------


def test_parse_and_snap() -> None:
    assert parse("1216x832") == (1216, 832)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse("1216*832")
    buckets = [parse(b) for b in SDXL_BUCKETS]
    assert snap(1024, 1024, buckets) == (1024, 1024)
    assert snap(1200, 840, buckets) == (1216, 832)  # nearest aspect and area
    assert snap(800, 1400, buckets) == (768, 1344)
    assert snap(512, 512, buckets) == (1024, 1024)  # only square bucket
    assert snap(512, 512, [(512, 512), (1024, 1024)]) == (512, 512)
    assert snap(724, 724, [(512, 512), (1024, 1024)]) == (512, 512)  # log-midway ties go to the smaller
    assert snap(300, 200, []) == (300, 200)  # no buckets: no snapping


def _config(**optimize: object) -> DiffusionModelConfig:
    return DiffusionModelConfig(name="m", family="sdxl", model="x", optimize=optimize,
                                batching={"max_batch_size": 8, "max_batch_megapixels": 4.2})


def test_warmup_plan() -> None:
    assert warmup_plan(_config(buckets=["1024x1024"])) == []  # no compile: nothing to warm
    assert warmup_plan(_config(compile="reduce-overhead", buckets=["1024x1024"], warmup=False)) == []
    # 4.2 MP budget: 4 images of 1024², 8 of 640x640 (capped by max_batch_size)
    assert warmup_plan(_config(compile="reduce-overhead", buckets=["1024x1024", "640x640"])) == [
        (1024, 1024, 1), (1024, 1024, 4), (640, 640, 1), (640, 640, 8)]
    assert warmup_plan(_config(compile="default", buckets=["1024x1024"], warmup_batch_sizes=[2, 6])) == [
        (1024, 1024, 2)]  # 6 is over the bucket's budget


@pytest.mark.parametrize(("buckets", "message"), [
    (["1000x1024"], "not a multiple of size_multiple"),
    (["2048x1024"], "outside min_side..max_side"),
    (["1536x1536"], "larger than batching.max_batch_megapixels"),
    (["big"], "WIDTHxHEIGHT"),
])
def test_config_rejects_bad_buckets(buckets: list[str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DiffusionModelConfig(name="m", family="sdxl", model="x", optimize={"buckets": buckets},
                             batching={"max_batch_megapixels": 2.0})


def test_config_draft_bounds() -> None:
    with pytest.raises(ValidationError):
        OptimizeConfig(draft={"cache_interval": 11})
    with pytest.raises(ValidationError):
        OptimizeConfig(warmup_batch_sizes=[0])
    assert not OptimizeConfig().draft.enabled and OptimizeConfig(draft={"cache_interval": 3}).draft.enabled


def test_request_between_buckets_runs_at_the_bucket_and_comes_back_at_its_size(tiny_models_dir: Path) -> None:
    plain = _engine(tiny_models_dir)
    bucketed = _engine(tiny_models_dir, buckets=["64x64", "96x64"])
    assert state(bucketed.pipeline).buckets == [(64, 64), (96, 64)]
    (img,) = bucketed.generate_images([_task(width=56, height=64)])
    assert img.size == (56, 64)
    at_bucket = plain.generate_images([_task(width=64, height=64)])[0]
    expected = at_bucket.resize((56, 64), Image.Resampling.LANCZOS)
    assert (np.asarray(img) == np.asarray(expected)).all()
    # a bucket size itself is generated as is
    assert (_pixels(bucketed, _task(width=96, height=64)) == _pixels(plain, _task(width=96, height=64))).all()


def test_warm_up_runs_each_bucket_and_the_draft_path(tiny_models_dir: Path) -> None:
    """The runner itself, on an eager engine (compiling is for the GPU): every planned run, plus one
    draft run per bucket that takes both the full and the reused path."""
    engine = _engine(tiny_models_dir, draft={"cache_interval": 2})
    config = DiffusionModelConfig(name="m", family="sdxl", model="x", size_multiple=8, native_resolution=64,
                                  min_side=32, batching={"max_batch_size": 2},
                                  optimize={"compile": "default", "buckets": ["64x64", "32x64"],
                                            "draft": {"cache_interval": 2}})
    split = unet_split.installed(engine.pipeline.unet)
    rows = warm_up(engine, config, steps=2)
    assert [(r["width"], r["height"], r["batch"], r["quality"]) for r in rows] == [
        (64, 64, 1, "default"), (64, 64, 1, "draft"), (64, 64, 2, "default"),
        (32, 64, 1, "default"), (32, 64, 1, "draft"), (32, 64, 2, "default")]
    assert split.counts["reused"] > 0


def test_compile_cache_goes_under_the_work_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setenv("GENSERVE_WORK", str(tmp_path))
    path = configure_compile_cache(OptimizeConfig(compile="default"))
    assert path == (tmp_path / "compile-cache").resolve()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(path)
    assert os.environ["TRITON_CACHE_DIR"] == str(path / "triton") and (path / "triton").is_dir()
    explicit = configure_compile_cache(OptimizeConfig(compile="default", cache_dir=str(tmp_path / "c")))
    assert explicit == (tmp_path / "c").resolve() and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(explicit)
