"""A small async client of genserve's public HTTP API (jobs, models, templates, file uploads), over httpx."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx


class GenserveError(Exception):
    """A failed API call: the HTTP status (0 = unreachable) and the API's own error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    @classmethod
    def from_response(cls, r: httpx.Response) -> GenserveError:
        try:
            err = r.json().get("error") or {}
        except ValueError:
            err = {}
        message = err.get("message") if isinstance(err, dict) else None
        retry = r.headers.get("Retry-After")
        return cls(r.status_code, message or r.reason_phrase or "request failed",
                   param=err.get("param") if isinstance(err, dict) else None,
                   code=err.get("code") if isinstance(err, dict) else None,
                   retry_after_s=float(retry) if retry and retry.replace(".", "", 1).isdigit() else None)


class GenserveClient:
    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s, transport=transport,
                                       headers={"Authorization": f"Bearer {api_key}"})

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise GenserveError(0, f"genserve is unreachable ({type(e).__name__})") from None
        if r.status_code >= 400:
            raise GenserveError.from_response(r)
        return r.json()

    async def image_models(self) -> list[dict[str, Any]]:
        data = (await self._call("GET", "/v1/models"))["data"]
        return [m for m in data if m.get("capability") == "image"]

    async def templates(self, limit: int = 50) -> list[dict[str, Any]]:
        return (await self._call("GET", "/v1/templates", params={"limit": limit}))["data"]

    async def template(self, name: str) -> dict[str, Any]:
        return await self._call("GET", f"/v1/templates/{quote(name, safe='')}")

    async def upload_image(self, data: bytes, filename: str) -> dict[str, Any]:
        """`POST /v1/files` (purpose `vision`): the server checks the image (413/422 naming `file`)
        and answers its file object; the `id` (`file-...`) can start a prompt as an image prompt."""
        return await self._call("POST", "/v1/files", data={"purpose": "vision"},
                                files={"file": (filename, data, "application/octet-stream")})

    async def submit_job(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call("POST", "/v1/jobs", json=body)

    async def job(self, job_id: str) -> dict[str, Any]:
        return await self._call("GET", f"/v1/jobs/{job_id}")

    async def cancel_job(self, job_id: str) -> dict[str, Any]:
        return await self._call("DELETE", f"/v1/jobs/{job_id}")

    async def download(self, url: str) -> bytes:
        """A result URL is signed: fetched without the key (it may point at S3, not at genserve)."""
        try:
            async with httpx.AsyncClient(timeout=self._http.timeout) as plain:
                r = await plain.get(url)
        except httpx.HTTPError as e:
            raise GenserveError(0, f"the image could not be downloaded ({type(e).__name__})") from None
        if r.status_code >= 400:
            raise GenserveError.from_response(r)
        return r.content
