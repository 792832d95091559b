"""The template library and generation log on real SQLite and Postgres databases."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import db_url, make_tenancy, postgres_server  # noqa: F401  (fixtures)

from serve_app.config import AppConfig, DiffusionModelConfig, PromptTemplateConfig
from serve_app.errors import APIError
from serve_app.images.protocol import PromptRenderRequest
from serve_app.images.render import render_image_request
from serve_app.library import Library, TemplateCreate

CONFIG = AppConfig(
    diffusion_models=[DiffusionModelConfig(name="tiny", family="sdxl", model="none", native_resolution=64,
                                           size_multiple=8, min_side=32, max_side=128, default_steps=2,
                                           max_steps=8)],
    templates=[PromptTemplateConfig(name="from_config", template="literal {0.__init__} {{x}} and {subject}",
                                    defaults="--ar 1:1")])


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> Iterator[tuple[Library, int, int]]:  # noqa: F811
    tenancy = make_tenancy(db_url, tmp_path)
    a = tenancy.create_tenant("acme")
    b = tenancy.create_tenant("bolt")
    ids = {t.name: i for i, t in enumerate(tenancy.list_tenants())}
    assert a and b and ids
    from sqlalchemy import select

    from serve_app.tenancy.models import Tenant

    with tenancy.engine.connect() as conn:
        tid = dict(conn.execute(select(Tenant.name, Tenant.id)).all())
    yield Library(tenancy.engine, CONFIG.templates), tid["acme"], tid["bolt"]
    tenancy.close()


def T(name: str, template: str = "a {subject}", **kw: object) -> TemplateCreate:
    return TemplateCreate(name=name, template=template, **kw)  # type: ignore[arg-type]


def status_of(fn, *args, **kw) -> tuple[int, str | None, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(APIError) as info:
        fn(*args, **kw)
    return info.value.status, info.value.param, info.value.message


def test_versions_latest_and_soft_delete(env) -> None:  # type: ignore[no-untyped-def]
    lib, acme, _ = env
    t = lib.templates
    v1 = t.save(acme, T("shot", "{product} on {surface}", category="Product", tags=["Studio", "studio", "b"],
                        defaults="--ar  1:1 --s 250"))
    assert (v1.version, v1.category, v1.tags, v1.defaults, v1.variables) == (
        1, "product", ["studio", "b"], "--ar 1:1 --s 250", ["product", "surface"])
    v2 = t.save(acme, T("shot", "{product} on {surface}, soft light"))
    assert v2.version == 2 and not v2.shared
    assert t.get(acme, "shot").version == 2
    assert t.get(acme, "shot", 1).template == "{product} on {surface}"  # old versions stay readable
    assert [x.version for x in t.versions(acme, "shot")] == [2, 1]
    src = lib.for_tenant(acme)
    assert pair(src.get("shot")) == ("{product} on {surface}, soft light", "")
    assert pair(src.get("shot", 1)) == ("{product} on {surface}", "--ar 1:1 --s 250")
    assert src.get("shot", 9) is None
    assert t.delete(acme, "shot", 2) == 1
    assert t.get(acme, "shot").version == 1  # deleting the latest makes the previous one current
    assert t.delete(acme, "shot") == 1
    assert status_of(t.get, acme, "shot")[0] == 404
    assert src.get("shot") is None
    assert status_of(t.delete, acme, "shot")[0] == 404
    assert t.save(acme, T("shot")).version == 3  # numbers are never reused


def test_tenants_see_own_and_shared_never_each_other(env) -> None:  # type: ignore[no-untyped-def]
    lib, acme, bolt = env
    t = lib.templates
    t.save(None, T("common", "shared {subject}", tags=["x"]))
    t.save(acme, T("private", "acme secret {subject}"))
    assert status_of(t.get, bolt, "private")[0] == 404
    assert lib.for_tenant(bolt).get("private") is None
    assert status_of(t.delete, bolt, "private")[0] == 404
    assert status_of(t.delete, acme, "common")[0] == 404  # a tenant can't delete a shared template
    assert t.get(bolt, "common").shared
    # A tenant's own template of the same name hides the shared one, for that tenant only.
    t.save(bolt, T("common", "bolt's own {subject}"))
    assert pair(lib.for_tenant(bolt).get("common")) == ("bolt's own {subject}", "")
    assert pair(lib.for_tenant(acme).get("common")) == ("shared {subject}", "")
    assert [(x.name, x.shared) for x in t.search(bolt).data] == [("common", False)]
    assert [(x.name, x.shared) for x in t.search(acme).data] == [("common", True), ("private", False)]
    assert t.search(None).total == 1


def test_search_by_category_exact_tag_and_text(env) -> None:  # type: ignore[no-untyped-def]
    lib, acme, _ = env
    t = lib.templates
    t.save(acme, T("Neon_City", "Futuristic {city} at night", category="concept art", tags=["cyberpunk", "city"]))
    t.save(acme, T("villa", "Modern villa in {location}, 100% glass", category="architecture",
                   tags=["cyberpunk-ish"]))
    t.save(acme, T("watch", "{product} on marble", category="product", tags=["studio"]))
    t.save(acme, T("watch", "{product} on slate", category="product", tags=["outdoor"]))  # v2 replaces tags
    names = lambda **kw: [x.name for x in t.search(acme, **kw).data]  # noqa: E731
    assert names(category="concept art") == ["Neon_City"]
    assert names(category="Concept Art") == ["Neon_City"]
    assert names(tag="cyberpunk") == ["Neon_City"]  # exact: not "cyberpunk-ish"
    assert names(tag="cyber") == []
    assert names(tag="studio") == []  # only the latest version's tags count
    assert names(tag="outdoor") == ["watch"]
    assert names(q="NEON") == ["Neon_City"] and names(q="futuristic") == ["Neon_City"]
    assert names(q="100%") == ["villa"] and names(q="_") == ["Neon_City"]  # LIKE wildcards are escaped
    assert names(q="%") == ["villa"]
    assert names(q="slate") == ["watch"] and names(q="marble") == []
    page = t.search(acme, limit=2, offset=1)
    assert page.total == 3 and [x.name for x in page.data] == ["villa", "watch"]
    assert status_of(t.search, acme, limit=0)[1] == "limit"


@pytest.mark.parametrize("template, fragment", [
    ("{0.__init__}", "{0.__init__}"), ("{{a}}", "{}"), ("{a{b}}", "{a}"), ("a {", "a {"), ("{a.b}", "{a.b}"),
    ("{}", "{}"), ("{ a }", "{ a }"), ("{a!r}", "{a!r}"),
])
def test_only_identifier_placeholders_are_stored(env, template: str, fragment: str) -> None:  # type: ignore[no-untyped-def]
    lib, acme, _ = env
    code, param, message = status_of(lib.templates.save, acme, T("bad", template))
    assert (code, param) == (400, "template") and fragment in message


def test_input_validation_names_the_field(env) -> None:  # type: ignore[no-untyped-def]
    lib, acme, _ = env
    s = lib.templates.save
    assert status_of(s, acme, T("../etc"))[:2] == (400, "name")
    assert status_of(s, acme, T("ok", category="no/slash"))[:2] == (400, "category")
    assert status_of(s, acme, T("ok", tags=["fine", "bad,tag"]))[:2] == (400, "tags")
    code, param, msg = status_of(s, acme, T("ok", defaults="--ar 99"))
    assert (code, param) == (400, "defaults") and "--ar" in msg
    assert status_of(s, acme, T("ok", defaults="some words --s 100"))[:2] == (400, "defaults")
    assert status_of(s, acme, T("ok", template="   "))[:2] == (400, "template")


def pair(found):  # type: ignore[no-untyped-def]
    return (found.template, found.defaults)


def render(lib: Library, tenant: int, name: str, variables: dict[str, str], prompt: str = "", version=None):  # type: ignore[no-untyped-def]
    return render_image_request(CONFIG, lib.for_tenant(tenant), PromptRenderRequest.model_construct(
        prompt=prompt, template=name, template_version=version, variables=variables, seed=7))


def test_rendering_is_plain_substitution(env) -> None:  # type: ignore[no-untyped-def]
    lib, acme, bolt = env
    lib.templates.save(acme, T("dunder", "{__class__} photo of {subject}", defaults="--ar 16:9 --s 300"))
    with pytest.raises(APIError) as info:
        render(lib, acme, "dunder", {"subject": "a cat"})
    assert info.value.status == 422 and info.value.param == "variables.__class__"
    assert "'__class__'" in info.value.message
    r = render(lib, acme, "dunder", {"__class__": "{subject}", "subject": "a cat"})
    assert r.prompt == "{subject} photo of a cat"  # values are never re-scanned, nor evaluated
    assert r.params.stylize == 300 and r.width > r.height  # defaults applied
    r = render(lib, acme, "dunder", {"__class__": "x", "subject": "{0.__init__.__globals__}"})
    assert r.prompt == "x photo of {0.__init__.__globals__}"
    # Config templates are the fallback; their stray braces stay literal text.
    # `{{x}}` is no escape: the inner `{x}` is a placeholder like any other.
    with pytest.raises(APIError) as info:
        render(lib, bolt, "from_config", {"subject": "a dog"})
    assert info.value.status == 422 and info.value.param == "variables.x"
    r = render(lib, bolt, "from_config", {"subject": "a dog", "x": "X"})
    assert r.prompt == "literal {0.__init__} {X} and a dog"
    with pytest.raises(APIError) as info:
        render(lib, bolt, "dunder", {})
    assert info.value.status == 404 and info.value.param == "template"
    with pytest.raises(APIError) as info:
        render(lib, acme, "dunder", {"__class__": "x", "subject": "y"}, version=5)
    assert info.value.status == 404


def test_generation_log_ratings_and_isolation(env) -> None:  # type: ignore[no-untyped-def]
    lib, acme, bolt = env
    lib.templates.save(acme, T("shot", "{subject}, studio"))
    lib.templates.save(acme, T("shot", "{subject}, studio, v2"))
    src = lib.for_tenant(acme)
    r1 = render_image_request(CONFIG, src, PromptRenderRequest.model_construct(
        prompt="", template="shot", template_version=1, variables={"subject": "a watch"}, seed=11, n=2))
    g1 = lib.generations.log_spec(acme, r1, result_keys=["acme/2026/01/01/a.png"], latency_s=1.25, job_id="job_1")
    r2 = render_image_request(CONFIG, src, PromptRenderRequest.model_construct(
        prompt="", template="shot", variables={"subject": "a ring"}, seed=12))
    g2 = lib.generations.log_spec(acme, r2, latency_s=0.5)
    g3 = lib.generations.log(bolt, prompt="bolt's", model="tiny", seeds=[1], params={})
    row = lib.generations.get(acme, g1)
    assert (row.template, row.template_version, row.seeds, row.job_id) == ("shot", 1, [11, 12], "job_1")
    assert row.prompt == "a watch, studio" and row.params["width"] == 64 and row.latency_s == 1.25
    assert lib.generations.rate(acme, g1, 5).rating == 5
    lib.generations.rate(acme, g2, 2)
    lib.generations.rate(acme, g1, 4)  # re-rating replaces
    for bad in (0, 6, True):
        assert status_of(lib.generations.rate, acme, g2, bad)[:2] == (400, "rating")
    assert status_of(lib.generations.rate, bolt, g1, 5)[0] == 404  # someone else's generation: as if it didn't exist
    assert status_of(lib.generations.get, bolt, g1)[0] == 404
    assert status_of(lib.generations.rate, acme, "gen_nope", 5)[0] == 404
    listed = lib.templates.search(acme)
    assert [(x.name, x.avg_rating, x.rating_count) for x in listed.data] == [("shot", 3.0, 2)]
    assert [(x.version, x.avg_rating) for x in lib.templates.versions(acme, "shot")] == [(2, 2.0), (1, 4.0)]
    assert lib.templates.get(acme, "shot").avg_rating == 3.0
    mine = lib.generations.list(acme)
    assert mine.total == 2 and {g.id for g in mine.data} == {g1, g2} and g3 not in {g.id for g in mine.data}
    assert [g.id for g in lib.generations.list(acme, job_id="job_1").data] == [g1]
    assert lib.generations.list(acme, rated=False).total == 0
    assert lib.generations.list(acme, limit=1, offset=1).data[0].id in {g1, g2}
    assert lib.generations.list(acme, url_of=lambda k: "fresh:" + k).data[-1].result_urls in (
        ["fresh:acme/2026/01/01/a.png"], [])


def test_concurrent_saves_get_distinct_versions(env) -> None:  # type: ignore[no-untyped-def]
    lib, acme, _ = env
    errors: list[BaseException] = []

    def save(tenant: int | None) -> None:
        try:
            for _ in range(3):
                lib.templates.save(tenant, T("race", "x {subject}"))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=save, args=(tenant,)) for tenant in (acme, acme, None, None)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert [x.version for x in lib.templates.versions(acme, "race")] == [6, 5, 4, 3, 2, 1]
    assert [x.version for x in lib.templates.versions(None, "race")] == [6, 5, 4, 3, 2, 1]
