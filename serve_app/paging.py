"""The paging parameters of every list route, bounded before any database sees them.

An unbounded integer query parameter reaches SQLite/Postgres as LIMIT/OFFSET and overflows there
(`?offset=9223372036854775808` was a 500). Out-of-range values are a 422 naming the parameter;
a value that is not an integer stays a 400, like every other malformed parameter.
"""

# No `from __future__ import annotations`: FastAPI reads the dependencies' annotations, which
# close over each route's own maximum, at route set-up.
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Query

from serve_app.errors import unprocessable

# Deeper than any client pages by offset; OFFSET scans and skips rows, so it is kept modest.
MAX_OFFSET = 100_000


@dataclass(frozen=True)
class Page:
    limit: int
    offset: int = 0


def _bounded(name: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise unprocessable(f"{name} must be between {low} and {high}, got {value}.", param=name,
                            code="out_of_range")
    return value


def paging(*, default_limit: int, max_limit: int) -> Callable[..., Awaitable[Page]]:
    """A dependency for `?limit=&offset=` routes."""

    async def page(limit: Annotated[int, Query(description=f"1 to {max_limit}.")] = default_limit,
                   offset: Annotated[int, Query(description=f"0 to {MAX_OFFSET}.")] = 0) -> Page:
        return Page(limit=_bounded("limit", limit, 1, max_limit), offset=_bounded("offset", offset, 0, MAX_OFFSET))

    return page


def limit_only(*, default_limit: int, max_limit: int) -> Callable[..., Awaitable[int]]:
    """A dependency for cursor-paged routes (`?limit=&after=`): the limit alone."""

    async def page_limit(limit: Annotated[int, Query(description=f"1 to {max_limit}.")] = default_limit) -> int:
        return _bounded("limit", limit, 1, max_limit)

    return page_limit
