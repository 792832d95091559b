"""LoRA on a compiled-engine config over real HTTP (issue 21): with `lora.hotswap_target_rank`
every slot holds a zero placeholder (deployments/diffusion/lora_slots.py), and an adapter it can't
hold (a UNet layer outside `lora.hotswap_target_modules`, or no UNet weights at all) is a 400
with an OpenAI-style body naming `loras`, never a 500 or a traceback; one it can hold is served.
One small app beside the session app (tests/small_app.py), not compiled: the refusal happens
when the replica stages the adapter, the same with or without a compiled UNet."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import small_app
from adapter_files import peft_zip, zip_dir
from test_http_lora import image, png, upload

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def app(genserve_url: str, tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    a = small_app.deploy("lorahot", base_url=genserve_url, work_dir=tmp_path_factory.mktemp("lorahot"),
                         models_dir=tiny_models_dir, plans=[{"name": "p", **small_app.UNLIMITED}], tenants={"t": "p"},
                         model={"default_steps": 2, "lora": {"max_adapters_per_replica": 2, "hotswap_target_rank": 8}},
                         adapters=True)
    yield a
    a.delete()


def test_adapters_outside_the_placeholder_are_a_400(app: small_app.SmallApp, tiny_models_dir: Path) -> None:
    from deployments.diffusion.tiny import tiny_sdxl_te_lora

    auth = app.auth("t")
    cfg, weights = tiny_sdxl_te_lora(seed=5)
    text_only = {k: v for k, v in weights.items() if not k.startswith("unet.")}
    archives = {"wide": peft_zip(),  # rank 4 on proj_in: a UNet layer the default targets leave out
                "te-only": peft_zip(text_only, config={"target_modules": cfg["target_modules"]}),
                "ink": zip_dir(tiny_models_dir / "sdxl-tiny-loras" / "ink")}
    for name, data in archives.items():
        r = upload(app.url, auth, name, data, base=app.model)
        assert r.status_code in (200, 201), r.text
    for name, words in (("wide", "outside this model's lora.hotswap_target_modules"), ("te-only", "no UNet weights")):
        r = image(app.url, auth, {"prompt": "a blue house", "model": app.model, "loras": [{"name": name}]})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["code"], err["param"], err["type"]) == ("adapter_incompatible", "loras", "invalid_request_error")
        assert words in err["message"] and "Traceback" not in err["message"], err
    # What the placeholder can hold is served, and weight 0 is the base image.
    plain = png(image(app.url, auth, {"prompt": "a blue house", "model": app.model}))
    ink = png(image(app.url, auth, {"prompt": "a blue house <lora:ink:1>", "model": app.model}))
    assert ink != plain
    assert png(image(app.url, auth, {"prompt": "a blue house <lora:ink:0>", "model": app.model})) == plain
    # The refused ones are still refused after a good one was served (nothing half-loaded).
    r = image(app.url, auth, {"prompt": "a blue house <lora:wide:1>", "model": app.model})
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_incompatible", r.text
    assert httpx.get(app.url + "/health", timeout=30).status_code == 200
