"""The real bot (aiogram Dispatcher, long polling) against a fake Telegram Bot API server on
127.0.0.1 and the real genserve app on the tiny models: whole conversations, photo upload included."""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiohttp import web
from conftest import ADMIN_TOKEN, free_port

from clients.telegram.bot import build_bot, build_dispatcher, with_aspect
from clients.telegram.config import BotSettings
from clients.telegram.ratelimit import UserRateLimiter

TOKEN = "123456:TEST-fake-token"
USER = {"id": 4242, "is_bot": False, "first_name": "Fedor", "language_code": "en"}
CHAT = {"id": 4242, "type": "private", "first_name": "Fedor"}
BOT_USER = {"id": 123456, "is_bot": True, "first_name": "genserve", "username": "genserve_test_bot"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Call:
    method: str
    fields: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)
    result: Any = None

    @property
    def text(self) -> str:
        return str(self.fields.get("text") or self.fields.get("caption") or "")


class FakeTelegram:
    """Answers the Bot API methods the bot uses, feeds scripted updates, records every call."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._updates: list[dict[str, Any]] = []
        self._next_update = 1
        self._next_message = 1
        self._new_update = asyncio.Event()
        self._new_call = asyncio.Event()
        self.messages: dict[int, dict[str, Any]] = {}  # what the bot sent, by message_id
        self.files: dict[str, bytes] = {}  # the user's photos, by file_id (getFile + the file URL)
        self.downloads: list[str] = []  # file paths the bot fetched
        self.cursor = 0  # calls before this index were already looked at by `expect`

    # -- the server side --------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.Response:
        assert request.match_info["token"] == TOKEN, request.match_info["token"]
        method = request.match_info["method"]
        fields: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        form = await request.post()
        for key, value in form.items():
            if isinstance(value, web.FileField):
                files[key] = value.file.read()
            else:
                fields[key] = value
        if method == "getUpdates":
            return self._ok(await self._get_updates(int(fields.get("offset", 0)), float(fields.get("timeout", 0))))
        call = Call(method, fields, files, self._answer(method, fields))
        self.calls.append(call)
        self._new_call.set()
        return self._ok(call.result)

    async def download(self, request: web.Request) -> web.Response:
        """`GET /file/bot<token>/<file_path>`: the Bot API's file download URL."""
        assert request.match_info["token"] == TOKEN, request.match_info["token"]
        path = request.match_info["path"]
        self.downloads.append(path)
        data = self.files.get(path.removeprefix("photos/"))
        return web.Response(body=data) if data is not None else web.Response(status=404)

    async def _get_updates(self, offset: int, timeout: float) -> list[dict[str, Any]]:
        self._updates = [u for u in self._updates if u["update_id"] >= offset]
        if not self._updates:
            self._new_update.clear()
            try:
                await asyncio.wait_for(self._new_update.wait(), timeout=min(timeout, 1.0))
            except TimeoutError:
                pass
        return [u for u in self._updates if u["update_id"] >= offset]

    def _answer(self, method: str, fields: dict[str, Any]) -> Any:
        if method == "getMe":
            return BOT_USER
        if method in ("sendMessage", "sendPhoto"):
            msg = {"message_id": self._next_message, "date": int(time.time()), "chat": CHAT, "from": BOT_USER}
            self._next_message += 1
            if method == "sendMessage":
                msg["text"] = fields["text"]
            else:
                msg["photo"] = [{"file_id": f"photo{msg['message_id']}", "file_unique_id": "u", "width": 64,
                                 "height": 64}]
                msg["caption"] = fields.get("caption", "")
            if "reply_markup" in fields:
                msg["reply_markup"] = json.loads(fields["reply_markup"])
            self.messages[msg["message_id"]] = msg
            return msg
        if method == "editMessageText":
            msg = self.messages[int(fields["message_id"])]
            msg["text"] = fields["text"]
            msg.pop("reply_markup", None)
            if "reply_markup" in fields:
                msg["reply_markup"] = json.loads(fields["reply_markup"])
            return msg
        if method == "getFile":
            data = self.files[fields["file_id"]]
            return {"file_id": fields["file_id"], "file_unique_id": f"u-{fields['file_id']}", "file_size": len(data),
                    "file_path": f"photos/{fields['file_id']}"}
        return True  # answerCallbackQuery, setMyCommands, sendChatAction, ...

    @staticmethod
    def _ok(result: Any) -> web.Response:
        return web.json_response({"ok": True, "result": result})

    # -- the user side ----------------------------------------------------------------------

    def _push(self, update: dict[str, Any]) -> None:
        update["update_id"] = self._next_update
        self._next_update += 1
        self._updates.append(update)
        self._new_update.set()

    def say(self, text: str) -> None:
        msg: dict[str, Any] = {"message_id": 10_000 + self._next_update, "date": int(time.time()), "chat": CHAT,
                               "from": USER, "text": text}
        if text.startswith("/"):
            msg["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]
        self._push({"message": msg})

    def send_photo(self, sizes: dict[str, tuple[int, int, bytes]], caption: str | None = None) -> None:
        """A photo message: Telegram's sizes of one photo (file_id -> width, height, bytes)."""
        photo = []
        for file_id, (w, h, data) in sizes.items():
            self.files[file_id] = data
            photo.append({"file_id": file_id, "file_unique_id": f"u-{file_id}", "width": w, "height": h,
                          "file_size": len(data)})
        msg: dict[str, Any] = {"message_id": 10_000 + self._next_update, "date": int(time.time()), "chat": CHAT,
                               "from": USER, "photo": photo}
        if caption is not None:
            msg["caption"] = caption
        self._push({"message": msg})

    def press(self, message_id: int, data: str) -> None:
        """Tap the inline button with callback `data` under the bot's message `message_id`."""
        buttons = [b["callback_data"] for row in self.messages[message_id]["reply_markup"]["inline_keyboard"]
                   for b in row]
        assert data in buttons, f"no button {data!r} under message {message_id}: {buttons}"
        self._push({"callback_query": {"id": str(uuid.uuid4()), "from": USER, "chat_instance": "ci",
                                       "data": data, "message": self.messages[message_id]}})

    async def expect(self, method: str, match: Callable[[Call], bool] = lambda c: True,
                     timeout: float = 60.0) -> Call:
        """The next call of `method` (after the cursor) that matches; moves the cursor past it."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(self.cursor, len(self.calls)):
                c = self.calls[i]
                if c.method == method and match(c):
                    self.cursor = i + 1
                    return c
            left = deadline - time.monotonic()
            if left <= 0:
                seen = [(c.method, c.text[:80]) for c in self.calls[self.cursor:]]
                raise AssertionError(f"no {method} call matched within {timeout} s; calls since cursor: {seen}")
            self._new_call.clear()
            try:
                await asyncio.wait_for(self._new_call.wait(), timeout=min(left, 0.5))
            except TimeoutError:
                pass


@asynccontextmanager
async def running_bot(genserve_url: str, api_key: str, **overrides: Any) -> AsyncIterator[FakeTelegram]:
    tg = FakeTelegram()
    web_app = web.Application()
    web_app.router.add_post("/bot{token}/{method}", tg.handle)
    web_app.router.add_get("/file/bot{token}/{path:.+}", tg.download)
    runner = web.AppRunner(web_app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    settings = BotSettings(telegram_token=TOKEN, genserve_url=genserve_url, api_key=api_key,
                           telegram_api_base=f"http://127.0.0.1:{port}", poll_interval_s=0.1,
                           job_timeout_s=120, **overrides)
    bot = build_bot(settings)
    dp = build_dispatcher(settings)
    polling = asyncio.create_task(dp.start_polling(bot, handle_signals=False, polling_timeout=1))
    try:
        yield tg
    finally:
        await dp.stop_polling()
        await asyncio.wait_for(polling, timeout=10)
        await runner.cleanup()


async def expect_photo(tg: FakeTelegram, since: int) -> tuple[list[Call], Call]:
    """The status edits (calls from index `since` on) of one generation, and its photo."""
    photo = await tg.expect("sendPhoto", timeout=120)
    edits = [c for c in tg.calls[since:tg.cursor] if c.method == "editMessageText"]
    return edits, photo


def assert_png(call: Call) -> bytes:
    ref = call.fields["photo"]
    assert ref.startswith("attach://"), ref
    data = call.files[ref[len("attach://"):]]
    assert data.startswith(PNG_MAGIC), data[:16]
    return data


@pytest.mark.ray
async def test_start_help_and_txt2img_sends_png_with_progress(genserve_url: str, api_key: str) -> None:
    async with running_bot(genserve_url, api_key) as tg:
        tg.say("/start")
        hello = await tg.expect("sendMessage")
        assert "Hi Fedor" in hello.text and "ready" in hello.text

        tg.say("/help")
        assert "/txt2img" in (await tg.expect("sendMessage")).text

        tg.say("/txt2img")
        assert "Describe the image" in (await tg.expect("sendMessage")).text
        tg.say("a lighthouse at dawn, watercolor --seed 1234 --no people")
        status = await tg.expect("sendMessage", lambda c: "sending" in c.text)
        assert status.text == "⏳ sending your request…"
        edits, photo = await expect_photo(tg, tg.cursor)
        texts = [e.text for e in edits]
        assert {e.fields["message_id"] for e in edits} == {str(status.result["message_id"])}
        # The first edit is the job's state as submitted, the last one the finished state.
        assert len(texts) >= 2 and texts[0].startswith(("⏳ queued", "🎨 generating")), texts
        assert texts[-1] == "✅ done: 100 %", texts
        assert_png(photo)
        cap = photo.fields["caption"]
        assert "seed 1234" in cap and "sdxl-tiny" in cap and "64×64" in cap, cap
        assert "no: people" in cap and "lighthouse" in cap, cap


@pytest.mark.ray
async def test_templates_pick_fill_variables_get_photo(genserve_url: str, api_key: str, auth: dict) -> None:
    name = f"tg_{uuid.uuid4().hex[:6]}"
    r = httpx.post(f"{genserve_url}/v1/templates", headers=auth, json={
        "name": name, "category": "test", "template": "A {animal} wearing {hat}, studio photo",
        "defaults": "--ar 2:1"})
    assert r.status_code == 201, r.text
    async with running_bot(genserve_url, api_key) as tg:
        tg.say("/templates")
        listing = await tg.expect("sendMessage", lambda c: "Pick a template" in c.text)
        buttons = json.loads(listing.fields["reply_markup"])["inline_keyboard"]
        assert [f"tpl:{name}"] in [[b["callback_data"] for b in row] for row in buttons]
        tg.press(listing.result["message_id"], f"tpl:{name}")
        shown = await tg.expect("sendMessage", lambda c: name in c.text)
        assert "{animal}" in shown.text and "--ar 2:1" in shown.text
        assert "{animal}" in (await tg.expect("sendMessage", lambda c: c.text.startswith("Value for"))).text
        tg.say("red fox")
        assert "{hat}" in (await tg.expect("sendMessage", lambda c: c.text.startswith("Value for"))).text
        tg.say("a tiny top hat")
        _, photo = await expect_photo(tg, tg.cursor)
        assert_png(photo)
        cap = photo.fields["caption"]
        # The template's --ar 2:1 on a 64 px model: 88×48 (multiple of 8, same pixel count).
        assert "A red fox wearing a tiny top hat, studio photo" in cap and "88×48" in cap, cap
        assert any(c.method == "answerCallbackQuery" for c in tg.calls)


@pytest.mark.ray
async def test_settings_change_model_and_aspect(genserve_url: str, api_key: str) -> None:
    async with running_bot(genserve_url, api_key) as tg:
        tg.say("/settings")
        menu = await tg.expect("sendMessage", lambda c: c.text.startswith("Settings"))
        assert "Model: default" in menu.text and "Aspect ratio: native" in menu.text
        menu_id = menu.result["message_id"]
        data = [b["callback_data"] for row in json.loads(menu.fields["reply_markup"])["inline_keyboard"] for b in row]
        assert {"set:model:sdxl-tiny", "set:model:wuerstchen-tiny", "set:ar:16:9"} <= set(data), data
        assert not any("tiny-chat" in d for d in data), "chat models must not be offered for images"

        tg.press(menu_id, "set:ar:16:9")
        edited = await tg.expect("editMessageText", lambda c: "Aspect ratio: 16:9" in c.text)
        labels = [b["text"] for row in json.loads(edited.fields["reply_markup"])["inline_keyboard"] for b in row]
        assert "✓ 16:9" in labels and "✓ default" in labels, labels
        tg.say("/txt2img a red kite over hills")
        _, photo = await expect_photo(tg, tg.cursor)
        assert "88×48" in photo.fields["caption"], photo.fields["caption"]  # 16:9 at 64² px, multiples of 8

        tg.press(menu_id, "set:model:wuerstchen-tiny")
        await tg.expect("editMessageText", lambda c: "Model: wuerstchen-tiny" in c.text)
        tg.press(menu_id, "set:ar:-")
        await tg.expect("editMessageText", lambda c: "Aspect ratio: native" in c.text)
        tg.say("/txt2img a red kite over hills --seed 5")
        _, photo = await expect_photo(tg, tg.cursor)
        assert_png(photo)
        cap = photo.fields["caption"]
        assert "wuerstchen-tiny" in cap and "128×128" in cap and "seed 5" in cap, cap


@pytest.mark.ray
async def test_enhance_setting_submits_enhanced_jobs_and_shows_the_drawn_prompt(genserve_url: str) -> None:
    """/settings → enhance on: the bot's job asks for `enhance`, and the caption shows what the LLM
    made of the prompt (the job result's revised_prompt), marked ✨."""
    key = new_tenant_key(genserve_url, plan="pro")
    auth = {"Authorization": f"Bearer {key}"}
    async with running_bot(genserve_url, key) as tg:
        tg.say("/settings")
        menu = await tg.expect("sendMessage", lambda c: c.text.startswith("Settings"))
        assert "Enhance prompts: off" in menu.text
        tg.press(menu.result["message_id"], "set:enhance:on")
        edited = await tg.expect("editMessageText", lambda c: "Enhance prompts: on" in c.text)
        labels = [b["text"] for row in json.loads(edited.fields["reply_markup"])["inline_keyboard"] for b in row]
        assert "✓ ✨ enhance" in labels, labels
        tg.say("/txt2img a red kite over hills --seed 8")
        _, photo = await expect_photo(tg, tg.cursor)
        assert_png(photo)
    (job,) = httpx.get(f"{genserve_url}/v1/jobs?limit=1", headers=auth).json()["data"]
    drawn = job["results"][0]["revised_prompt"]
    assert job["prompt"] == "a red kite over hills" and drawn and drawn != job["prompt"]
    cap = photo.fields["caption"]
    assert "seed 8" in cap and f"✨ {drawn}"[:200] in cap, cap
    report = httpx.get(f"{genserve_url}/admin/tenants/{job_tenant(genserve_url, key)}/usage",
                       headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
    assert any(m["model"] == "tiny-chat" and m["completion_tokens"] > 0 for m in report["by_model"]), report


def job_tenant(genserve_url: str, key: str) -> str:
    return httpx.get(f"{genserve_url}/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()["tenant"]


@pytest.mark.ray
async def test_api_errors_become_friendly_messages(genserve_url: str, api_key: str) -> None:
    async with running_bot(genserve_url, api_key) as tg:
        tg.say("/txt2img")
        await tg.expect("sendMessage", lambda c: "Describe" in c.text)
        tg.say("a cat --s 5000")
        err = await tg.expect("editMessageText")
        assert err.text.startswith("⚠️") and "--s must be between 0 and 1000, got 5000" in err.text, err.text
        tg.say("hello there")  # not in a flow any more: a hint, not a generation
        assert "/txt2img" in (await tg.expect("sendMessage")).text
        assert not [c for c in tg.calls if c.method == "sendPhoto"]
        assert not any("Traceback" in c.text for c in tg.calls)


def new_tenant_key(genserve_url: str, plan: str = "free") -> str:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    tenant = f"tgbot-{uuid.uuid4().hex[:6]}"
    r = httpx.post(f"{genserve_url}/admin/tenants", headers=admin, json={"name": tenant, "plan": plan})
    assert r.status_code == 201, r.text
    return httpx.post(f"{genserve_url}/admin/tenants/{tenant}/keys", headers=admin, json={}).json()["key"]


@pytest.mark.ray
async def test_in_bot_limit_per_user(genserve_url: str) -> None:
    # One picture per window per user; an invalid prompt doesn't count; then a friendly "slow down".
    async with running_bot(genserve_url, new_tenant_key(genserve_url), user_jobs_per_window=1,
                           user_window_s=60) as tg:
        tg.say("/txt2img a boat --ar 9:1")
        assert "--ar must be between" in (await tg.expect("editMessageText")).text
        tg.say("/txt2img a small boat --seed 3")
        await expect_photo(tg, tg.cursor)
        tg.say("/txt2img another boat")
        slow = await tg.expect("sendMessage", lambda c: "going fast" in c.text)
        assert "Please wait" in slow.text
        assert len([c for c in tg.calls if c.method == "sendPhoto"]) == 1


@pytest.mark.ray
async def test_api_429_becomes_friendly(genserve_url: str) -> None:
    # The free plan draws 5 images a minute: a fresh tenant uses them up, then the bot gets a 429.
    key = new_tenant_key(genserve_url)
    r = httpx.post(f"{genserve_url}/v1/images/generations", headers={"Authorization": f"Bearer {key}"},
                   json={"prompt": "fill the window", "n": 5}, timeout=120)
    assert r.status_code == 200, r.text
    async with running_bot(genserve_url, key) as tg:
        tg.say("/txt2img one more boat")
        limited = await tg.expect("editMessageText")
        assert limited.text.startswith("🐢 Too many requests") and "try again in" in limited.text, limited.text


def test_settings_from_env_name_the_bad_variable() -> None:
    env = {"TELEGRAM_BOT_TOKEN": TOKEN, "GENSERVE_URL": "http://127.0.0.1:8000/", "GENSERVE_API_KEY": "k"}
    s = BotSettings.from_env(env)
    assert s.genserve_url == "http://127.0.0.1:8000" and s.telegram_api_base is None
    with pytest.raises(ValueError, match="GENSERVE_API_KEY"):
        BotSettings.from_env({**env, "GENSERVE_API_KEY": ""})
    with pytest.raises(ValueError, match="GENSERVE_URL must start with http"):
        BotSettings.from_env({**env, "GENSERVE_URL": "localhost:8000"})
    with pytest.raises(ValueError, match="GENSERVE_BOT_POLL_S must be a number, got 'soon'"):
        BotSettings.from_env({**env, "GENSERVE_BOT_POLL_S": "soon"})


def test_aspect_from_settings_never_overrides_the_prompt() -> None:
    assert with_aspect("a cat", "16:9") == "a cat --ar 16:9"
    assert with_aspect("a cat --AR 1:2", "16:9") == "a cat --AR 1:2"
    assert with_aspect("a cat —aspect 1:2", "16:9") == "a cat —aspect 1:2"
    assert with_aspect("a cat", None) == "a cat"


def test_user_rate_limiter_slides() -> None:
    now = [0.0]
    lim = UserRateLimiter(2, 10.0, clock=lambda: now[0])
    assert lim.try_acquire(1) is None and lim.try_acquire(1) is None
    assert lim.try_acquire(1) == pytest.approx(10.0)
    assert lim.try_acquire(2) is None  # per user
    lim.refund(1)
    assert lim.try_acquire(1) is None and lim.try_acquire(1) is not None
    now[0] = 10.0
    assert lim.try_acquire(1) is None


def jpeg(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.ray
async def test_photo_with_caption_is_an_image_prompt(genserve_url: str) -> None:
    """A photo + caption: the bot fetches the largest size through the Bot API, uploads it to
    /v1/files and the job starts from it (its init image is that upload); no caption: a hint."""
    key = new_tenant_key(genserve_url, plan="pro")
    auth = {"Authorization": f"Bearer {key}"}
    big = jpeg((64, 48), (30, 60, 220))
    async with running_bot(genserve_url, key) as tg:
        tg.send_photo({"thumb": (32, 24, jpeg((32, 24), (220, 30, 30)))})
        hint = await tg.expect("sendMessage")
        assert "with a caption" in hint.text and "--iw" in hint.text, hint.text
        assert not tg.downloads and not [c for c in tg.calls if c.method == "getFile"]

        tg.send_photo({"small": (32, 24, jpeg((32, 24), (220, 30, 30))), "large": (64, 48, big)},
                      caption="the same harbour as a watercolor --seed 9 --iw 1.5")
        status = await tg.expect("sendMessage", lambda c: "sending" in c.text)
        edits, photo = await expect_photo(tg, tg.cursor)
        assert [e.text for e in edits][0] == "⏳ uploading your photo…", [e.text for e in edits]
        assert {e.fields["message_id"] for e in edits} == {str(status.result["message_id"])}
        assert_png(photo)
        assert "the same harbour as a watercolor" in photo.fields["caption"] and "seed 9" in photo.fields["caption"]
    assert tg.downloads == ["photos/large"], tg.downloads  # only the largest size, once

    # genserve's side: the job's init image is the uploaded photo, at the weight the caption gave.
    (job,) = httpx.get(f"{genserve_url}/v1/jobs?limit=1", headers=auth).json()["data"]
    init = job["params"]["init_image"]
    assert init["source"].startswith("file-") and job["params"]["strength"] == pytest.approx(0.5), job["params"]
    upload = httpx.get(f"{genserve_url}/v1/files/{init['source']}", headers=auth).json()
    assert (upload["width"], upload["height"], upload["sha256"]) == (64, 48, init["sha256"]), upload
    assert upload["filename"] == "telegram-u-large.jpg", upload


@pytest.mark.ray
async def test_too_large_photo_relays_the_server_error(genserve_url: str) -> None:
    """A photo over genserve's image_inputs.max_bytes (8 MiB): its 413 is told to the user in the
    status message, nothing is generated, and the bot keeps answering."""
    key = new_tenant_key(genserve_url)
    huge = b"\xff\xd8\xff\xe0" + b"\0" * (8 * 1024 * 1024 + 16)
    async with running_bot(genserve_url, key, user_jobs_per_window=1, user_window_s=60) as tg:
        tg.send_photo({"huge": (4000, 3000, huge)}, caption="make it brighter")
        err = await tg.expect("editMessageText", lambda c: c.text.startswith("⚠️"), timeout=60)
        assert "file: the image is" in err.text and "the limit is 8388608" in err.text, err.text
        # The refusal gave the user's turn back (1 per window here): a text prompt still draws.
        tg.say("/txt2img a small boat --seed 3")
        _, photo = await expect_photo(tg, tg.cursor)
        assert_png(photo)
        assert len([c for c in tg.calls if c.method == "sendPhoto"]) == 1
        assert not any("Something went wrong" in c.text or "Traceback" in c.text for c in tg.calls)
    assert httpx.get(f"{genserve_url}/v1/files", headers={"Authorization": f"Bearer {key}"}).json()["data"] == []
