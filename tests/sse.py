"""Server-sent events for tests: the (event name, data) pairs of an SSE body."""

from __future__ import annotations

import json
from collections.abc import Iterator


def events(lines: Iterator[str]) -> Iterator[tuple[str, dict]]:
    """(event name, JSON data) of each event in `lines` (an SSE body's lines, e.g. httpx's
    `iter_lines()`); events without a name are "message"."""
    name, data = None, []
    for line in lines:
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            yield name or "message", json.loads("\n".join(data))
            name, data = None, []
