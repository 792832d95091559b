"""Checking an uploaded adapter archive, without torch: a PEFT LoRA directory zipped
(`adapter_config.json` + `adapter_model.safetensors`, at the root or under one folder).

What is checked before anything is stored: the zip's declared sizes (a zip bomb is refused before
it is inflated), `peft_type` LORA, the rank `r` (and `rank_pattern`) against the shapes of every
`lora_A`/`lora_B` tensor in the safetensors header, dtypes, that the tensor data exactly fills the
file, and that the tensor names fit the base model's kind. The stored form is a canonical zip of
just those two files (fixed timestamps, no compression), so its sha256 is the adapter's identity.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zipfile
from dataclasses import dataclass
from typing import Any

from serve_app.adapters.types import AdapterKind
from serve_app.errors import APIError, bad_request

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_DTYPES = {"F16": 2, "BF16": 2, "F32": 4}
_MAX_HEADER = 16 << 20
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)
# Tensor-name prefixes each kind accepts: PEFT's own (`base_model.model.`), diffusers' pipeline
# format (`unet.`, `text_encoder.`, `text_encoder_2.`).
_PREFIXES: dict[str, tuple[str, ...]] = {
    "diffusion": ("base_model.model.", "unet.", "text_encoder.", "text_encoder_2."),
    "llm": ("base_model.model.",),
}


@dataclass(frozen=True)
class AdapterArchive:
    config: dict[str, Any]
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    canonical: bytes  # the stored zip
    sha256: str


def _bad(message: str, code: str = "invalid_adapter") -> APIError:
    return bad_request(message, param="file", code=code)


def _members(zf: zipfile.ZipFile, max_bytes: int) -> dict[str, zipfile.ZipInfo]:
    found: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in zf.infolist():
        total += info.file_size
        base = info.filename.rsplit("/", 1)[-1]
        depth = info.filename.count("/")
        if base in (CONFIG, WEIGHTS) and not info.is_dir() and depth <= 1:
            if base in found:
                raise _bad(f"The archive holds more than one {base}.")
            found[base] = info
    if total > max_bytes:
        raise _bad(f"The archive inflates to {total} bytes, more than the limit of {max_bytes}.",
                   code="adapter_too_large")
    missing = [n for n in (CONFIG, WEIGHTS) if n not in found]
    if missing:
        raise _bad(f"The archive lacks {', '.join(missing)} (a PEFT LoRA directory, zipped).")
    return found


def _read_config(raw: bytes) -> dict[str, Any]:
    try:
        cfg = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise _bad(f"{CONFIG} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise _bad(f"{CONFIG} must be a JSON object.")
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise _bad(f"{CONFIG}: peft_type must be LORA, got {cfg.get('peft_type')!r}.", code="unsupported_adapter")
    return cfg


def _rank_of(cfg: dict[str, Any], max_rank: int) -> tuple[int, float, tuple[str, ...]]:
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= max_rank:
        raise _bad(f"{CONFIG}: r must be an integer 1..{max_rank}, got {r!r}.", code="adapter_rank")
    pattern = cfg.get("rank_pattern") or {}
    if not isinstance(pattern, dict) or any(
            not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= max_rank for v in pattern.values()):
        raise _bad(f"{CONFIG}: rank_pattern values must be integers 1..{max_rank}.", code="adapter_rank")
    alpha = cfg.get("lora_alpha", r)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha <= 0:
        raise _bad(f"{CONFIG}: lora_alpha must be a positive number, got {alpha!r}.")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise _bad(f"{CONFIG}: target_modules must be a non-empty list of module names.")
    return r, float(alpha), tuple(sorted(targets))


def _check_weights(raw: bytes, cfg: dict[str, Any], rank: int, kind: AdapterKind) -> None:
    """Parse the safetensors header (8-byte length, JSON) and check every tensor against the rank."""
    if len(raw) < 8:
        raise _bad(f"{WEIGHTS} is not a safetensors file.")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > min(_MAX_HEADER, len(raw) - 8):
        raise _bad(f"{WEIGHTS} has a header length of {n} bytes that does not fit the file.")
    try:
        header = json.loads(raw[8:8 + n])
    except (UnicodeDecodeError, ValueError):
        raise _bad(f"{WEIGHTS}: the safetensors header is not valid JSON.") from None
    if not isinstance(header, dict):
        raise _bad(f"{WEIGHTS}: the safetensors header must be an object.")
    header.pop("__metadata__", None)
    if not header:
        raise _bad(f"{WEIGHTS} holds no tensors.")
    pattern: dict[str, int] = cfg.get("rank_pattern") or {}
    prefixes = _PREFIXES[kind]
    end = 0
    for name, t in header.items():
        if not isinstance(t, dict) or t.get("dtype") not in _DTYPES:
            raise _bad(f"{WEIGHTS}: tensor {name!r} must be F16, BF16 or F32.")
        shape, offs = t.get("shape"), t.get("data_offsets")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape)
                or not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)):
            raise _bad(f"{WEIGHTS}: tensor {name!r} has a malformed shape or offsets.")
        size = _DTYPES[t["dtype"]]
        for d in shape:
            size *= d
        if offs[1] - offs[0] != size or offs[0] < 0:
            raise _bad(f"{WEIGHTS}: tensor {name!r}'s offsets do not match its shape.")
        end = max(end, offs[1])
        if not name.startswith(prefixes):
            raise _bad(f"{WEIGHTS}: tensor {name!r} does not belong to a {kind} model "
                       f"(expected a name starting with one of {list(prefixes)}).", code="adapter_base_mismatch")
        is_a, is_b = ".lora_A." in name, ".lora_B." in name
        if not (is_a or is_b):
            raise _bad(f"{WEIGHTS}: tensor {name!r} is not a LoRA weight (lora_A / lora_B).",
                       code="unsupported_adapter")
        module = name.split(".lora_")[0]
        r = next((v for k, v in pattern.items() if module.endswith(k)), rank)
        got = shape[0] if is_a else (shape[1] if len(shape) > 1 else -1)
        if got != r:
            raise _bad(f"{WEIGHTS}: tensor {name!r} has rank {got}, but {CONFIG} says {r}.", code="adapter_rank")
    if 8 + n + end != len(raw):
        raise _bad(f"{WEIGHTS}: the tensor data ({end} bytes) does not fill the file exactly.")


def canonical_zip(config_raw: bytes, weights_raw: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in ((CONFIG, config_raw), (WEIGHTS, weights_raw)):
            info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return buf.getvalue()


def inspect_archive(data: bytes, *, kind: AdapterKind, max_bytes: int, max_rank: int) -> AdapterArchive:
    """Check an uploaded zip; 400 with an OpenAI-style body naming `file` on anything wrong."""
    if len(data) > max_bytes:
        raise _bad(f"The upload is {len(data)} bytes, more than the limit of {max_bytes}.", code="adapter_too_large")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError):
        raise _bad("The upload is not a zip archive (zip the PEFT adapter directory).") from None
    with zf:
        members = _members(zf, max_bytes)
        try:
            config_raw, weights_raw = zf.read(members[CONFIG]), zf.read(members[WEIGHTS])
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, ValueError, EOFError) as e:
            raise _bad(f"The archive could not be read: {e}") from None
    cfg = _read_config(config_raw)
    rank, alpha, targets = _rank_of(cfg, max_rank)
    _check_weights(weights_raw, cfg, rank, kind)
    canonical = canonical_zip(config_raw, weights_raw)
    return AdapterArchive(config=cfg, rank=rank, alpha=alpha, target_modules=targets, canonical=canonical,
                          sha256=hashlib.sha256(canonical).hexdigest())

