"""An offline CLIP tokenizer for tiny test models: byte-level vocab, no merges, no download.

Every text (any unicode) maps to byte tokens, so tiny text encoders see distinct ids for distinct
prompts without the 49,408-token CLIP vocab. Saved with `save_pretrained`, it loads back through
`CLIPTokenizer.from_pretrained(dir)` like any hub tokenizer.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 77


@cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-char table (what the ByteLevel pre-tokenizer emits)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_vocab() -> dict[str, int]:
    """256 byte chars, their end-of-word (`</w>`) forms, then BOS and EOS: 514 tokens."""
    chars = [byte_to_unicode()[b] for b in range(256)]
    tokens = chars + [c + "</w>" for c in chars] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}


VOCAB_SIZE = len(byte_vocab())  # the tiny text encoders' config must use this


def build_byte_clip_tokenizer(pad_token: str = EOS) -> CLIPTokenizer:
    # No merges: each word is spelled byte by byte, the last byte in its `</w>` form.
    return CLIPTokenizer(
        vocab=byte_vocab(),
        merges=[],
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=pad_token,
        model_max_length=MODEL_MAX_LENGTH,
    )


def save_byte_clip_tokenizer(out_dir: Path, pad_token: str = EOS) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    build_byte_clip_tokenizer(pad_token).save_pretrained(out_dir)
    return out_dir
