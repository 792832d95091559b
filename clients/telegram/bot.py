"""The Telegram bot: handlers for /start, /help, /txt2img, /templates, /settings, /cancel, and
photos with a caption (an image prompt: the photo goes to genserve's `/v1/files`, its file id starts
the prompt, the caption is the text; docs/telegram-bot.md).

Every image is an async job at genserve (`POST /v1/jobs`); the bot polls it, edits one status
message with the progress, then uploads the picture. All users share the bot's API key (one
genserve tenant); an in-bot limit per Telegram user keeps one chat from using up the tenant.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiogram import Bot, Dispatcher, F, Router
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import TelegramAPIError
from aiogram.filters import Command, CommandObject, CommandStart, StateFilter
from aiogram.fsm.context import FSMContext
from aiogram.fsm.state import State, StatesGroup
from aiogram.fsm.storage.memory import MemoryStorage
from aiogram.types import (
    BotCommand,
    BufferedInputFile,
    CallbackQuery,
    ErrorEvent,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    PhotoSize,
)

from clients.telegram import texts
from clients.telegram.api import GenserveClient, GenserveError
from clients.telegram.config import BotSettings
from clients.telegram.ratelimit import UserRateLimiter

logger = logging.getLogger("genserve.telegram")

ASPECT_RATIOS = ("1:1", "3:2", "2:3", "16:9", "9:16")
_AR_FLAG = re.compile(r"(?:^|\s)(?:--|—)(?:ar|aspect)(?:\s|$)", re.IGNORECASE)
_CALLBACK_LIMIT = 64  # bytes of callback_data Telegram accepts
COMMANDS = [BotCommand(command="txt2img", description="Draw a picture from a description"),
            BotCommand(command="templates", description="Start from a prompt template"),
            BotCommand(command="settings", description="Model, aspect ratio, prompt enhancing"),
            BotCommand(command="help", description="What this bot does"),
            BotCommand(command="cancel", description="Stop the current step")]


class Flow(StatesGroup):
    prompt = State()
    variable = State()


@dataclass
class UserPrefs:
    model: str | None = None  # None: genserve's default model
    aspect: str | None = None  # None: the model's native size (or the template's --ar)
    enhance: bool = False  # the LLM expands each prompt first (`enhance` on the job; `--enhance` works too)


def with_aspect(prompt: str, aspect: str | None) -> str:
    """The user's own --ar in the prompt wins over the one from /settings."""
    if aspect is None or _AR_FLAG.search(prompt):
        return prompt
    return f"{prompt} --ar {aspect}".strip()


class GenserveBot:
    def __init__(self, settings: BotSettings, client: GenserveClient) -> None:
        self.settings = settings
        self.client = client
        self.limiter = UserRateLimiter(settings.user_jobs_per_window, settings.user_window_s)
        self.prefs: dict[int, UserPrefs] = {}

    def prefs_of(self, user_id: int) -> UserPrefs:
        return self.prefs.setdefault(user_id, UserPrefs())

    # -- commands ---------------------------------------------------------------------------

    async def start(self, message: Message, state: FSMContext) -> None:
        await state.clear()
        name = message.from_user.first_name if message.from_user else None
        await message.answer(texts.greeting(name))

    async def help(self, message: Message) -> None:
        await message.answer(texts.HELP)

    async def cancel(self, message: Message, state: FSMContext) -> None:
        await state.clear()
        await message.answer("OK, cancelled. Send /txt2img to start again.")

    async def txt2img(self, message: Message, command: CommandObject, state: FSMContext) -> None:
        if command.args and command.args.strip():  # `/txt2img a red fox` skips the question
            await state.clear()
            await self.generate_from_prompt(message, command.args.strip())
            return
        await state.set_state(Flow.prompt)
        await message.answer(texts.ASK_PROMPT)

    async def on_prompt(self, message: Message, state: FSMContext) -> None:
        await state.clear()
        await self.generate_from_prompt(message, message.text or "")

    async def generate_from_prompt(self, message: Message, prompt: str) -> None:
        user_id = message.from_user.id if message.from_user else message.chat.id
        prefs = self.prefs_of(user_id)
        body: dict[str, Any] = {"prompt": with_aspect(prompt, prefs.aspect)}
        await self.generate(message.bot, message.chat.id, user_id, body)

    async def on_photo(self, message: Message, state: FSMContext, bot: Bot) -> None:
        """A photo with a caption: the caption is the prompt, the photo its image prompt (img2img
        from it, Midjourney's form: `file-... caption --iw W`). Without a caption: how to do it."""
        await state.clear()
        caption = (message.caption or "").strip()
        if not caption:
            await message.answer(texts.PHOTO_NEEDS_CAPTION)
            return
        # Telegram sends each photo in several sizes; the largest is the one the user took.
        largest = max(message.photo or [], key=lambda p: (p.width * p.height, p.file_size or 0))
        user_id = message.from_user.id if message.from_user else message.chat.id
        body: dict[str, Any] = {"prompt": with_aspect(caption, self.prefs_of(user_id).aspect)}
        await self.generate(bot, message.chat.id, user_id, body, photo=largest)

    async def templates(self, message: Message) -> None:
        try:
            items = await self.client.templates(limit=30)
        except GenserveError as e:
            await message.answer(texts.friendly_error(e))
            return
        rows = [[InlineKeyboardButton(text=f"{t['name']} · {t['category']}", callback_data=f"tpl:{t['name']}")]
                for t in items if len(f"tpl:{t['name']}".encode()) <= _CALLBACK_LIMIT]
        if not rows:
            await message.answer("There are no templates yet.")
            return
        await message.answer("Pick a template:", reply_markup=InlineKeyboardMarkup(inline_keyboard=rows))

    async def pick_template(self, query: CallbackQuery, state: FSMContext) -> None:
        name = (query.data or "")[len("tpl:"):]
        await query.answer()
        chat_id = query.message.chat.id if query.message else query.from_user.id
        try:
            tpl = await self.client.template(name)
        except GenserveError as e:
            await query.bot.send_message(chat_id, texts.friendly_error(e))
            return
        variables = list(tpl.get("variables") or [])
        await query.bot.send_message(chat_id, f"Template {tpl['name']}:\n{tpl['template']}"
                                              + (f"\nDefaults: {tpl['defaults']}" if tpl.get("defaults") else ""))
        await state.set_state(Flow.variable)
        await state.set_data({"template": tpl["name"], "pending": variables, "values": {}})
        await self._next_variable(query.bot, chat_id, query.from_user.id, state)

    async def on_variable(self, message: Message, state: FSMContext) -> None:
        data = await state.get_data()
        pending, values = list(data["pending"]), dict(data["values"])
        values[pending.pop(0)] = (message.text or "").strip()
        await state.update_data(pending=pending, values=values)
        user_id = message.from_user.id if message.from_user else message.chat.id
        await self._next_variable(message.bot, message.chat.id, user_id, state)

    async def _next_variable(self, bot: Bot, chat_id: int, user_id: int, state: FSMContext) -> None:
        data = await state.get_data()
        if data["pending"]:
            await bot.send_message(chat_id, f"Value for {{{data['pending'][0]}}}?")
            return
        await state.clear()
        values = dict(data["values"])
        # The template's {prompt} is filled from the request's prompt text; the prompt also carries
        # the user's --ar. A request needs some prompt text: the template name is harmless there.
        prefs = self.prefs_of(user_id)
        prompt = with_aspect(values.pop("prompt", ""), prefs.aspect) or data["template"]
        body = {"prompt": prompt, "template": data["template"], "variables": values}
        await self.generate(bot, chat_id, user_id, body)

    async def settings_menu(self, message: Message) -> None:
        user_id = message.from_user.id if message.from_user else message.chat.id
        text, markup = await self._settings_view(user_id)
        await message.answer(text, reply_markup=markup)

    async def _settings_view(self, user_id: int) -> tuple[str, InlineKeyboardMarkup | None]:
        prefs = self.prefs_of(user_id)
        try:
            models = [m["id"] for m in await self.client.image_models()]
        except GenserveError as e:
            return texts.friendly_error(e), None

        def mark(label: str, on: bool) -> str:
            return f"✓ {label}" if on else label

        model_row = [InlineKeyboardButton(text=mark("default", prefs.model is None), callback_data="set:model:-")]
        model_row += [InlineKeyboardButton(text=mark(m, prefs.model == m), callback_data=f"set:model:{m}")
                      for m in models if len(f"set:model:{m}".encode()) <= _CALLBACK_LIMIT]
        ar_row = [InlineKeyboardButton(text=mark("native", prefs.aspect is None), callback_data="set:ar:-")]
        ar_row += [InlineKeyboardButton(text=mark(a, prefs.aspect == a), callback_data=f"set:ar:{a}")
                   for a in ASPECT_RATIOS]
        enhance_row = [InlineKeyboardButton(text=mark("✨ enhance", prefs.enhance), callback_data="set:enhance:on"),
                       InlineKeyboardButton(text=mark("as written", not prefs.enhance), callback_data="set:enhance:off")]
        text = (f"Settings\nModel: {prefs.model or 'default'}\nAspect ratio: {prefs.aspect or 'native'}\n"
                f"Enhance prompts: {'on' if prefs.enhance else 'off'}\nTap to change.")
        return text, InlineKeyboardMarkup(inline_keyboard=[model_row, ar_row, enhance_row])

    async def change_setting(self, query: CallbackQuery) -> None:
        _, key, value = (query.data or "").split(":", 2)
        prefs = self.prefs_of(query.from_user.id)
        chosen = None if value == "-" else value
        if key == "model":
            prefs.model = chosen
        elif key == "ar" and (chosen is None or chosen in ASPECT_RATIOS):
            prefs.aspect = chosen
        elif key == "enhance" and value in ("on", "off"):
            prefs.enhance = value == "on"
        else:
            await query.answer("Unknown setting.")
            return
        label = {"model": "Model", "ar": "Aspect ratio", "enhance": "Enhance prompts"}[key]
        await query.answer(f"{label}: {value if chosen else 'default'}")
        text, markup = await self._settings_view(query.from_user.id)
        if query.message is not None:
            try:
                await query.bot.edit_message_text(text, chat_id=query.message.chat.id,
                                                  message_id=query.message.message_id, reply_markup=markup)
            except TelegramAPIError:  # unchanged text, or the message is gone: the choice still holds
                pass

    async def fallback(self, message: Message) -> None:
        await message.answer("Send /txt2img to draw something, or /help to see what I can do.")

    # -- one generation ---------------------------------------------------------------------

    async def generate(self, bot: Bot, chat_id: int, user_id: int, body: dict[str, Any], *,
                       photo: PhotoSize | None = None) -> None:
        """One job from `body`; with `photo`, the photo is uploaded first and becomes the image prompt."""
        wait = self.limiter.try_acquire(user_id)
        if wait is not None:
            await bot.send_message(chat_id, texts.slow_down(wait))
            return
        prefs = self.prefs_of(user_id)
        if prefs.model:
            body = {"model": prefs.model, **body}
        if prefs.enhance:
            body = {**body, "enhance": True}
        body = {**body, "n": 1, "user": f"telegram:{user_id}"}
        status = await bot.send_message(chat_id, "⏳ sending your request…")
        shown = status.text

        async def show(text: str) -> None:
            nonlocal shown
            if text == shown:  # Telegram rejects an edit that changes nothing
                return
            try:
                await bot.edit_message_text(text, chat_id=chat_id, message_id=status.message_id)
                shown = text
            except TelegramAPIError as e:
                logger.warning("could not edit the status message: %s", e)

        try:
            if photo is not None:
                await show("⏳ uploading your photo…")
                data = await self._download(bot, photo)
                if data is None:
                    self.limiter.refund(user_id)
                    await show(texts.PHOTO_DOWNLOAD_FAILED)
                    return
                # genserve checks it (size, format, pixels) and answers 413/422 naming `file`.
                uploaded = await self.client.upload_image(data, f"telegram-{photo.file_unique_id}.jpg")
                body = {**body, "prompt": f"{uploaded['id']} {body['prompt']}"}
            job = await self.client.submit_job(body)
            deadline = asyncio.get_running_loop().time() + self.settings.job_timeout_s
            while job["status"] in ("queued", "running"):
                await show(texts.progress_text(job))
                if asyncio.get_running_loop().time() > deadline:
                    await self.client.cancel_job(job["id"])
                    await show("⌛ This took too long and was cancelled. Please try again later.")
                    return
                await asyncio.sleep(self.settings.poll_interval_s)
                job = await self.client.job(job["id"])
            await show(texts.progress_text(job))
            if job["status"] != "succeeded":
                return
            for i, result in enumerate(job.get("results") or []):
                png = await self.client.download(result["url"])
                await bot.send_photo(chat_id, BufferedInputFile(png, filename=f"{job['id']}-{i}.png"),
                                     caption=texts.caption(job, i))
        except GenserveError as e:
            if e.status in (400, 404, 409, 413, 422):  # a typo in the prompt shouldn't use up the user's turn
                self.limiter.refund(user_id)
            await show(texts.friendly_error(e))

    @staticmethod
    async def _download(bot: Bot, photo: PhotoSize) -> bytes | None:
        """The photo's bytes through the Bot API (getFile, then the file URL); None if Telegram
        refuses (a file over the Bot API's 20 MB download limit, an expired file id) or fails."""
        buf = io.BytesIO()
        try:
            await bot.download(photo.file_id, destination=buf)
        except (TelegramAPIError, aiohttp.ClientError, TimeoutError) as e:
            logger.warning("could not download photo %s: %s", photo.file_unique_id, e)
            return None
        return buf.getvalue()


async def on_error(event: ErrorEvent) -> bool:
    """Anything unexpected: logged with its traceback here, a short apology in the chat."""
    logger.error("update %s failed", event.update.update_id, exc_info=event.exception)
    msg = event.update.message or (event.update.callback_query.message if event.update.callback_query else None)
    if msg is not None:
        try:
            await msg.bot.send_message(msg.chat.id, "😕 Something went wrong. Please try again.")
        except TelegramAPIError:
            pass
    return True


def build_dispatcher(settings: BotSettings, client: GenserveClient | None = None) -> Dispatcher:
    client = client or GenserveClient(settings.genserve_url, settings.api_key)
    app = GenserveBot(settings, client)
    router = Router(name="genserve")
    router.message.register(app.start, CommandStart())
    router.message.register(app.help, Command("help"))
    router.message.register(app.cancel, Command("cancel"))
    router.message.register(app.txt2img, Command("txt2img"))
    router.message.register(app.templates, Command("templates"))
    router.message.register(app.settings_menu, Command("settings"))
    router.message.register(app.on_photo, F.photo)  # in any state: a photo starts its own request
    router.message.register(app.on_prompt, StateFilter(Flow.prompt), F.text)
    router.message.register(app.on_variable, StateFilter(Flow.variable), F.text)
    router.message.register(app.fallback)
    router.callback_query.register(app.pick_template, F.data.startswith("tpl:"))
    router.callback_query.register(app.change_setting, F.data.startswith("set:"))
    router.errors.register(on_error)

    dp = Dispatcher(storage=MemoryStorage())
    dp["genserve_bot"] = app
    dp.include_router(router)
    dp.shutdown.register(client.aclose)
    return dp


def build_bot(settings: BotSettings) -> Bot:
    session = None
    if settings.telegram_api_base:
        session = AiohttpSession(api=TelegramAPIServer.from_base(settings.telegram_api_base))
    return Bot(settings.telegram_token, session=session)


async def run_polling(settings: BotSettings, *, handle_signals: bool = True, polling_timeout: int = 30) -> None:
    """Long polling until stopped (SIGINT/SIGTERM, or `Dispatcher.stop_polling`)."""
    bot = build_bot(settings)
    dp = build_dispatcher(settings)
    try:
        await bot.set_my_commands(COMMANDS)
    except TelegramAPIError as e:  # the menu is a nicety; polling still works without it
        logger.warning("setMyCommands failed: %s", e)
    await dp.start_polling(bot, handle_signals=handle_signals, polling_timeout=polling_timeout)
