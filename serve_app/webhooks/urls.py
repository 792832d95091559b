"""Which webhook URLs the server will POST to: http(s) only, and not into private networks (SSRF)
unless the operator allows it. The rules are the URL guard's (serve_app/netguard); this module
turns a refusal into a 400 naming `webhook_url`. Checked when a job is accepted and again at each
delivery, where the guard also connects only to the addresses it checked (no DNS rebinding)."""

from __future__ import annotations

from collections.abc import Sequence

from serve_app.errors import APIError, bad_request
from serve_app.netguard import AddressPolicy, Resolver, UrlGuard, URLRefused


def webhook_guard(*, allow_private: bool = False, allow_hosts: Sequence[str] = (),
                  resolver: Resolver | None = None) -> UrlGuard:
    return UrlGuard(AddressPolicy.of(allow_private=allow_private, allow_hosts=allow_hosts), resolver=resolver)


def refused(url: object, why: str) -> APIError:
    text = str(url)
    shown = text if len(text) <= 120 else text[:117] + "..."
    return bad_request(f"webhook_url {shown!r} is not allowed: {why}.", param="webhook_url",
                       code="invalid_webhook_url")


async def acheck_webhook_url(url: str, guard: UrlGuard) -> None:
    try:
        await guard.check(url)
    except URLRefused as e:
        raise refused(url, str(e)) from None


async def avalidate_webhook_url(url: str, *, allow_private: bool = False, allow_hosts: Sequence[str] = ()) -> None:
    """400 (param `webhook_url`) unless `url` is http(s) to a public address or an allowed host."""
    await acheck_webhook_url(url, webhook_guard(allow_private=allow_private, allow_hosts=allow_hosts))


def validate_webhook_url(url: str, *, allow_private: bool = False, allow_hosts: Sequence[str] = ()) -> None:
    """Blocking form of `avalidate_webhook_url`, for code outside an event loop."""
    check_webhook_url_blocking(url, webhook_guard(allow_private=allow_private, allow_hosts=allow_hosts))


def check_webhook_url_blocking(url: str, guard: UrlGuard) -> None:
    try:
        guard.check_blocking(url)
    except URLRefused as e:
        raise refused(url, str(e)) from None
