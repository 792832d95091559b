"""API keys: 256-bit random secrets, stored only as HMAC-SHA256(pepper, key) plus a visible prefix.

The prefix (`gsk_` + 8 chars) finds the row; the hash is compared with `hmac.compare_digest`.
A key's entropy makes a slow KDF unnecessary: nobody can brute-force 2**256 from a leaked hash.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

KEY_PREFIX = "gsk_"
PREFIX_LEN = len(KEY_PREFIX) + 8
_KEY_RE = re.compile(r"^gsk_[A-Za-z0-9_-]{40,64}$")
# Hash of nothing in particular: compared against when the prefix is unknown, so an unknown
# prefix costs the same time as a wrong secret.
DUMMY_HASH = "0" * 64


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)  # 43 chars, 256 bits


def key_prefix(key: str) -> str:
    return key[:PREFIX_LEN]


def looks_like_key(key: str) -> bool:
    return bool(_KEY_RE.match(key))


def hash_key(key: str, pepper: str) -> str:
    return hmac.new(pepper.encode(), key.encode(), hashlib.sha256).hexdigest()


def verify(key: str, stored_hash: str, pepper: str) -> bool:
    return hmac.compare_digest(hash_key(key, pepper), stored_hash)
