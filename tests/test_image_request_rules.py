"""Image request fields that used to be dead ends (issue 19): `n` is capped by the config's
`limits.max_images_per_request`, OpenAI's `style` is mapped (vivid/natural) or refused, and the
template example in docs/storage-and-templates.md runs as written.

The app is the real one (`create_app`) with real tenancy, library, storage and jobs on SQLite; no
model deployments run: every case is decided before them (a request that passes ends in a 503).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from servers import make_tenancy

from serve_app.app import create_app
from serve_app.config import AppConfig, DiffusionModelConfig, LimitsConfig
from serve_app.images.protocol import PromptRenderRequest
from serve_app.images.render import ConfigTemplates, render_image_request
from serve_app.ingress import assemble_services
from serve_app.library import Library
from serve_app.prompts.mapping import guidance_for_stylize
from serve_app.storage import LocalResultStore

DOCS = Path(__file__).resolve().parent.parent / "docs"
MAX_IMAGES = 3
CFG = AppConfig(diffusion_models=[DiffusionModelConfig(name="tiny", family="sdxl", model="none")],
                limits=LimitsConfig(max_images_per_request=MAX_IMAGES))


@dataclass
class Api:
    client: TestClient
    auth: dict[str, str]

    def post(self, path: str, body: dict) -> Any:
        return self.client.post(path, json=body, headers=self.auth)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    tenancy = make_tenancy(f"sqlite:///{tmp_path / 'app.db'}", tmp_path)
    tenancy.create_tenant("acme")
    key = tenancy.create_key("acme").key
    store = LocalResultStore(tmp_path / "results", signing_key=b"s" * 32)
    services = assemble_services(CFG, diffusion={}, llm={}, tenancy=tenancy, storage=store,
                                 library=Library(tenancy.engine))
    with TestClient(create_app(services)) as client:
        yield Api(client, {"Authorization": f"Bearer {key}"})
    tenancy.close()


def err(r: Any) -> tuple[int, str | None, str | None]:
    body = r.json()["error"]
    return r.status_code, body["param"], body["code"]


ROUTES = ["/v1/images/generations", "/v1/jobs", "/v1/prompts/render"]


@pytest.mark.parametrize("path", ROUTES)
def test_n_above_the_configured_limit_is_a_400_naming_n(api: Api, path: str) -> None:
    assert err(api.post(path, {"prompt": "a cat", "n": MAX_IMAGES + 1})) == (400, "n", "too_many_images")


def test_n_up_to_the_limit_passes(api: Api) -> None:
    r = api.post("/v1/prompts/render", {"prompt": "a cat --seed 5", "n": MAX_IMAGES})
    assert r.status_code == 200 and r.json()["seeds"] == [5, 6, 7], r.text
    # Past rendering the only thing missing is the model's replica.
    assert err(api.post("/v1/images/generations", {"prompt": "a cat", "n": MAX_IMAGES}))[0] == 503


def render(prompt: str, **kw: Any):
    return render_image_request(CFG, ConfigTemplates(CFG), PromptRenderRequest(prompt=prompt, **kw))


def test_style_vivid_is_a_default_stylize_and_natural_changes_nothing() -> None:
    g = CFG.diffusion_models[0].default_guidance
    plain = render("a cat --seed 1").guidance_scales[0]
    assert render("a cat --seed 1", style="natural").guidance_scales[0] == plain == pytest.approx(g)
    vivid = render("a cat --seed 1", style="vivid")
    assert vivid.params.stylize == 250
    assert vivid.guidance_scales[0] == pytest.approx(guidance_for_stylize(250, g), abs=1e-4)
    assert vivid.guidance_scales[0] > plain
    # The prompt's own --s wins over the style.
    assert render("a cat --s 50", style="vivid").params.stylize == 50


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/jobs"])
def test_unknown_style_is_a_400_naming_style(api: Api, path: str) -> None:
    status, param, _ = err(api.post(path, {"prompt": "a cat", "style": "baroque"}))
    assert (status, param) == (400, "style")


def test_style_shows_in_the_prompt_preview(api: Api) -> None:
    r = api.post("/v1/prompts/render", {"prompt": "a cat", "style": "vivid"})
    assert r.status_code == 200 and r.json()["params"]["stylize"] == 250, r.text


def _documented_bodies() -> dict[str, dict]:
    """The JSON bodies of the template walkthrough's curl commands, keyed by route."""
    text = (DOCS / "storage-and-templates.md").read_text()
    bodies = {}
    for route, raw in re.findall(r"curl -s localhost:8000(/v1/[a-z/]+) [^\n]*?-d '(\{.*?\})'", text, re.S):
        bodies.setdefault(route, json.loads(raw))
    return bodies


def test_the_documented_template_example_works(api: Api) -> None:
    bodies = _documented_bodies()
    assert api.post("/v1/templates", bodies["/v1/templates"]).status_code == 201
    image = bodies["/v1/images/generations"]
    r = api.post("/v1/prompts/render", image)
    assert r.status_code == 200, r.text
    assert r.json()["prompt"] == "premium watch on dark marble, soft lighting, commercial photography"
    assert r.json()["seeds"] == [7] and r.json()["params"]["stylize"] == 250
    assert err(api.post("/v1/images/generations", image))[0] == 503  # valid: only the model is missing
