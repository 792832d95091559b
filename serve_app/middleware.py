"""Small ASGI guards that run before routing: body size and content type."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.errors import APIError

_BODY_METHODS = {"POST", "PUT", "PATCH"}


class _TooLarge(APIError):
    """An APIError, so the app's own handler renders it if raised while the body is read."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"Request body exceeds {limit} bytes.", code="request_too_large")


class RequestGuard:
    """413 for bodies over `max_body_bytes` (declared or streamed); 400 for non-JSON API bodies."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, json_prefixes: tuple[str, ...] = ("/v1/", "/admin/"),
                 uploads: dict[str, int] | None = None):
        """`uploads`: exact paths that take multipart/form-data file uploads, with their own body
        limit (`POST /v1/adapters`: an adapter archive)."""
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.json_prefixes = json_prefixes
        self.uploads = dict(uploads or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            return await self.app(scope, receive, send)
        upload_limit = self.uploads.get(scope["path"])
        if upload_limit is not None:
            return await RequestGuard(self.app, upload_limit, json_prefixes=())(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._reject(scope, receive, send, self._too_large())
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if scope["path"].startswith(self.json_prefixes) and declared != "0" and ctype != "application/json":
            err = APIError(400, f"Content-Type must be application/json, got {ctype or 'none'!r}.",
                           param="Content-Type", code="invalid_content_type")
            return await self._reject(scope, receive, send, err)

        received = 0
        overflow = False

        async def limited_receive() -> Message:
            nonlocal received, overflow
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    overflow = True
                    raise _TooLarge(self.max_body_bytes)
            return message

        replaced = False

        async def guarded_send(message: Message) -> None:
            # Frameworks may turn the exception above into their own 400 ("error parsing the
            # body"); whatever they answer, an overflowing body gets our 413 instead.
            nonlocal replaced
            if overflow:
                if not replaced:
                    replaced = True
                    await _TooLarge(self.max_body_bytes).response()(scope, receive, send)
                return
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge as e:
            if not replaced:
                await e.response()(scope, receive, send)

    def _too_large(self) -> APIError:
        return _TooLarge(self.max_body_bytes)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, err: APIError) -> None:
        await err.response()(scope, receive, send)
