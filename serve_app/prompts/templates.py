"""Filling `{placeholders}` in prompt templates by plain substitution.

No `str.format`: a template or a variable must never be able to reach attributes
(`{0.__init__}`, `{__class__}`); anything that isn't `{identifier}` is left as literal text.
"""

from __future__ import annotations

import re

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]{0,63})\}")


class MissingVariableError(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"template variable {name!r} has no value")
        self.name = name


def placeholders(template: str) -> list[str]:
    """Names in order of first appearance."""
    seen: dict[str, None] = {}
    for m in _PLACEHOLDER.finditer(template):
        seen.setdefault(m.group(1), None)
    return list(seen)


def fill(template: str, variables: dict[str, str]) -> str:
    """One pass, left to right; substituted values are never re-scanned for placeholders."""

    def _sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in variables:
            raise MissingVariableError(name)
        return str(variables[name])

    return _PLACEHOLDER.sub(_sub, template)
