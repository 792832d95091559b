"""Rules for what a stored template may contain. Errors are 400s that name the field and value."""

from __future__ import annotations

import re

from serve_app.errors import APIError, bad_request
from serve_app.prompts.params import PromptParameterError, parse_prompt
from serve_app.prompts.templates import _PLACEHOLDER

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
CATEGORY = re.compile(r"[a-z0-9][a-z0-9 _-]{0,63}")
TAG = re.compile(r"[a-z0-9][a-z0-9 _.:+-]{0,63}")
MAX_TEMPLATE_CHARS = 4000
MAX_TAGS = 32


def _show(value: str, limit: int = 60) -> str:
    return repr(value if len(value) <= limit else value[: limit - 3] + "...")


def check_name(name: str, param: str = "name") -> str:
    if not NAME.fullmatch(name):
        raise bad_request(f"{param} must be 1-128 letters, digits, '.', '_' or '-' (starting with a letter or "
                          f"digit), got {_show(name)}.", param=param, code="invalid_template_name")
    return name


def check_category(category: str) -> str:
    value = category.strip().lower()
    if not CATEGORY.fullmatch(value):
        raise bad_request(f"category must be 1-64 lowercase letters, digits, spaces, '_' or '-', got "
                          f"{_show(category)}.", param="category")
    return value


def check_tags(tags: list[str]) -> list[str]:
    out: dict[str, None] = {}
    for raw in tags:
        tag = raw.strip().lower()
        if not TAG.fullmatch(tag):
            raise bad_request(f"each tag must be 1-64 lowercase letters, digits, spaces or _.:+-, got "
                              f"{_show(raw)}.", param="tags")
        out.setdefault(tag, None)
    if len(out) > MAX_TAGS:
        raise bad_request(f"at most {MAX_TAGS} tags, got {len(out)}.", param="tags")
    return list(out)


def check_template(template: str) -> str:
    """Only `{identifier}` placeholders: any other brace would be literal text at render time,
    which is never what the author meant (`{0.__init__}`, `{{a}}`, `{a{b}}`), so refuse it here."""
    if not template.strip():
        raise bad_request("template must not be empty.", param="template")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise bad_request(f"template is {len(template)} characters; the limit is {MAX_TEMPLATE_CHARS}.",
                          param="template")
    rest = _PLACEHOLDER.sub("", template)
    if "{" in rest or "}" in rest:
        at = min(i for i in (rest.find("{"), rest.find("}")) if i >= 0)
        raise bad_request(f"template placeholders must be {{identifier}} (letters, digits, '_'); found a stray "
                          f"brace near {_show(rest[max(0, at - 10): at + 20])}.", param="template",
                          code="invalid_template")
    return template


def check_defaults(defaults: str) -> str:
    """Default parameters must be flags only (`--ar 16:9 --s 250`) and must parse."""
    try:
        parsed = parse_prompt(defaults)
    except PromptParameterError as e:
        raise APIError(400, f"defaults: {e.message}", param="defaults", code="invalid_prompt_parameter") from None
    if parsed.text.strip():
        raise bad_request(f"defaults may hold only parameters like '--ar 16:9 --s 250', got text "
                          f"{_show(parsed.text.strip())}.", param="defaults")
    return " ".join(defaults.split())
