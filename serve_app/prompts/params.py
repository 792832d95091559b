"""Midjourney-style prompt parameters: `"a cat::2 a hat --ar 16:9 --s 250 --no text"`.

`parse_prompt` is pure and linear in the prompt length: it splits on whitespace once and
only runs anchored regexes without nested quantifiers on single tokens, so a 100 kB prompt
cannot trigger backtracking blow-ups. Every bad input raises `PromptParameterError` (a
`ValueError`) naming the parameter and the bad value; the HTTP layer turns it into a 422.
Grammar and decisions are documented in docs/prompt-parameters.md.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.diffusion import rules
from deployments.diffusion.rules import SEED_MAX

MAX_AR_SIDE = rules.MAX_ASPECT_SIDE
IW_MAX = 3.0  # Midjourney V6/V7: --iw 0-3 (V5: 0-2); docs/prompt-parameters.md
FILE_ID = re.compile(r"file-[A-Za-z0-9]{8,64}")
_EM_DASH = "\u2014"  # phones autocorrect "--" into an em dash

_INT = re.compile(r"-?[0-9]+")
_NUMBER = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_RATIO = re.compile(r"([0-9]+):([0-9]+)")
_VERSION = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
# A `::` weight is a number written directly after `::` and ending at whitespace, a comma or
# the end. Possessive quantifiers: a failed lookahead never re-scans the digits.
_WEIGHT = re.compile(r"-?(?:[0-9]++(?:\.[0-9]*+)?|\.[0-9]++)(?=[\s,]|$)")


# AUTOMATIC1111's LoRA form, one token: `<lora:name>` or `<lora:name:0.8>` (issue 21).
_LORA = re.compile(r"<lora:([A-Za-z0-9][A-Za-z0-9_.-]{0,63})(?::(-?(?:[0-9]{1,3}(?:\.[0-9]{0,6})?|\.[0-9]{1,6})))?>")
LORA_WEIGHT_MAX = 4.0
MAX_LORAS = 8


class PromptParameterError(ValueError):
    """A bad prompt parameter. `param` is the flag as written (e.g. "--ar", or "::")."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep it picklable (Ray, multiprocessing): the default would call cls(message).
        return (type(self), (self.param, self.message))


class LoraParam(BaseModel):
    """A LoRA adapter the prompt or request asks for, by registry name (or id), and its weight."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    weight: float = Field(1.0, ge=-LORA_WEIGHT_MAX, le=LORA_WEIGHT_MAX, allow_inf_nan=False)


class PromptParams(BaseModel):
    """Typed generation parameters given in the prompt; None/False/() means "not given"."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    aspect_ratio: tuple[int, int] | None = Field(None, description="--ar W:H, as written")
    stylize: int | None = Field(None, ge=0, le=1000, description="--s")
    chaos: int | None = Field(None, ge=0, le=100, description="--c")
    quality: float | None = Field(None, ge=0.25, le=2.0, description="--q")
    negative: tuple[str, ...] = Field((), description="--no terms, in order")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="--seed")
    tile: bool = Field(False, description="--tile")
    model: str | None = Field(None, description='--model NAME, or "v"+X from --v X')
    enhance: bool = Field(False, description="--enhance: expand the prompt with the LLM")
    # Images from images (docs/prompt-parameters.md): sources are http(s) URLs or `file-...` ids,
    # fetched and checked by the ingress (images/inputs.py), never here.
    image_prompts: tuple[str, ...] = Field((), description="image URLs/file ids at the start of the prompt")
    image_weight: float | None = Field(None, ge=0.0, le=IW_MAX, description="--iw")
    style_refs: tuple[str, ...] = Field((), description="--sref URL [URL...]")
    style_weight: int | None = Field(None, ge=0, le=1000, description="--sw")
    character_refs: tuple[str, ...] = Field((), description="--cref URL [URL...]")
    character_weight: int | None = Field(None, ge=0, le=100, description="--cw")
    omni_ref: str | None = Field(None, description="--oref URL")
    omni_weight: int | None = Field(None, ge=1, le=1000, description="--ow")

    @property
    def image_sources(self) -> tuple[str, ...]:
        """Every image the prompt names, in order (what counts against `image_inputs.max_images`)."""
        return (*self.image_prompts, *self.style_refs, *self.character_refs,
                *((self.omni_ref,) if self.omni_ref else ()))
    loras: tuple[LoraParam, ...] = Field((), description="<lora:name:weight>, in order")

    @field_validator("aspect_ratio")
    @classmethod
    def _ratio_in_range(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None:
            _check_ratio("--ar", *v)
        return v

    @field_validator("model")
    @classmethod
    def _model_name(cls, v: str | None) -> str | None:
        if v is not None and not _MODEL_NAME.fullmatch(v):
            raise ValueError(f"model must be letters, digits and . _ / -, got {_show(v)}")
        return v


class WeightedSegment(BaseModel):
    """One part of a multi-prompt: `text::weight`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str
    weight: float


class ParsedPrompt(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str = Field(description="prompt without parameters; positive-weight segments joined")
    segments: tuple[WeightedSegment, ...]
    params: PromptParams

    @model_validator(mode="after")
    def _weights_sum_positive(self) -> ParsedPrompt:
        if self.segments:
            _check_weights(self.segments)
        return self


Kind = Literal["ratio", "int", "quality", "seed", "version", "model", "switch", "terms", "weight", "images", "image"]


@dataclass(frozen=True)
class _Spec:
    field: str
    kind: Kind
    low: int = 0
    high: int = 0


_SPECS: dict[str, _Spec] = {
    "ar": _Spec("aspect_ratio", "ratio"),
    "aspect": _Spec("aspect_ratio", "ratio"),
    "s": _Spec("stylize", "int", 0, 1000),
    "stylize": _Spec("stylize", "int", 0, 1000),
    "c": _Spec("chaos", "int", 0, 100),
    "chaos": _Spec("chaos", "int", 0, 100),
    "q": _Spec("quality", "quality"),
    "quality": _Spec("quality", "quality"),
    "no": _Spec("negative", "terms"),
    "seed": _Spec("seed", "int", 0, SEED_MAX),
    "tile": _Spec("tile", "switch"),
    "v": _Spec("version", "version"),
    "version": _Spec("version", "version"),
    "model": _Spec("model", "model"),
    "enhance": _Spec("enhance", "switch"),
    "iw": _Spec("image_weight", "weight"),
    "sref": _Spec("style_refs", "images"),
    "sw": _Spec("style_weight", "int", 0, 1000),
    "cref": _Spec("character_refs", "images"),
    "cw": _Spec("character_weight", "int", 0, 100),
    "oref": _Spec("omni_ref", "image"),
    "ow": _Spec("omni_weight", "int", 1, 1000),
}
# A weight without its images does nothing: refused, naming both flags.
_NEEDS = {"image_weight": ("image_prompts", "an image prompt (an image URL or file id at the start)"),
          "style_weight": ("style_refs", "--sref"), "character_weight": ("character_refs", "--cref"),
          "omni_weight": ("omni_ref", "--oref")}


def is_image_source(token: str) -> bool:
    """An http(s) URL or a `file-...` upload id: an image prompt at the start, or a reference."""
    return token[:8].lower().startswith(("http://", "https://")) or FILE_ID.fullmatch(token) is not None


def _show(value: str, limit: int = 40) -> str:
    """Quote a user value for an error message, cut short: errors may be echoed in a 422."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _flag_name(token: str) -> str | None:
    """The lower-cased flag name if `token` is a parameter, else None (the token is text).

    `--x...` with an ASCII letter after the dashes is always a parameter (unknown ones are
    errors). An em dash is also punctuation, so `—x...` counts only when x is a known name.
    """
    if token.startswith("--"):
        rest = token[2:]
    elif token.startswith(_EM_DASH):
        rest = token[1:]
        if rest.lower() not in _SPECS:
            return None
    else:
        return None
    if not rest or rest[0] not in string.ascii_letters:
        return None
    return rest.lower()


def _check_ratio(flag: str, w: int, h: int) -> None:
    try:
        rules.check_aspect_ratio(w, h, name=flag)
    except ValueError as e:
        raise PromptParameterError(flag, str(e)) from None


def _check_weights(segments: tuple[WeightedSegment, ...]) -> None:
    try:
        rules.check_weights([s.weight for s in segments])
    except ValueError as e:
        raise PromptParameterError("::", str(e)) from None


def _parse_value(flag: str, spec: _Spec, raw: str) -> Any:
    if spec.kind == "ratio":
        m = _RATIO.fullmatch(raw)
        if not m:
            raise PromptParameterError(flag, f"{flag} must be W:H like 16:9, got {_show(raw)}")
        a, b = m.groups()
        if len(a) > 6 or len(b) > 6:  # also keeps int() away from huge digit strings
            raise PromptParameterError(
                flag, f"{flag} sides must be integers from 1 to {MAX_AR_SIDE}, got {_show(raw)}"
            )
        _check_ratio(flag, int(a), int(b))
        return (int(a), int(b))
    if spec.kind == "int":
        if not _INT.fullmatch(raw):
            raise PromptParameterError(flag, f"{flag} must be an integer, got {_show(raw)}")
        # Over 20 digits is out of range anyway; int() of 4300+ digits would raise ValueError.
        if len(raw) > 20 or not spec.low <= int(raw) <= spec.high:
            raise PromptParameterError(
                flag, f"{flag} must be between {spec.low} and {spec.high}, got {_show(raw)[1:-1]}"
            )
        return int(raw)
    if spec.kind == "quality":
        if not _NUMBER.fullmatch(raw):
            raise PromptParameterError(flag, f"{flag} must be a number, got {_show(raw)}")
        q = float(raw)
        if not 0.25 <= q <= 2.0:
            raise PromptParameterError(
                flag, f"{flag} must be between 0.25 and 2, got {_show(raw)[1:-1]}"
            )
        return q
    if spec.kind == "weight":
        if not _NUMBER.fullmatch(raw) or len(raw) > 20:
            raise PromptParameterError(flag, f"{flag} must be a number, got {_show(raw)}")
        w = float(raw)
        if not 0.0 <= w <= IW_MAX:
            raise PromptParameterError(flag, f"{flag} must be between 0 and {IW_MAX:g}, got {_show(raw)[1:-1]}")
        return w
    if spec.kind == "image":
        return _image_source(flag, raw)
    if spec.kind == "version":
        if not _VERSION.fullmatch(raw):
            raise PromptParameterError(
                flag, f"{flag} must be a version number like 6 or 5.2, got {_show(raw)}"
            )
        return "v" + raw
    if spec.kind == "model":
        if not _MODEL_NAME.fullmatch(raw):
            raise PromptParameterError(
                flag, f"{flag} must be a model name (letters, digits, . _ / -), got {_show(raw)}"
            )
        return raw
    raise AssertionError(spec.kind)  # switch/terms never take a single value


def _image_source(flag: str, raw: str) -> str:
    if not is_image_source(raw):
        raise PromptParameterError(flag, f"{flag} takes image URLs (http/https) or file ids (file-...), "
                                   f"got {_show(raw)}")
    return raw


def _split_params(text: str) -> tuple[list[str], dict[str, Any]]:
    """Separate text tokens from parameters; returns (text tokens, field values)."""
    tokens = text.split()
    words: list[str] = []
    values: dict[str, Any] = {}
    seen: dict[str, str] = {}  # field -> flag as written, for duplicate errors
    negative: list[str] = []
    loras: list[LoraParam] = []
    i = 0
    # Midjourney's image prompts: image URLs (here also file ids) before any text.
    while i < len(tokens) and is_image_source(tokens[i]):
        i += 1
    if i:
        values["image_prompts"] = tuple(tokens[:i])
    while i < len(tokens):
        if "<lora:" in tokens[i]:
            loras.append(_parse_lora(tokens[i]))
            i += 1
            continue
        name = _flag_name(tokens[i])
        if name is None:
            words.append(tokens[i])
            i += 1
            continue
        flag = "--" + name
        spec = _SPECS.get(name)
        if spec is None:
            raise PromptParameterError(flag[:42], f"unknown parameter {_show(flag)[1:-1]}")
        i += 1
        if spec.kind != "terms":
            if spec.field in seen:
                raise PromptParameterError(
                    flag, f"{flag} repeats {seen[spec.field]}; give it once"
                )
            seen[spec.field] = flag
        if spec.kind == "switch":
            values[spec.field] = True
            continue
        if spec.kind == "images":
            # `--sref URL URL ...`: every image up to the next parameter or the first word.
            start = i
            while i < len(tokens) and _flag_name(tokens[i]) is None and is_image_source(tokens[i]):
                i += 1
            if i == start:
                got = _show(tokens[i]) if i < len(tokens) else "nothing"
                raise PromptParameterError(flag, f"{flag} takes image URLs (http/https) or file ids (file-...), "
                                           f"got {got}")
            values[spec.field] = tuple(tokens[start:i])
            continue
        if spec.kind == "terms":
            # `--no` takes everything up to the next parameter: "--no text, blurry hands".
            start = i
            while i < len(tokens) and _flag_name(tokens[i]) is None:
                i += 1
            terms = [t.strip() for t in " ".join(tokens[start:i]).split(",")]
            terms = [t for t in terms if t]
            if not terms:
                raise PromptParameterError(flag, f"{flag} needs at least one term, e.g. --no text")
            negative.extend(terms)
            continue
        if i >= len(tokens) or _flag_name(tokens[i]) is not None:
            raise PromptParameterError(flag, f"{flag} needs a value")
        values[spec.field] = _parse_value(flag, spec, tokens[i])
        i += 1
    if "version" in values and "model" in values:
        raise PromptParameterError(
            "--model", f"{seen['version']} and --model both choose the model; give one"
        )
    if "version" in values:
        values["model"] = values.pop("version")
    for weight, (images, what) in _NEEDS.items():
        if weight in values and images not in values:
            flag = seen[weight]
            raise PromptParameterError(flag, f"{flag} weighs {what}, and the prompt has none")
    if negative:
        values["negative"] = tuple(negative)
    if loras:
        names = [lora.name for lora in loras]
        if len(set(names)) != len(names):
            raise PromptParameterError("<lora>", f"<lora:...> names an adapter twice: {names}")
        if len(loras) > MAX_LORAS:
            raise PromptParameterError("<lora>", f"at most {MAX_LORAS} <lora:...> adapters, got {len(loras)}")
        values["loras"] = tuple(loras)
    return words, values


def _parse_lora(token: str) -> LoraParam:
    m = _LORA.fullmatch(token)
    if m is None:
        raise PromptParameterError("<lora>", f"<lora:...> must be <lora:NAME> or <lora:NAME:WEIGHT> as one word "
                                   f"(NAME: letters, digits, _ . -), got {_show(token)}")
    weight = float(m.group(2)) if m.group(2) is not None else 1.0
    if abs(weight) > LORA_WEIGHT_MAX:
        raise PromptParameterError("<lora>", f"<lora:{m.group(1)}:...> weight must be within "
                                   f"±{LORA_WEIGHT_MAX:g}, got {m.group(2)}")
    return LoraParam(name=m.group(1), weight=weight)


def _split_weights(text: str) -> tuple[WeightedSegment, ...]:
    """`a::2 b::-0.5 c` → (a, 2), (b, -0.5), (c, 1). A weight is only read right after `::`."""
    pieces = text.split("::")
    segments: list[WeightedSegment] = []
    current = pieces[0]
    for piece in pieces[1:]:
        m = _WEIGHT.match(piece)
        weight, rest = (float(m.group()), piece[m.end() :]) if m else (1.0, piece)
        part = current.strip(" ,")
        if not part:
            # Dropping it would silently lose the user's weight: reject instead.
            shown = "::" + (m.group() if m else "")
            raise PromptParameterError("::", f":: needs text before it, got {_show(shown)}")
        if not math.isfinite(weight):  # a 400-digit weight parses to inf
            raise PromptParameterError("::", f":: weight is too large, got {_show(piece)}")
        segments.append(WeightedSegment(text=part, weight=weight))
        current = rest
    last = current.strip(" ,")
    if last:
        segments.append(WeightedSegment(text=last, weight=1.0))
    return tuple(segments)


def parse_prompt(text: str) -> ParsedPrompt:
    """Split `text` into clean prompt text, `::` weighted segments and typed parameters."""
    words, values = _split_params(text)
    segments = _split_weights(" ".join(words))
    if segments:
        _check_weights(segments)
    # Negative-weight parts are left out of `text`: a consumer that encodes only the plain
    # text would otherwise pull the image toward what the user asked to push away.
    clean = ", ".join(s.text for s in segments if s.weight > 0)
    return ParsedPrompt(text=clean, segments=segments, params=PromptParams(**values))


def format_params(params: PromptParams) -> str:
    """Render params as prompt flags that `parse_prompt` reads back to equal params."""
    out: list[str] = []
    if params.aspect_ratio is not None:
        out.append(f"--ar {params.aspect_ratio[0]}:{params.aspect_ratio[1]}")
    if params.stylize is not None:
        out.append(f"--s {params.stylize}")
    if params.chaos is not None:
        out.append(f"--c {params.chaos}")
    if params.quality is not None:
        out.append(f"--q {params.quality!r}")
    if params.seed is not None:
        out.append(f"--seed {params.seed}")
    if params.model is not None:
        version = params.model[1:]
        is_alias = params.model.startswith("v") and _VERSION.fullmatch(version)
        out.append(f"--v {version}" if is_alias else f"--model {params.model}")
    if params.tile:
        out.append("--tile")
    if params.enhance:
        out.append("--enhance")
    if params.image_weight is not None:
        out.append(f"--iw {params.image_weight!r}")
    if params.style_refs:
        out.append("--sref " + " ".join(params.style_refs))
    if params.style_weight is not None:
        out.append(f"--sw {params.style_weight}")
    if params.character_refs:
        out.append("--cref " + " ".join(params.character_refs))
    if params.character_weight is not None:
        out.append(f"--cw {params.character_weight}")
    if params.omni_ref is not None:
        out.append(f"--oref {params.omni_ref}")
    if params.omni_weight is not None:
        out.append(f"--ow {params.omni_weight}")
    for lora in params.loras:
        out.append(f"<lora:{lora.name}:{lora.weight:g}>")
    if params.negative:  # last: `--no` takes every word up to the next flag
        out.append("--no " + ", ".join(params.negative))
    # Image prompts go first in a prompt: the caller puts `params.image_prompts` before the text.
    return " ".join(out)
