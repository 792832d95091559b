"""Tiny models: offline tokenizer, reproducible builds, and loading through `load_pipeline`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from deployments.diffusion import tiny
from deployments.diffusion.loading import load_pipeline
from deployments.diffusion.tokenizer import VOCAB_SIZE, save_byte_clip_tokenizer


def test_byte_tokenizer_round_trips_unicode(tmp_path: Path) -> None:
    tok = CLIPTokenizer.from_pretrained(save_byte_clip_tokenizer(tmp_path / "tok"))
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    text = "Ünïcödé 猫 🐱 a photo of a cat"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]  # every byte has its own token
    assert max(ids) < VOCAB_SIZE == len(tok)
    assert tok.decode(ids, skip_special_tokens=True) == text.lower()
    assert tok("a cat").input_ids != tok("a dog").input_ids
    padded = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True)
    assert tok.model_max_length == 77 and len(padded.input_ids) == 77


def test_text_encoders_match_tokenizer_vocab(tiny_models_dir: Path) -> None:
    for sub in ("sdxl-tiny/text_encoder", "sdxl-tiny/text_encoder_2", "wuerstchen-tiny/prior_text_encoder"):
        config = json.loads((tiny_models_dir / sub / "config.json").read_text())
        assert config["vocab_size"] == VOCAB_SIZE, sub


def _digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*.safetensors"))
    }


def test_builds_are_reproducible(tmp_path: Path) -> None:
    first = _digest(tiny.build_tiny_sdxl(tmp_path / "a"))
    second = _digest(tiny.build_tiny_sdxl(tmp_path / "b"))
    assert first and first == second


def test_build_all_tiny_writes_manifest_and_skips_built(tmp_path: Path) -> None:
    paths = tiny.build_all_tiny(tmp_path)
    assert paths == {"sdxl": tmp_path / "sdxl-tiny", "wuerstchen": tmp_path / "wuerstchen-tiny",
                     "ip_adapter": tmp_path / "ip-adapter-tiny",
                     "taesd": tmp_path / "taesd-tiny",  # sdxl-tiny's preview decoder
                     "sdxl-loras": tmp_path / "sdxl-tiny-loras"}
    adapter = tmp_path / "ip-adapter-tiny" / tiny.IP_ADAPTER_SUBFOLDER
    assert (adapter / tiny.IP_ADAPTER_WEIGHTS).is_file() and (adapter / "image_encoder" / "config.json").is_file()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    # The tiny LoRA adapters (PEFT directories, issue 21), with their own build version.
    assert manifest["sdxl-tiny-loras"]["adapters"] == list(tiny.TINY_LORAS)
    for name in tiny.TINY_LORAS:
        config = json.loads((tmp_path / "sdxl-tiny-loras" / name / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 4
        assert (tmp_path / "sdxl-tiny-loras" / name / "adapter_model.safetensors").stat().st_size > 0
    assert manifest["sdxl-tiny"]["native_px"] == 64
    assert manifest["wuerstchen-tiny"]["native_px"] == 128
    weights = tmp_path / "sdxl-tiny" / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    tiny.build_all_tiny(tmp_path)
    assert weights.stat().st_mtime_ns == before
    # An older builder's output is rebuilt.
    marker = tmp_path / "sdxl-tiny" / tiny.MARKER
    marker.write_text(json.dumps({"family": "sdxl", "build_version": 0}))
    tiny.build_all_tiny(tmp_path)
    assert json.loads(marker.read_text())["build_version"] == tiny.BUILD_VERSION
    assert weights.stat().st_mtime_ns != before


def test_load_sdxl_from_dir(tiny_models_dir: Path) -> None:
    pipe = load_pipeline(str(tiny_models_dir / "sdxl-tiny"), "sdxl", dtype="bfloat16")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.vae_scale_factor == 8 and pipe.default_sample_size * 8 == 64
    assert pipe.unet.dtype.is_floating_point and str(pipe.unet.dtype) == "torch.bfloat16"
    assert pipe._progress_bar_config == {"disable": True}


def test_load_wuerstchen_from_dir(tiny_models_dir: Path) -> None:
    # The trap: diffusers saves these under the `diffusers` library name, where it can't find them.
    index = json.loads((tiny_models_dir / "wuerstchen-tiny" / "model_index.json").read_text())
    assert index["decoder"] == ["diffusers", "WuerstchenDiffNeXt"]
    pipe = load_pipeline(str(tiny_models_dir / "wuerstchen-tiny"), "wuerstchen")
    assert type(pipe).__name__ == "WuerstchenCombinedPipeline"
    assert type(pipe.decoder).__name__ == "WuerstchenDiffNeXt"
    assert type(pipe.prior_prior).__name__ == "WuerstchenPrior"
    assert pipe.prior_pipe._progress_bar_config == {"disable": True}


def test_load_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=str(missing)):
        load_pipeline(str(missing), "sdxl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers pipeline"):
        load_pipeline(str(tmp_path / "empty"), "sdxl")
    with pytest.raises(ValueError, match="family"):
        load_pipeline(str(tmp_path / "empty"), "kandinsky")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype"):
        load_pipeline(str(tmp_path / "empty"), "sdxl", dtype="float8")
