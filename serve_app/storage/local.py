"""Results as files in a directory, served by the ingress at signed, expiring URLs.

URL: `{base}/files/{key}?expires={unix_s}&sig={hex}` with sig = HMAC-SHA256(signing_key,
"{key}\\n{expires}"). Whoever holds the URL may fetch the file until `expires`; nothing else works.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path
from urllib.parse import quote, urlencode

from serve_app.storage.base import InvalidKeyError, ResultStore, validate_key, with_retries


def file_signature(signing_key: bytes, key: str, expires: int) -> str:
    return hmac.new(signing_key, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()


class LocalResultStore(ResultStore):
    backend = "local"

    def __init__(self, root: Path, *, signing_key: bytes, url_expiry_s: int = 3600,
                 public_base_url: str | None = None, put_attempts: int = 4, retry_backoff_s: float = 0.25,
                 route_prefix: str = "/files") -> None:
        if len(signing_key) < 16:
            raise ValueError(f"signing_key must be at least 16 bytes, got {len(signing_key)}")
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._key = signing_key
        self.url_expiry_s = url_expiry_s
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.put_attempts, self.retry_backoff_s = put_attempts, retry_backoff_s
        self.route_prefix = route_prefix.rstrip("/")

    def path_of(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        if not path.is_relative_to(self.root):  # a symlink inside the dir pointing out of it
            raise InvalidKeyError(f"storage key {key!r} resolves outside the results directory")
        return path

    def put(self, key: str, data: bytes, content_type: str = "image/png") -> str:
        path = self.path_of(key)

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Temp name starts with "." so it is never a valid key: a half-written file can't be served.
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)

        with_retries(write, what="write", key=key, attempts=self.put_attempts, backoff_s=self.retry_backoff_s)
        return key

    def sign(self, key: str, expires: int) -> str:
        return file_signature(self._key, key, expires)

    def verify(self, key: str, expires: int, sig: str, *, now: float | None = None) -> bool:
        """Constant-time check of a URL's signature, and that it hasn't expired."""
        good = hmac.compare_digest(self.sign(key, expires).encode(), sig.encode())
        return good and expires > (time.time() if now is None else now)

    def url(self, key: str, *, expires_s: int | None = None) -> str:
        validate_key(key)
        expires = int(time.time()) + (self.url_expiry_s if expires_s is None else expires_s)
        base = self.public_base_url or ""  # unset: a relative URL, never one built from the request
        query = urlencode({"expires": expires, "sig": self.sign(key, expires)})
        return f"{base}{self.route_prefix}/{quote(key)}?{query}"

    def exists(self, key: str) -> bool:
        return self.path_of(key).is_file()

    def get(self, key: str) -> bytes:
        return self.path_of(key).read_bytes()

    def delete(self, key: str) -> None:
        self.path_of(key).unlink(missing_ok=True)
