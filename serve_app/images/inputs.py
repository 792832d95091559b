"""A user's image → a checked `InputImage` (deployments/diffusion/types.py), on the ingress only.

Sources: bytes sent with the request (multipart), a `data:` URL, a tenant's upload (`file-...`,
POST /v1/files) or an http(s) URL. Every one takes the same road:

1. URLs only through the URL guard (serve_app/netguard, the webhooks' guard): resolved once,
   non-public addresses refused (unless `image_inputs.allow_hosts`/`allow_private`), the checked
   address pinned, no redirects, one deadline, the body capped at `max_bytes` while it streams.
2. Size cap on the encoded bytes (413) before anything is decoded.
3. Content sniffing: PNG, JPEG or WebP magic bytes, whatever the URL or Content-Type claim (422).
4. Pillow: the header's width x height against `max_pixels` (413, decompression bombs) before any
   pixel is decoded, then `verify()`, then a full `load()` of a fresh handle (422 if broken).
5. RGB (a mask: L, white = repaint), re-encoded as PNG, sha256 of that PNG.

Replicas only ever see step 5's bytes. Every refusal is an `InputRefused` (an APIError, and a ValueError so a
job that fails on it is not retried) that names the request parameter (`image`, `mask`,
`--sref`, ...) and becomes an OpenAI-shaped 400/404/413/422.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings
from typing import Protocol

import anyio
import httpx
from PIL import Image

from deployments.diffusion.types import InputImage
from serve_app.errors import APIError
from serve_app.images.config import ImageInputsConfig
from serve_app.netguard import AddressPolicy, Resolver, ResponseTooLarge, UrlGuard, URLRefused
from serve_app.prompts.params import FILE_ID, is_image_source

_DATA_URL = re.compile(r"data:image/(png|jpeg|jpg|webp);base64,", re.IGNORECASE)
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"))


class InputRefused(APIError, ValueError):
    """A refused input image: `status` 400/404/413/422, `param` the request parameter. An APIError
    (rendered as is by the app) and a ValueError (a job failing on it is not retried)."""

    def __init__(self, status: int, message: str, *, param: str, code: str) -> None:
        APIError.__init__(self, status, message, param=param, code=code)
        self.param: str = param
        self.code: str = code

    def __reduce__(self) -> tuple[object, ...]:  # picklable with its fields (Ray, logs)
        return (_rebuild, (self.status, self.message, self.param, self.code))

    def api_error(self) -> APIError:
        return APIError(self.status, self.message, param=self.param, code=self.code)


def _rebuild(status: int, message: str, param: str, code: str) -> InputRefused:
    return InputRefused(status, message, param=param, code=code)


class UploadSource(Protocol):
    """A tenant's uploads (serve_app/files): the stored PNG of `file_id`, None if it is not theirs."""

    async def read(self, tenant_id: int, file_id: str) -> bytes | None: ...


def shown(source: str, limit: int = 80) -> str:
    """A source for an error message: data URLs are cut to their head, long URLs shortened."""
    if source.startswith("data:"):
        return source[:30] + "..."
    return source if len(source) <= limit else source[: limit - 3] + "..."


def sniff(data: bytes) -> str | None:
    """PNG, JPEG or WEBP from the magic bytes; None for anything else."""
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_image(data: bytes, cfg: ImageInputsConfig, *, param: str, mask: bool = False) -> InputImage:
    """Steps 2–5 above, blocking (Pillow): run it in a worker thread from async code."""
    if len(data) > cfg.max_bytes:
        raise InputRefused(413, f"{param}: the image is {len(data)} bytes; the limit is {cfg.max_bytes}.",
                           param=param, code="image_too_large")
    kind = sniff(data)
    if kind is None:
        raise InputRefused(422, f"{param}: not a PNG, JPEG or WebP image.", param=param, code="invalid_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[kind]) as probe:
                width, height = probe.size  # from the header: nothing decoded yet
                if width * height > cfg.max_pixels:
                    raise _too_many_pixels(param, width, height, cfg)
                probe.verify()
            with Image.open(io.BytesIO(data), formats=[kind]) as im:
                im.load()  # every pixel: a truncated or corrupt file fails here, not on a replica
                out = im.convert("L" if mask else "RGB")
    except InputRefused:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_many_pixels(param, 0, 0, cfg) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputRefused(422, f"{param}: the {kind} image could not be decoded ({type(e).__name__}).",
                           param=param, code="invalid_image") from None
    buf = io.BytesIO()
    out.save(buf, "PNG")  # no timestamps or text: the same pixels give the same bytes and sha256
    png = buf.getvalue()
    return InputImage(png=png, sha256=hashlib.sha256(png).hexdigest())


def _too_many_pixels(param: str, width: int, height: int, cfg: ImageInputsConfig) -> InputRefused:
    size = f"{width}x{height} " if width else ""
    return InputRefused(413, f"{param}: the image {size}has more than {cfg.max_pixels} pixels.",
                        param=param, code="image_too_large")


def alpha_mask(data: bytes, cfg: ImageInputsConfig, *, param: str) -> InputImage | None:
    """OpenAI's rule for an edit without `mask`: the image's fully transparent pixels are the ones
    to repaint. A mask (white = repaint) when the image has some, else None. Blocking."""
    kind = sniff(data)
    if kind is None or len(data) > cfg.max_bytes:
        return None
    with Image.open(io.BytesIO(data), formats=[kind]) as im:
        if im.width * im.height > cfg.max_pixels or ("A" not in im.getbands() and "transparency" not in im.info):
            return None
        alpha = im.convert("RGBA").getchannel("A")
    if alpha.getextrema()[0] != 0:  # no fully transparent pixel
        return None
    out = alpha.point(lambda a: 255 if a == 0 else 0)
    buf = io.BytesIO()
    out.save(buf, "PNG")
    png = buf.getvalue()
    return InputImage(png=png, sha256=hashlib.sha256(png).hexdigest())


def _data_url_bytes(source: str, cfg: ImageInputsConfig, param: str) -> bytes:
    m = _DATA_URL.match(source)
    if m is None:
        raise InputRefused(400, f"{param}: a data URL must be data:image/png|jpeg|webp;base64,...",
                           param=param, code="invalid_image_url")
    payload = source[m.end():]
    if len(payload) * 3 // 4 > cfg.max_bytes + 2:  # before decoding the base64
        raise InputRefused(413, f"{param}: the image is larger than {cfg.max_bytes} bytes.", param=param,
                           code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputRefused(400, f"{param}: the data URL is not valid base64.", param=param,
                           code="invalid_image_url") from None


class ImageInputs:
    """Loads and checks input images for one ingress replica (one guard, one config)."""

    def __init__(self, cfg: ImageInputsConfig, *, uploads: UploadSource | None = None,
                 resolver: Resolver | None = None) -> None:
        self.cfg = cfg
        self.uploads = uploads
        self.guard = UrlGuard(AddressPolicy.of(allow_private=cfg.allow_private, allow_hosts=cfg.allow_hosts),
                              resolver=resolver)

    async def from_bytes(self, data: bytes, *, param: str, mask: bool = False) -> InputImage:
        return await anyio.to_thread.run_sync(lambda: decode_image(data, self.cfg, param=param, mask=mask))

    async def load(self, source: str, *, param: str, tenant_id: int | None, mask: bool = False) -> InputImage:
        """The image `source` names: an http(s) URL, a `data:` URL or a `file-...` id of the tenant."""
        return await self.from_bytes(await self.raw(source, param=param, tenant_id=tenant_id), param=param,
                                     mask=mask)

    async def raw(self, source: str, *, param: str, tenant_id: int | None) -> bytes:
        """The encoded bytes `source` names (not yet checked beyond the size cap)."""
        if source.startswith("data:"):
            return _data_url_bytes(source, self.cfg, param)
        if FILE_ID.fullmatch(source):
            data = await self.uploads.read(tenant_id, source) if self.uploads and tenant_id is not None else None
            if data is None:
                raise InputRefused(404, f"{param}: file {source!r} does not exist (deleted, or not yours).",
                                   param=param, code="file_not_found")
            return data
        if source[:8].lower().startswith(("http://", "https://")):
            return await self._fetch(source, param)
        raise InputRefused(400, f"{param}: {shown(source)!r} is not an image: give an http(s) URL, a data URL "
                           "or a file id (file-...).", param=param, code="invalid_image_url")

    async def _fetch(self, url: str, param: str) -> bytes:
        cfg = self.cfg
        where = f"{param}: image URL {shown(url)!r}"
        try:
            r = await self.guard.get(url, max_bytes=cfg.max_bytes, timeout_s=cfg.fetch_timeout_s,
                                     headers={"Accept": "image/png, image/jpeg, image/webp"})
        except URLRefused as e:
            raise InputRefused(400, f"{where} is not allowed: {e}.", param=param, code="invalid_image_url") from None
        except ResponseTooLarge:
            raise InputRefused(413, f"{where} is larger than {cfg.max_bytes} bytes.", param=param,
                               code="image_too_large") from None
        except TimeoutError:
            raise InputRefused(422, f"{where} did not answer within {cfg.fetch_timeout_s:g} s.", param=param,
                               code="image_fetch_timeout") from None
        except httpx.HTTPError as e:
            raise InputRefused(422, f"{where} could not be fetched ({type(e).__name__}).", param=param,
                               code="image_fetch_failed") from None
        if r.status_code != 200:
            extra = " (redirects are not followed)" if 300 <= r.status_code < 400 else ""
            raise InputRefused(422, f"{where} answered HTTP {r.status_code}{extra}.", param=param,
                               code="image_fetch_failed")
        return r.content


__all__ = ["FILE_ID", "ImageInputs", "InputRefused", "UploadSource", "alpha_mask", "decode_image",
           "is_image_source", "shown", "sniff"]
