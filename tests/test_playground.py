"""The web playground at `/`, driven by Debian's headless Chromium (Playwright) against the real
app on the tiny models: key, live parameter parsing, template variables, generate with progress,
gallery, rating, streamed chat. Screenshots go to tests/artifacts/."""

from __future__ import annotations

import base64
import io
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import small_app
from adapter_files import zip_dir
from conftest import ARTIFACTS

playwright_sync = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found: apt-get install -y chromium")
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_page_and_assets_are_served_without_a_key(genserve_url: str) -> None:
    r = httpx.get(genserve_url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), (r.status_code, r.text[:200])
    assert '<label for="api-key">' in r.text
    for name, ctype in (("app.js", "javascript"), ("style.css", "text/css")):
        a = httpx.get(f"{genserve_url}/static/{name}")
        assert a.status_code == 200 and ctype in a.headers["content-type"], (name, a.status_code)
    missing = httpx.get(f"{genserve_url}/static/secret.py")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "static_not_found"
    assert httpx.get(f"{genserve_url}/v1/models").status_code == 401  # the API itself still needs a key


def test_playground_generate_rate_and_chat(genserve_url: str, api_key: str, auth: dict, browser) -> None:
    expect = playwright_sync.expect
    tpl = f"pg_{uuid.uuid4().hex[:6]}"
    r = httpx.post(f"{genserve_url}/v1/templates", headers=auth, json={
        "name": tpl, "category": "test", "template": "A {animal} in a {place}, oil painting", "defaults": "--ar 2:1"})
    assert r.status_code == 201, r.text

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1200, "height": 950})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))

    def on_console(m) -> None:  # the 422 of the bad `--s 5000` preview is provoked below
        # A job's preview is 404 until its first partial image: the page polls through that.
        preview_404 = "status of 404" in m.text and "/preview" in (m.location or {}).get("url", "")
        if m.type == "error" and "status of 422" not in m.text and not preview_404:
            problems.append(f"console.{m.type}: {m.text}")

    page.on("console", on_console)

    # The key, entered once, is kept in localStorage and survives a reload.
    page.goto(genserve_url + "/")
    expect(page.locator("#key-status")).to_contain_text("Enter your API key")
    page.get_by_label("API key").fill(api_key)
    page.get_by_role("button", name="Save key").click()
    expect(page.locator("#key-status")).to_contain_text("accepted")
    page.reload()
    expect(page.locator("#key-status")).to_contain_text("accepted")
    assert page.get_by_label("API key").input_value() == api_key
    expect(page.locator("#model option[value='sdxl-tiny']")).to_have_count(1)
    expect(page.locator("#model option[value='tiny-chat']")).to_have_count(0)  # chat models only in the chat tab

    # Live parsing: what --ar, --no, --seed and :: weights became.
    prompt = page.get_by_label("Prompt")
    prompt.fill("a lighthouse::2 stormy sea::1 --ar 3:2 --no people, boats --seed 42")
    parsed = page.locator("#parsed")
    expect(parsed.locator("[data-param=aspect_ratio]")).to_contain_text("3:2 → 80×56")
    expect(parsed.locator("[data-param=negative]")).to_have_text("people, boats")
    expect(parsed.locator("[data-param=seed]")).to_have_text("42")
    expect(parsed.locator("[data-param=weights] .chip")).to_have_text(["a lighthouse × 2", "stormy sea × 1"])
    prompt.fill("a cat --s 5000")
    expect(page.locator("#parsed-error")).to_contain_text("--s must be between 0 and 1000, got 5000")

    # Template picker: its variables become labelled inputs; the preview shows the filled text.
    page.get_by_label("Template").select_option(tpl)
    page.get_by_label("animal").fill("otter")
    page.get_by_label("place").fill("library")
    prompt.fill("--seed 7")
    expect(parsed.locator("[data-param=prompt]")).to_have_text("A otter in a library, oil painting")
    expect(parsed.locator("[data-param=aspect_ratio]")).to_contain_text("2:1")
    page.get_by_label("Template").select_option("")
    expect(page.locator("#template-vars")).to_be_hidden()

    # Generate: progress is shown (watched with a MutationObserver), then the image in the gallery.
    prompt.fill("a lighthouse at dawn, watercolor --ar 3:2 --no people")
    page.get_by_label("Seed").fill("42")
    page.get_by_label("Steps").fill("4")
    page.evaluate("""() => { window.__progress = [];
        new MutationObserver(() => window.__progress.push(document.getElementById('progress-text').textContent))
          .observe(document.getElementById('progress-text'), {childList: true, characterData: true, subtree: true}); }""")
    page.get_by_role("button", name="Generate").click()
    card = page.locator("#gallery li").first
    expect(card).to_be_visible(timeout=120_000)
    page.wait_for_function("() => { const i = document.querySelector('#gallery img'); return i && i.complete && i.naturalWidth > 0; }")
    assert page.evaluate("document.querySelector('#gallery img').naturalWidth") == 80
    seen = page.evaluate("window.__progress")
    assert seen[0] == "Submitting…" and seen[-1] == "Done: 100 %", seen
    assert any(s.startswith(("Queued", "Generating")) for s in seen), seen
    assert page.locator("#progress").get_attribute("value") == "100"
    expect(card.locator(".meta")).to_contain_text("sdxl-tiny · 80×56 · 4 steps")
    expect(card.locator(".meta")).to_contain_text("seed 42")
    expect(card.locator(".meta")).to_contain_text("no: people")

    # Rate it 4/5 with the keyboard-reachable radio group; the server has the rating.
    card.locator(".rating label").nth(3).click()
    expect(card.locator(".rating [role=status]")).to_have_text("rated 4/5")
    job = httpx.get(f"{genserve_url}/v1/jobs/{card.get_attribute('data-job')}", headers=auth).json()
    gen = httpx.get(f"{genserve_url}/v1/generations/{job['generation_id']}", headers=auth).json()
    assert gen["rating"] == 4, gen
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)

    # Chat tab via the keyboard (ARIA tabs: arrow keys), then a streamed reply.
    page.locator("#tab-images").focus()
    page.keyboard.press("ArrowRight")
    expect(page.locator("#panel-chat")).to_be_visible()
    expect(page.locator("#tab-chat")).to_be_focused()
    expect(page.get_by_label("Chat model")).to_have_value("tiny-chat")
    page.evaluate("""() => { window.__chunks = 0;
        new MutationObserver(() => window.__chunks++).observe(document.getElementById('chat-log'),
          {childList: true, characterData: true, subtree: true}); }""")
    # A longer answer than the page's 64 tokens: the tiny model writes 64 in about one 50 ms
    # stream interval, which would make "streamed" depend on the machine's speed.
    def longer(route) -> None:  # type: ignore[no-untyped-def]
        body = json.loads(route.request.post_data or "{}")
        route.continue_(post_data=json.dumps({**body, "max_tokens": 400, "ignore_eos": True}))

    page.route("**/v1/chat/completions", longer)
    page.get_by_label("Message").fill("Tell me about lighthouses")
    page.keyboard.press("Enter")
    expect(page.locator("#chat-status")).to_contain_text("400 tokens", timeout=60_000)
    page.unroute("**/v1/chat/completions")
    reply = page.locator("#chat-log li.assistant").first.text_content() or ""
    assert reply.strip(), "the assistant bubble stayed empty"
    assert page.evaluate("window.__chunks") >= 4, "the reply arrived in one piece, not streamed"
    expect(page.locator("#chat-log li.user")).to_have_text("Tell me about lighthouses")
    page.screenshot(path=str(ARTIFACTS / "playground-chat.png"), full_page=True)

    assert not problems, problems
    context.close()


def test_playground_shows_the_live_preview_while_a_job_runs(genserve_url: str, tiny_models_dir, tmp_path_factory,
                                                            browser) -> None:
    """A long job on an app of its own (the playground under a route prefix, 400 steps): the page polls
    the job's preview and shows it while the job runs, step by step, then the image in the gallery."""
    expect = playwright_sync.expect
    app = small_app.deploy("pgpreview", base_url=genserve_url, work_dir=tmp_path_factory.mktemp("pgpreview"),
                           models_dir=tiny_models_dir, plans=[{"name": "open", **small_app.UNLIMITED}],
                           tenants={"alice": "open"},
                           model={"max_steps": 500, "previews": {"vae": str(tiny_models_dir / "taesd-tiny")}})
    try:
        context = browser.new_context(viewport={"width": 1100, "height": 900})
        page = context.new_page()
        page.goto(app.url + "/")
        page.get_by_label("API key").fill(app.keys["alice"])
        page.get_by_role("button", name="Save key").click()
        expect(page.locator("#key-status")).to_contain_text("accepted")
        expect(page.get_by_label("Live preview")).to_be_checked()
        page.get_by_label("Prompt").fill("a lighthouse at dawn --seed 3")
        page.get_by_label("Size").fill("48x48")
        page.get_by_label("Steps").fill("400")
        # Every preview step the page showed (a MutationObserver on the image's data-step).
        page.evaluate("""() => { window.__steps = [];
            new MutationObserver(() => window.__steps.push(document.getElementById('live-preview-img').dataset.step))
              .observe(document.getElementById('live-preview-img'), {attributes: true, attributeFilter: ['data-step']}); }""")
        page.get_by_role("button", name="Generate").click()
        figure = page.locator("#live-preview")
        expect(figure).to_be_visible(timeout=90_000)
        page.wait_for_function("() => { const i = document.getElementById('live-preview-img');"
                               " return i.complete && i.naturalWidth === 48; }")
        expect(page.locator("#live-preview-caption")).to_contain_text("of 400")
        assert page.locator("#gallery li").count() == 0  # shown while the job still ran
        page.screenshot(path=str(ARTIFACTS / "playground-live-preview.png"), full_page=True)
        expect(page.locator("#gallery li").first).to_be_visible(timeout=120_000)
        steps = [int(s) for s in page.evaluate("window.__steps")]
        assert steps and steps == sorted(steps) and set(steps) <= {100, 200, 300}, steps

        # The same with an image prompt: img2img starts part-way (--iw 0.75 → strength 0.75: 375 of
        # 500 steps run), and the preview follows that loop.
        page.get_by_label("Drop an image here or choose one").set_input_files(
            {"name": "start.png", "mimeType": "image/png", "buffer": _png((48, 48))})
        expect(page.locator("#image-name")).to_contain_text("start.png · 48×48 · file-")
        page.get_by_label("Image weight").fill("0.75")
        page.get_by_label("Steps").fill("500")
        page.evaluate("window.__steps = []")
        page.get_by_role("button", name="Generate").click()
        expect(page.locator("#live-preview-caption")).to_contain_text("of 375", timeout=90_000)
        page.wait_for_function("() => { const i = document.getElementById('live-preview-img');"
                               " return i.complete && i.naturalWidth === 48; }")
        assert page.locator("#gallery li").count() == 1  # the first job's card only: this one still runs
        expect(page.locator("#gallery li")).to_have_count(2, timeout=120_000)
        steps = [int(s) for s in page.evaluate("window.__steps")]
        assert steps and set(steps) <= {94, 188, 281}, steps  # preview_steps(375, 3)
        job = httpx.get(f"{app.url}/v1/jobs/{page.locator('#gallery li').first.get_attribute('data-job')}",
                        headers=app.auth("alice")).json()
        assert job["params"]["init_image"]["source"].startswith("file-") and job["params"]["strength"] == pytest.approx(0.75), job
        context.close()
    finally:
        app.delete()


def _png(size: tuple[int, int] = (64, 64), color: tuple[int, int, int] = (200, 60, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _login(page, url: str, key: str) -> None:
    page.goto(url + "/")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Save key").click()
    playwright_sync.expect(page.locator("#key-status")).to_contain_text("accepted")


def test_playground_image_prompt_upload_refusals_and_lora(genserve_url: str, api_key: str, auth: dict,
                                                         tiny_models_dir: Path, tmp_path: Path, browser) -> None:
    """Drop an image (the file input, as a drop sets it): it is uploaded to /v1/files and starts the
    prompt; the server's 422/413 for a bad or huge file are shown; a LoRA picked with its slider
    reaches the job. Asserted on the server's job record, not only on the page."""
    expect = playwright_sync.expect
    # Its own copy of the tiny "ink" adapter with another alpha: the registry refuses an archive the
    # tenant already holds under another name (409), and test_http_lora registers "ink" itself.
    ink = tmp_path / "ink"
    shutil.copytree(tiny_models_dir / "sdxl-tiny-loras" / "ink", ink)
    config = json.loads((ink / "adapter_config.json").read_text())
    config["lora_alpha"] = 2 * config.get("lora_alpha", config["r"])
    (ink / "adapter_config.json").write_text(json.dumps(config))
    r = httpx.post(genserve_url + "/v1/adapters", headers=auth, data={"name": "pg-ink", "base_model": "sdxl-tiny"},
                   files={"file": ("ink.zip", zip_dir(ink))}, timeout=60)
    if r.status_code == 409:  # a rerun on the same session's database
        r = httpx.get(f"{genserve_url}/v1/adapters/pg-ink", headers=auth)
    assert r.status_code in (200, 201), r.text
    adapter_id = r.json()["id"]

    context = browser.new_context(viewport={"width": 1200, "height": 1100})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" and not any(
        s in m.text for s in ("status of 413", "status of 422", "status of 404")) else None)
    sent: list[dict] = []
    page.on("request", lambda q: sent.append(json.loads(q.post_data or "{}"))
            if q.method == "POST" and q.url.endswith("/v1/jobs") else None)
    _login(page, genserve_url, api_key)

    # Refusals come from the server, worded by it, shown beside the drop zone.
    chooser = page.get_by_label("Drop an image here or choose one")
    chooser.set_input_files({"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image at all"})
    status = page.locator("#image-status")
    expect(status).to_contain_text("Upload refused: file: not a PNG, JPEG or WebP image. (file)")
    expect(status).to_have_attribute("role", "alert")
    huge = b"\x89PNG\r\n\x1a\n" + b"\0" * (8 * 1024 * 1024 + 16)  # over image_inputs.max_bytes (8 MiB)
    chooser.set_input_files({"name": "huge.png", "mimeType": "image/png", "buffer": huge})
    expect(status).to_contain_text("the limit is 8388608", timeout=30_000)
    expect(page.locator("#image-chosen")).to_be_hidden()

    # A real image: thumbnail, name and id; removing it takes it out of the request.
    chooser.set_input_files({"name": "red.png", "mimeType": "image/png", "buffer": _png((96, 64))})
    expect(page.locator("#image-chosen")).to_be_visible()
    page.wait_for_function("() => document.getElementById('image-thumb').naturalWidth === 96")
    expect(page.locator("#image-name")).to_contain_text("red.png · 96×64 · file-")
    page.get_by_role("button", name="Remove image").click()
    expect(page.locator("#image-chosen")).to_be_hidden()
    # Dropped this time: a DragEvent carrying the file, as a drag from the desktop delivers it.
    page.evaluate("""(b64) => { const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer(); dt.items.add(new File([bytes], 'blue.png', {type: 'image/png'}));
        const zone = document.getElementById('drop-zone');
        for (const type of ['dragenter', 'dragover', 'drop'])
          zone.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true})); }""",
                  base64.b64encode(_png(color=(20, 40, 220))).decode())
    expect(page.locator("#image-name")).to_contain_text("blue.png · 64×64 · file-")
    file_id = (page.locator("#image-name").text_content() or "").split(" · ")[-1]
    stored = httpx.get(f"{genserve_url}/v1/files/{file_id}", headers=auth).json()
    assert stored["width"] == 64 and stored["purpose"] == "vision", stored

    # LoRA: the key's adapters are listed; pick one, weight 0.5 with its slider.
    ink = page.get_by_role("checkbox", name="pg-ink")
    ink.check()
    page.get_by_label("pg-ink weight").fill("0.5")
    expect(page.locator("#lora-list .lora-row:has([data-lora='pg-ink']) output")).to_have_text("0.5")
    page.get_by_label("Image weight").fill("1.5")

    page.get_by_label("Prompt").fill("a lighthouse at dawn --seed 11")
    page.get_by_label("Size").fill("64x64")
    page.get_by_label("Steps").fill("6")
    parsed = page.locator("#parsed")
    expect(parsed.locator("[data-param=image_prompts]")).to_have_text(f"{file_id} (--iw 1.5)")
    expect(parsed.locator("[data-param=loras]")).to_have_text("pg-ink × 0.5")
    page.get_by_role("button", name="Generate").click()
    card = page.locator("#gallery li").first
    expect(card).to_be_visible(timeout=120_000)
    page.wait_for_function("() => { const i = document.querySelector('#gallery img'); return i && i.complete && i.naturalWidth === 64; }")
    expect(card.locator(".meta")).to_contain_text(f"from image {file_id}")
    expect(card.locator(".meta")).to_contain_text("LoRA: pg-ink × 0.5")
    page.screenshot(path=str(ARTIFACTS / "playground-image-prompt.png"), full_page=True)

    # What the page sent, and what the server stored for the job.
    body = sent[-1]
    assert body["prompt"] == f"{file_id} a lighthouse at dawn --seed 11 --iw 1.5", body
    assert body["loras"] == [{"name": "pg-ink", "weight": 0.5}], body
    job = httpx.get(f"{genserve_url}/v1/jobs/{card.get_attribute('data-job')}", headers=auth).json()
    assert job["status"] == "succeeded", job
    p = job["params"]
    assert (p["init_image"]["source"], p["init_image"]["sha256"]) == (file_id, stored["sha256"]), p
    assert p["strength"] == pytest.approx(0.5), p  # --iw 1.5 → 1 − 1.5/3
    assert p["loras"] == [{"name": "pg-ink", "id": adapter_id, "weight": 0.5}], p

    # Without the image (removed) and without the LoRA, the next request carries neither.
    page.get_by_role("button", name="Remove image").click()
    ink.uncheck()
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#gallery li")).to_have_count(2, timeout=120_000)
    assert sent[-1]["prompt"] == "a lighthouse at dawn --seed 11" and "loras" not in sent[-1], sent[-1]
    assert not problems, problems
    context.close()
