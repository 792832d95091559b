"""Typed prompt params → diffusion parameters: examples, properties, and doc/code agreement."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serve_app.prompts import mapping
from serve_app.prompts.mapping import (
    ImageSettings,
    ModelDefaults,
    chaos_guidance,
    guidance_for_stylize,
    negative_prompt,
    resolve_images,
    seed_for_image,
    size_for_aspect,
    steps_for_quality,
)
from serve_app.prompts.params import SEED_MAX, PromptParams, parse_prompt

DOC = Path(__file__).resolve().parents[1] / "docs" / "prompt-parameters.md"
SDXL = ModelDefaults(native_side=1024, multiple=64, steps=30, guidance=7.5)


def _table(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("|")]


def test_doc_table_matches_module_docstring() -> None:
    doc = DOC.read_text()
    section = re.search(
        r"<!-- mapping-table:start -->(.*)<!-- mapping-table:end -->", doc, re.DOTALL
    )
    assert section, "docs/prompt-parameters.md lost its mapping-table markers"
    assert mapping.__doc__ is not None
    assert _table(section.group(1)) == _table(mapping.__doc__)
    assert len(_table(mapping.__doc__)) == 16  # header, rule, 14 parameters


@pytest.mark.parametrize(
    ("ar", "native_side", "multiple", "max_side", "expected"),
    [
        ((1, 1), 1024, 64, None, (1024, 1024)),
        ((16, 9), 1024, 64, None, (1344, 768)),  # SDXL's own buckets
        ((3, 4), 1024, 64, None, (896, 1152)),
        ((3, 7), 1024, 64, None, (640, 1536)),
        ((4, 1), 1024, 64, None, (2048, 512)),
        ((4, 1), 1024, 64, 1536, (1536, 384)),
        ((16, 9), 64, 8, None, (88, 48)),  # tiny test models
        ((1, 4), 64, 8, None, (32, 128)),
        ((1, 4), 8, 8, None, (8, 16)),  # never below `multiple`
    ],
)
def test_size_examples(
    ar: tuple[int, int], native_side: int, multiple: int, max_side: int | None,
    expected: tuple[int, int],
) -> None:
    assert size_for_aspect(ar, native_side**2, multiple, max_side) == expected


RATIOS = st.tuples(st.integers(1, 1000), st.integers(1, 1000)).filter(
    lambda r: r[0] <= 4 * r[1] and r[1] <= 4 * r[0]
)


@given(RATIOS, st.integers(8, 2048), st.sampled_from([8, 16, 64]))
def test_size_keeps_pixels_and_multiples(ar: tuple[int, int], side: int, multiple: int) -> None:
    w, h = size_for_aspect(ar, side**2, multiple)
    assert w % multiple == 0 and h % multiple == 0
    assert w >= multiple and h >= multiple
    ideal_w = math.sqrt(side**2 * ar[0] / ar[1])
    ideal_h = math.sqrt(side**2 * ar[1] / ar[0])
    # Each side is the nearest multiple (or `multiple` itself when the ideal side is smaller).
    assert abs(w - ideal_w) <= multiple / 2 + 1e-9 or w == multiple
    assert abs(h - ideal_h) <= multiple / 2 + 1e-9 or h == multiple
    hi = (max(ideal_w, multiple) + multiple / 2) * (max(ideal_h, multiple) + multiple / 2)
    assert w * h <= hi
    if min(ideal_w, ideal_h) >= multiple:
        assert w * h >= (ideal_w - multiple / 2) * (ideal_h - multiple / 2)


@given(RATIOS)
def test_sdxl_size_within_seven_percent(ar: tuple[int, int]) -> None:
    w, h = size_for_aspect(ar, 1024**2, 64)
    assert abs(w * h / 1024**2 - 1) <= 0.07
    assert abs(math.log((w / h) / (ar[0] / ar[1]))) <= 0.1


@given(RATIOS, st.integers(64, 4096))
def test_size_respects_max_side(ar: tuple[int, int], max_side: int) -> None:
    w, h = size_for_aspect(ar, 1024**2, 64, max_side)
    assert max(w, h) <= max_side and min(w, h) >= 64


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (((0, 1), 4096, 8), "ar"),
        (((1, 1), 0, 8), "native_pixels"),
        (((1, 1), 4096, 0), "multiple"),
        (((1, 1), 4096, 64, 32), "max_side"),
    ],
)
def test_size_rejects_bad_arguments(args: tuple, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        size_for_aspect(*args)


def test_guidance_anchor_points() -> None:
    assert guidance_for_stylize(0, 7.5) == 1.0
    assert guidance_for_stylize(50, 7.5) == 4.25
    assert guidance_for_stylize(100, 7.5) == 7.5
    assert guidance_for_stylize(250, 7.5) == 9.375
    assert guidance_for_stylize(1000, 7.5) == 18.75
    # A CFG-free model (turbo, guidance 0) stays CFG-free at every stylize.
    assert {guidance_for_stylize(s, 0.0) for s in (0, 100, 1000)} == {0.0}
    for bad, name in [((1001, 7.5), "s"), ((-1, 7.5), "s"), ((5, -1.0), "default_guidance")]:
        with pytest.raises(ValueError, match=name):
            guidance_for_stylize(*bad)


@given(st.integers(0, 1000), st.integers(0, 1000), st.floats(0, 30))
def test_guidance_monotonic(a: int, b: int, g: float) -> None:
    lo, hi = sorted((a, b))
    assert guidance_for_stylize(lo, g) <= guidance_for_stylize(hi, g) + 1e-12


def test_steps_examples() -> None:
    assert steps_for_quality(0.5, 30) == 15
    assert steps_for_quality(2, 30) == 60
    assert steps_for_quality(0.25, 2) == 1  # 0.5 rounds half up
    assert steps_for_quality(0.25, 1) == 1  # never 0
    with pytest.raises(ValueError, match="default_steps"):
        steps_for_quality(1, 0)
    with pytest.raises(ValueError, match="q"):
        steps_for_quality(0, 30)


@given(st.floats(0.25, 2.0), st.integers(1, 500))
def test_steps_at_least_one(q: float, steps: int) -> None:
    out = steps_for_quality(q, steps)
    assert out >= 1
    assert abs(out - steps * q) <= 0.5 + 1e-9 or out == 1


@given(st.integers(0, 100), st.floats(0, 30), st.integers(0, SEED_MAX), st.integers(0, 64))
def test_chaos_deterministic_and_bounded(chaos: int, g: float, seed: int, index: int) -> None:
    out = chaos_guidance(chaos, g, seed, index)
    assert out == chaos_guidance(chaos, g, seed, index)
    if chaos == 0 or g <= 1.0:
        assert out == g
    else:
        assert out >= 1.0
        assert g * (1 - chaos / 200) - 1e-9 <= out < g * (1 + chaos / 200) + 1e-9


def test_chaos_varies_images_of_one_request() -> None:
    values = [chaos_guidance(100, 7.5, 42, i) for i in range(8)]
    assert len(set(values)) == 8
    assert values == [chaos_guidance(100, 7.5, 42, i) for i in range(8)]
    assert values != [chaos_guidance(100, 7.5, 43, i) for i in range(8)]
    with pytest.raises(ValueError, match="chaos"):
        chaos_guidance(101, 7.5, 0, 0)


def test_seed_for_image() -> None:
    assert [seed_for_image(10, i) for i in range(3)] == [10, 11, 12]
    assert seed_for_image(SEED_MAX, 1) == 0
    with pytest.raises(ValueError, match="index"):
        seed_for_image(1, -1)


def test_negative_prompt_joins_base_and_terms() -> None:
    params = parse_prompt("cat --no text, watermark").params
    assert negative_prompt(params, "blurry") == "blurry, text, watermark"
    assert negative_prompt(params, "  ") == "text, watermark"
    assert negative_prompt(params, None) == "text, watermark"
    assert negative_prompt(PromptParams(), None) == ""


def test_resolve_defaults_only() -> None:
    out = resolve_images(PromptParams(), SDXL, n=2, seed=7)
    assert out == ImageSettings(width=1024, height=1024, steps=30, negative_prompt="", tile=False, seeds=(7, 8),
                                guidance_scales=(7.5, 7.5))


def test_resolve_prompt_flags_over_json_fields() -> None:
    params = parse_prompt("x --seed 100 --ar 16:9 --q 0.5 --s 1000 --no text --tile").params
    img = resolve_images(params, SDXL, n=1, seed=7, size=(512, 512), steps=40,
                         guidance_scale=5.0, negative="blurry")
    assert (img.seeds, img.width, img.height) == ((100,), 1344, 768)  # --seed, --ar replace
    assert img.steps == 20  # --q scales the JSON steps
    assert img.guidance_scales == (12.5,)  # --s scales the JSON guidance: 2.5 × 5
    assert img.negative_prompt == "blurry, text"
    assert img.tile


def test_resolve_stylize_default_keeps_explicit_guidance() -> None:
    img = resolve_images(parse_prompt("x --s 100").params, SDXL, n=1, seed=0, guidance_scale=3.0)
    assert img.guidance_scales == (3.0,)


def test_resolve_json_fields_when_no_flags() -> None:
    img = resolve_images(PromptParams(), SDXL, n=1, seed=3, size=(768, 512), steps=12, guidance_scale=4.0)
    assert (img.width, img.height, img.steps, img.guidance_scales) == (768, 512, 12, (4.0,))


def test_resolve_chaos_per_image() -> None:
    out = resolve_images(parse_prompt("x --c 50 --seed 9").params, SDXL, n=4, seed=0)
    assert out.seeds == (9, 10, 11, 12)
    assert out.guidance_scales == tuple(round(chaos_guidance(50, 7.5, 9, i), 4) for i in range(4))
    with pytest.raises(ValueError, match="n must"):
        resolve_images(PromptParams(), SDXL, n=0, seed=0)
