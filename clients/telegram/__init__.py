"""Telegram bot for genserve (aiogram 3): `/txt2img`, `/templates`, `/settings` over the public API."""

from clients.telegram.api import GenserveClient, GenserveError
from clients.telegram.bot import build_bot, build_dispatcher, run_polling
from clients.telegram.config import BotSettings

__all__ = ["BotSettings", "GenserveClient", "GenserveError", "build_bot", "build_dispatcher", "run_polling"]
