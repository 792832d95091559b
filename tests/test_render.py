"""Prompt rendering: request + template + Midjourney flags → `ImageSpec` → per-image tasks (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serve_app.config import load_app_config
from serve_app.errors import APIError
from serve_app.images.protocol import PromptRenderRequest
from serve_app.images.render import ConfigTemplates, render_image_request
from serve_app.prompts.templates import MissingVariableError, fill, placeholders

CFG = load_app_config(yaml.safe_load(
    (Path(__file__).resolve().parent.parent / "configs" / "local.yaml").read_text())["applications"][0]["args"])


def request(prompt: str, size: tuple[int, int] | None = None, **kw) -> PromptRenderRequest:
    return PromptRenderRequest.model_construct(prompt=prompt, size=f"{size[0]}x{size[1]}" if size else None, **kw)


def render(prompt: str, cfg=CFG, **kw):  # type: ignore[no-untyped-def]
    return render_image_request(cfg, ConfigTemplates(cfg), request(prompt, **kw))


def test_flags_become_typed_parameters() -> None:
    r = render("a red fox in snow --ar 16:9 --no blur, text --seed 42 --q 2 --tile", n=3)
    assert r.model == "sdxl-tiny" and r.prompt == "a red fox in snow"
    t0 = r.tasks()[0]
    assert (t0.width, t0.height) == (88, 48)  # 64² native pixels at 16:9, multiples of 8
    assert t0.steps == 4 and t0.tile and t0.negative_prompt == "blur, text"
    assert [t.seed for t in r.tasks()] == [42, 43, 44]


def test_model_alias_from_version_flag() -> None:
    assert render("castle --v 6").model == "sdxl-tiny"
    assert render("castle --model fast").model == "wuerstchen-tiny"


def test_json_fields_are_the_base_and_flags_apply_on_top() -> None:
    r = render("x --s 100", guidance_scale=3.0, steps=3, size=(32, 48), seed=7, negative_prompt="ugly")
    t = r.tasks()[0]
    assert (t.width, t.height, t.steps, t.seed) == (32, 48, 3, 7)
    assert t.guidance_scale == pytest.approx(3.0)  # --s 100 is Midjourney's default: base unchanged
    assert render("x --no blur", negative_prompt="ugly").negative_prompt == "ugly, blur"


def test_weights_become_weighted_prompts() -> None:
    r = render("a cat::2 a dog::-0.5")
    assert [(w.text, w.weight) for w in r.tasks()[0].weighted_prompts] == [("a cat", 2.0), ("a dog", -0.5)]


def test_template_defaults_and_override() -> None:
    r = render("ignored", template="portrait", variables={"subject": "an old fisherman"})
    assert r.prompt.startswith("Professional portrait of an old fisherman")
    assert r.params.aspect_ratio == (3, 4) and r.params.stylize == 250
    # The user's own flags win over the template's defaults; the others stay; --no adds up.
    r = render("x --s 50 --seed 4 --no blur", template="portrait", variables={"subject": "a cat"})
    p = r.params
    assert (p.stylize, p.aspect_ratio, p.seed, p.negative) == (50, (3, 4), 4, ("blur",))
    # The user's prompt is available to the template as {prompt}; missing variables name themselves.
    with pytest.raises(APIError) as e:
        render("x", template="portrait")
    assert e.value.status == 422 and e.value.param == "variables.subject"
    with pytest.raises(APIError) as e:
        render("x", template="nope")
    assert e.value.status == 404


@pytest.mark.parametrize(
    ("kwargs", "status", "param"),
    [
        ({"prompt": "x --ar 0:1"}, 422, "--ar"),
        ({"prompt": "x --s 5000"}, 422, "--s"),
        ({"prompt": "x --bogus 1"}, 422, "--bogus"),
        ({"prompt": "x", "size": (7, 7)}, 400, "size"),
        ({"prompt": "x", "size": (100000, 100000)}, 400, "size"),
        ({"prompt": "x", "steps": 50}, 400, "steps"),
        ({"prompt": "x --q 2", "steps": 5}, 400, "--q"),
        ({"prompt": "x", "model": "nope"}, 404, "model"),
        ({"prompt": "x --model nope"}, 404, "--model"),
        ({"prompt": "--ar 1:1"}, 400, "prompt"),
        ({"prompt": "y" * 5000}, 400, "prompt"),
    ],
)
def test_bad_input_names_the_parameter(kwargs: dict, status: int, param: str) -> None:
    with pytest.raises(APIError) as e:
        render(**kwargs)
    assert (e.value.status, e.value.param) == (status, param), e.value.message


def test_placeholders_are_plain_substitution() -> None:
    assert fill("{a} and {b}", {"a": "{b}", "b": "x"}) == "{b} and x"  # values are not re-scanned
    assert fill("{__class__} {0.__init__} {{a}} {a.b}", {"__class__": "C", "a": "1"}) == "C {0.__init__} {1} {a.b}"
    assert placeholders("{x} {y} {x} {0} {x.y}") == ["x", "y"]
    with pytest.raises(MissingVariableError):
        fill("{missing}", {})


def test_image_larger_than_the_replica_memory_budget_is_refused_422() -> None:
    args = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "local.yaml").read_text())
    args = args["applications"][0]["args"]
    wurst = next(m for m in args["diffusion_models"] if m["name"] == "wuerstchen-tiny")
    wurst["batching"]["max_batch_megapixels"] = 0.05  # 128² (0.016 MP) fits, 256² (0.066 MP) does not
    cfg = load_app_config(args)
    ok = render("x --model fast", cfg, size=(128, 128), n=8)
    assert len(ok.tasks()) == 8  # many images are fine: the replica batches them 3 at a time
    with pytest.raises(APIError) as e:
        render("x --model fast", cfg, size=(256, 256))
    assert e.value.status == 422 and e.value.code == "exceeds_memory_budget" and e.value.param == "size"
    # Without the override the default budget is 8 native images, which 256² fits.
    assert render("x --model fast", size=(256, 256)).width == 256


def test_budget_below_one_native_image_is_a_config_error() -> None:
    args = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "local.yaml").read_text())
    args = args["applications"][0]["args"]
    args["diffusion_models"][0]["batching"]["max_batch_megapixels"] = 0.001  # < 64² px
    with pytest.raises(ValueError, match="max_batch_megapixels"):
        load_app_config(args)


# ---- input images and model families (issue 20) ----------------------------------------------------
WURST_DEFAULT = CFG.model_copy(update={"default_image_model": "wuerstchen-tiny"})
URL = "https://img.example.com/cat.png"


def test_image_input_routes_to_an_sdxl_model_when_none_is_named() -> None:
    assert render("a cat", cfg=WURST_DEFAULT).model == "wuerstchen-tiny"  # no image: the default
    assert render(f"{URL} a cat", cfg=WURST_DEFAULT).model == "sdxl-tiny"  # image prompt: routed
    assert render(f"a cat --sref {URL}", cfg=WURST_DEFAULT).model == "sdxl-tiny"  # reference: routed
    spec = render_image_request(WURST_DEFAULT, ConfigTemplates(WURST_DEFAULT), request("a cat"), image_param="image")
    assert spec.model == "sdxl-tiny"  # an edit's image: routed


@pytest.mark.parametrize("prompt, kw, param", [
    (f"{URL} a cat --model wuerstchen-tiny", {}, "prompt"),
    (f"{URL} a cat --model fast", {}, "prompt"),  # an alias of the Würstchen model
    (f"a cat --sref {URL}", {"model": "wuerstchen-tiny"}, "--sref"),
    (f"a cat --cref {URL}", {"model": "wuerstchen-tiny"}, "--cref"),
])
def test_a_named_model_without_img2img_is_a_422_naming_both(prompt: str, kw: dict, param: str) -> None:
    with pytest.raises(APIError) as e:
        render(prompt, **kw)
    assert (e.value.status, e.value.param, e.value.code) == (422, param, "model_without_image_input")
    assert "wuerstchen-tiny" in e.value.message


def test_an_image_prompt_alone_is_a_prompt() -> None:
    spec = render(f"{URL} --iw 2")
    assert spec.prompt == "" and spec.params.image_prompts == (URL,) and spec.params.image_weight == 2.0
    with pytest.raises(APIError) as e:  # references do not replace the text
        render(f"--sref {URL}")
    assert e.value.param == "prompt"
