"""`trusted_hosts`: refuse requests whose Host header is not listed (AppConfig.trusted_hosts).

Matching is Starlette's TrustedHostMiddleware (exact names, `*.example.com` wildcards, port
ignored); only the refusal differs: OpenAI-style error JSON like every other 400 here. URLs are
never built from Host either way (AppConfig.public_base_url); this keeps foreign names out entirely.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.errors import APIError

_PASSED = "genserve.trusted_host"


async def _discard(message: Message) -> None:
    return None


class TrustedHosts:
    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str]) -> None:
        self.app = app
        self._check = TrustedHostMiddleware(self._mark, allowed_hosts=list(allowed_hosts), www_redirect=False)

    @staticmethod
    async def _mark(scope: Scope, receive: Receive, send: Send) -> None:
        scope[_PASSED] = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        await self._check(scope, receive, _discard)  # Starlette's rules; its plain-text refusal is dropped
        if scope.pop(_PASSED, False):
            await self.app(scope, receive, send)
            return
        error = APIError(400, "Invalid Host header: this server only answers for its configured host names.",
                         param="Host", code="invalid_host")
        await error.response()(scope, receive, send)
