"""A random secret shared by every replica on one node: read it from a file, or create it once.

Creation is atomic (write a private temp file, then `link` it into place, which fails if another
replica won the race), so replicas starting together end up with the same key.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def persisted_secret(path: Path, *, nbytes: int = 32) -> bytes:
    """The hex secret stored at `path` (mode 0600), created on first use."""
    path = Path(path)
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(nbytes))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another replica created it first: use theirs
    finally:
        tmp.unlink(missing_ok=True)
    return _read(path)


def _read(path: Path) -> bytes:
    value = path.read_text().strip()
    if len(value) < 32:
        raise ValueError(f"secret file {str(path)!r} holds {len(value)} characters; expected at least 32")
    return value.encode()
