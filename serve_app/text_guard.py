"""Text the app can store and encode: one check at the edge, one repair where stored JSON is read.

Python's `json` decodes `"\\ud800"` (and CESU-8 bytes) into a lone UTF-16 surrogate, a `str` that
no UTF-8 encoder accepts: SQLite, Postgres, pydantic's JSON serializer and the tokenizers all
fail on it later, after the request was admitted or even stored. NUL (U+0000) is refused by
Postgres in text and JSONB. So every string of a request (JSON body at any depth, dict keys
included, form fields, query and path parameters) is checked once, before any route code runs,
and a bad one is a 400 naming its field. Rows stored before this check existed are repaired
when read (`loads_repaired`), so one bad row never breaks a tenant's list.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import Request

from serve_app.errors import APIError

_BAD = re.compile("[\x00\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def _describe(text: str) -> str:
    return "a NUL character" if "\x00" in text else "an unpaired UTF-16 surrogate"


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def find_invalid_text(value: Any, path: str = "") -> tuple[str, str] | None:
    """(field path, what is wrong) of the first string, or dict key, that can't be stored; else None.
    Paths look like the rest of the API's `param`s: `variables.subject`, `messages[0].content`."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if _BAD.search(item):
                return where, _describe(item)
        elif isinstance(item, dict):
            for k, v in reversed(item.items()):
                if isinstance(k, str) and _BAD.search(k):
                    return where, f"{_describe(k)} in a key"
                stack.append((v, _join(where, k)))
        elif isinstance(item, list):
            stack.extend((v, _join(where, i)) for i, v in reversed(list(enumerate(item))))
    return None


def invalid_text_error(param: str, problem: str) -> APIError:
    shown = param or "the request body"
    return APIError(400, f"Invalid value for '{shown}': text must be valid Unicode; it contains {problem}.",
                    param=param or None, code="invalid_text")


def check_text(value: Any, path: str = "") -> None:
    if (bad := find_invalid_text(value, path)) is not None:
        raise invalid_text_error(*bad)


def _may_hold_bad_text(raw: bytes) -> bool:
    # Valid JSON can carry a surrogate or NUL only as a `\u` escape or as raw 0xED.. (CESU-8)
    # bytes, which json.loads decodes with `surrogatepass`. Most bodies have neither: no walk.
    return b"\\u" in raw or b"\xed" in raw


async def reject_invalid_text(request: Request) -> None:
    """App-wide dependency: runs after FastAPI parsed the body (the parse is cached on the
    request, not repeated) and before body validation, auth and admission."""
    check_text(dict(request.path_params))
    for key, value in request.query_params.multi_items():
        check_text({key: value})
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in _FORM_TYPES:
        form = await request.form()
        check_text({k: v for k, v in form.multi_items() if isinstance(v, str)})
        return
    raw = await request.body()
    if not raw or not _may_hold_bad_text(raw):
        return
    try:
        body = await request.json()
    except ValueError:  # not JSON: the route's own parsing answers that
        return
    check_text(body)


def repair_text(value: Any) -> Any:
    """`value` with every lone surrogate replaced by U+FFFD (the object itself if none)."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value) if _SURROGATE.search(value) else value
    if isinstance(value, dict):
        return {repair_text(k): repair_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [repair_text(v) for v in value]
    return value


def loads_repaired(text: str | bytes) -> Any:
    """`json.loads` for stored JSON columns: a row written before the edge check (or by hand)
    that holds a lone surrogate reads back repaired, instead of failing every response it is in."""
    value = json.loads(text)
    # Only an escape (or a raw surrogate) can put a lone surrogate into the result.
    if isinstance(text, bytes) or "\\u" in text or _SURROGATE.search(text):
        return repair_text(value)
    return value
