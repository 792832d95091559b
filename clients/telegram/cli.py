"""`genserve bot`: run the Telegram bot with long polling (config from the environment)."""

from __future__ import annotations

import asyncio
import logging

import click


@click.command("bot")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def bot(log_level: str) -> None:
    """Run the Telegram bot (long polling).

    Needs TELEGRAM_BOT_TOKEN, GENSERVE_URL and GENSERVE_API_KEY; optional TELEGRAM_API_BASE
    (a self-hosted Bot API server), GENSERVE_BOT_POLL_S, GENSERVE_BOT_JOB_TIMEOUT_S,
    GENSERVE_BOT_USER_JOBS and GENSERVE_BOT_USER_WINDOW_S (per-user limit inside the bot).
    """
    from clients.telegram.bot import run_polling
    from clients.telegram.config import BotSettings

    try:
        settings = BotSettings.from_env()
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    click.echo(f"genserve bot: polling Telegram for {settings.genserve_url} (Ctrl-C stops)")
    asyncio.run(run_polling(settings))
