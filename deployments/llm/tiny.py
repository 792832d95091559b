"""A tiny random-weight Llama-style chat model, built offline for tests and the local config.

The tokenizer is a byte-level BPE trained here on a small built-in corpus (no download), with a
ChatML chat template. Everything is written with `save_pretrained`, so the app loads it through
the normal paths (`AutoModelForCausalLM.from_pretrained`, vLLM's model loader).
Head size 32: vLLM's CPU attention kernels support only some head sizes (32, 64, 80, ...).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

BOS = "<|begin_of_text|>"
EOS = "<|im_end|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

VOCAB_SIZE = 1024
MAX_POSITIONS = 2048
# Bump when the recipe changes: build_tiny_llm rebuilds directories with another version.
RECIPE_VERSION = 1

_WORDS = (
    "a the of and to in is it that for on with as by at from an be this are or was which "
    "portrait landscape city cat dog robot castle forest ocean mountain river sunset night "
    "light shadow color style painting photo digital art cinematic lighting soft warm cold "
    "composition subject quality detailed sharp render octane studio golden hour blue red "
    "green yellow purple black white hello world how are you today what can I help question "
    "answer model token text chat system user assistant please thank write story poem code"
).split()


def _corpus() -> list[str]:
    # Deterministic word salad: enough repeated pairs for BPE to learn whole-word merges.
    lines = []
    for i in range(400):
        words = [_WORDS[(i * 7 + j * 13) % len(_WORDS)] for j in range(12)]
        lines.append(" ".join(words).capitalize() + ("." if i % 3 else "?"))
    return lines


def build_tokenizer():  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=MAX_POSITIONS,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )


def _is_built(out_dir: Path) -> bool:
    marker = out_dir / "genserve_tiny.json"
    if not marker.exists():
        return False
    try:
        return json.loads(marker.read_text()).get("version") == RECIPE_VERSION
    except ValueError:
        return False


def build_tiny_llm(out_dir: Path, *, seed: int = 0) -> Path:
    """Build (once) the tiny chat model in `out_dir`; returns `out_dir`. Idempotent."""
    out_dir = Path(out_dir)
    if _is_built(out_dir):
        return out_dir
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Write into a temp dir, then rename: a half-written model never looks built.
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "genserve_tiny.json").write_text(json.dumps({"version": RECIPE_VERSION, "seed": seed}))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


# -- tiny LoRA adapters -----------------------------------------------------------------------------
# Their own version (not RECIPE_VERSION): bumping the base model's would rebuild llm-tiny, which
# every LLM test shares, for no change of its weights.
ADAPTER_RECIPE_VERSION = 1
TINY_ADAPTERS = ("tiny-a", "tiny-b", "tiny-c")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_tiny_llm_adapter(out_dir: Path, base_dir: Path, *, seed: int, rank: int = 8) -> Path:
    """Build (once) one random LoRA adapter for the tiny LLM as a PEFT directory. B is random, not
    PEFT's zero init, so the adapter changes the model's outputs. Idempotent."""
    out_dir = Path(out_dir)
    if _is_adapter_built(out_dir, seed, rank):
        return out_dir
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, init_lora_weights=False,
                        task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, config)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(tmp))
    # Point at the base by its directory name only: the adapter travels (registry, S3) without it.
    cfg_path = tmp / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = Path(base_dir).name
    cfg_path.write_text(json.dumps(cfg, indent=2))
    (tmp / "genserve_tiny.json").write_text(json.dumps({"version": ADAPTER_RECIPE_VERSION, "seed": seed,
                                                        "rank": rank}))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def _is_adapter_built(out_dir: Path, seed: int, rank: int) -> bool:
    marker = out_dir / "genserve_tiny.json"
    try:
        got = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return got == {"version": ADAPTER_RECIPE_VERSION, "seed": seed, "rank": rank}


def build_tiny_llm_adapters(out_dir: Path, base_dir: Path, *, names: tuple[str, ...] = TINY_ADAPTERS,
                            rank: int = 8) -> dict[str, Path]:
    """The tiny LLM's random adapters, one directory each under `out_dir` (seed = position + 1)."""
    return {name: build_tiny_llm_adapter(Path(out_dir) / name, base_dir, seed=i + 1, rank=rank)
            for i, name in enumerate(names)}
