"""The `ResultStore` interface, key rules, and the retry loop every backend's `put` goes through."""

from __future__ import annotations

import logging
import re
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

import anyio

from telemetry import tracing

logger = logging.getLogger("genserve.storage")

T = TypeVar("T")

# Each path segment: starts with a letter or digit, then letters, digits, `.`, `_`, `-`.
# So no empty segments, no `.`/`..`, no leading `/`, no backslashes or control characters.
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_KEY_LEN = 512


class StorageError(Exception):
    """An upload (or other storage call) failed for good; `reason` says why."""

    def __init__(self, reason: str, *, key: str | None = None, attempts: int = 1) -> None:
        where = f" (key {key!r}, {attempts} attempt{'s' if attempts != 1 else ''})" if key else ""
        super().__init__(f"{reason}{where}")
        self.reason, self.key, self.attempts = reason, key, attempts


class InvalidKeyError(StorageError, ValueError):
    pass


class PermanentError(Exception):
    """Raised inside an attempt when retrying cannot help (missing bucket, access denied)."""


def validate_key(key: str) -> str:
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LEN:
        raise InvalidKeyError(f"invalid storage key {key!r}: must be 1..{MAX_KEY_LEN} characters")
    for seg in key.split("/"):
        if not _SEGMENT.fullmatch(seg) or ".." in seg:
            raise InvalidKeyError(f"invalid storage key {key!r}: segment {seg!r} must match "
                                  f"[A-Za-z0-9][A-Za-z0-9._-]* without '..'")
    return key


def new_result_id() -> str:
    return "img_" + secrets.token_hex(12)


def result_key(tenant: str | int, result_id: str | None = None, *, when: datetime | None = None,
               ext: str = "png") -> str:
    """`{tenant}/{yyyy}/{mm}/{dd}/{id}.{ext}` (UTC date), validated."""
    when = when or datetime.now(UTC)
    rid = result_id or new_result_id()
    return validate_key(f"{tenant}/{when:%Y}/{when:%m}/{when:%d}/{rid}.{ext}")


def with_retries(op: Callable[[], T], *, what: str, key: str, attempts: int, backoff_s: float) -> T:
    """Run `op` up to `attempts` times with exponential backoff; StorageError with the last reason."""
    last = "unknown error"
    for i in range(1, attempts + 1):
        try:
            return op()
        except PermanentError as e:
            raise StorageError(f"{what} failed: {e}", key=key, attempts=i) from e
        except Exception as e:  # noqa: BLE001 - any backend error is a failed attempt, reported below
            last = f"{type(e).__name__}: {e}"
            logger.warning("%s of %s failed (attempt %d/%d): %s", what, key, i, attempts, last)
            if i < attempts:
                time.sleep(backoff_s * (2 ** (i - 1)))
    raise StorageError(f"{what} failed after {attempts} attempts: {last}", key=key, attempts=attempts)


class ResultStore(ABC):
    """Where generated images live. Methods block (file or network I/O): from async code call the
    `a*` variants, which run them in a worker thread."""

    backend: str

    @abstractmethod
    def put(self, key: str, data: bytes, content_type: str = "image/png") -> str:
        """Store `data` under `key` (retried; StorageError if it can't be stored). Returns the key."""

    @abstractmethod
    def url(self, key: str, *, expires_s: int | None = None) -> str:
        """A URL a client can GET without an API key, valid for `expires_s` (default: configured). Its
        origin comes from configuration only, never from a request's Host header (a client could
        otherwise make the server hand out, and sign webhooks with, URLs on a host of its choosing)."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes (used for stored LoRA adapters); FileNotFoundError if it is missing."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; deleting a missing key is not an error."""

    async def aput(self, key: str, data: bytes, content_type: str = "image/png") -> str:
        with tracing.span("storage.put", backend=self.backend, key=key, bytes=len(data)):
            return await anyio.to_thread.run_sync(lambda: self.put(key, data, content_type))

    async def aexists(self, key: str) -> bool:
        return await anyio.to_thread.run_sync(self.exists, key)

    async def adelete(self, key: str) -> None:
        await anyio.to_thread.run_sync(self.delete, key)
