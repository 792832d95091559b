"""Tiny random-weight pipelines built from config, for tests and the local (CPU) config.

Same architectures as the real models, scaled down the way diffusers' own fast tests do
(`get_dummy_components()`), saved with `save_pretrained` so they load through the same
`from_pretrained` code path as a hub id. Seeds are fixed: two builds give identical weights.

    python -m deployments.diffusion.tiny OUT_DIR
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDPMWuerstchenScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.deprecated.wuerstchen import (
    PaellaVQModel,
    WuerstchenCombinedPipeline,
    WuerstchenDiffNeXt,
    WuerstchenPrior,
)
from safetensors.torch import save_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from deployments.diffusion.tokenizer import BOS, EOS, VOCAB_SIZE, build_byte_clip_tokenizer

# Bump when a builder changes: build_all_tiny() then rebuilds models saved by an older version.
BUILD_VERSION = 2  # 2: the tiny IP-Adapter
MARKER = "genserve_tiny.json"
SDXL_DIR = "sdxl-tiny"
WUERSTCHEN_DIR = "wuerstchen-tiny"
IP_ADAPTER_DIR = "ip-adapter-tiny"
# The tiny IP-Adapter's layout, as configs/local.yaml names it (like h94/IP-Adapter's sdxl_models/).
IP_ADAPTER_SUBFOLDER = "sdxl_models"
IP_ADAPTER_WEIGHTS = "ip-adapter_sdxl_tiny.safetensors"
IP_ADAPTER_ENCODER = "image_encoder"
IP_IMAGE_PX = 32  # the tiny CLIP image encoder's input size
TAESD_DIR = "taesd-tiny"  # the preview decoder of sdxl-tiny (`previews.vae`), TAESD-XL's shape scaled down
# Native sizes: tiny SDXL's unet sample_size is 8 latents x vae factor 8; tiny Würstchen's
# prior/decoder/VQGAN chain only reproduces sizes that are multiples of 128 px.
SDXL_NATIVE_PX = 64
WUERSTCHEN_NATIVE_PX = 128
TEXT_HIDDEN = 32


def _text_config(**overrides: Any) -> CLIPTextConfig:
    ids = build_byte_clip_tokenizer()
    bos, eos = ids.convert_tokens_to_ids(BOS), ids.convert_tokens_to_ids(EOS)
    assert isinstance(bos, int) and isinstance(eos, int)  # one token in, one id out
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_attention_heads=4,
        # SDXL reads the penultimate hidden state, so at least two layers.
        num_hidden_layers=2,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=TEXT_HIDDEN,
        **overrides,
    )


def tiny_sdxl_pipeline() -> StableDiffusionXLPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=SDXL_NATIVE_PX // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        # 6 time ids x addition_time_embed_dim + text_encoder_2's projection_dim
        projection_class_embeddings_input_dim=6 * 8 + TEXT_HIDDEN,
        cross_attention_dim=2 * TEXT_HIDDEN,  # both encoders' hidden states concatenated
    )
    torch.manual_seed(0)
    # Four blocks = three downsamples = vae_scale_factor 8, like the real SDXL VAE.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=SDXL_NATIVE_PX,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_config()).eval()
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config()).eval()
    return StableDiffusionXLPipeline(
        # mypy sees diffusers' dummy placeholder classes (its lazy __init__), not the nn.Module ones.
        vae=vae.eval(),  # type: ignore[attr-defined]
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=build_byte_clip_tokenizer(),
        tokenizer_2=build_byte_clip_tokenizer(pad_token="!"),  # SDXL's second tokenizer pads with "!"
        unet=unet.eval(),  # type: ignore[attr-defined]
        scheduler=scheduler,
    )


def _ip_adapter_state_dict(unet: Any, image_embed_dim: int) -> dict[str, torch.Tensor]:
    """Random weights in the original IP-Adapter file layout (what `load_ip_adapter` converts), built
    the way diffusers' own tests do (`create_ip_adapter_state_dict`): an `image_proj` (CLIP image
    embedding -> 4 tokens of the UNet's cross-attention width) and, for every cross-attention
    processor in `attn_processors` order, `to_k_ip`/`to_v_ip`, numbered 1, 3, 5, ... (the
    original checkpoints' numbering, which diffusers' converter follows)."""
    cross = int(unet.config.cross_attention_dim)
    tokens = 4  # "proj.weight" in the file means the plain IP-Adapter: 4 image tokens
    torch.manual_seed(0)
    out: dict[str, torch.Tensor] = {
        "image_proj.proj.weight": torch.randn(tokens * cross, image_embed_dim) * 0.1,
        "image_proj.proj.bias": torch.randn(tokens * cross) * 0.1,
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    key_id = 1
    for name in unet.attn_processors:
        if not name.endswith("attn1.processor"):
            module = unet.get_submodule(name.removesuffix(".processor"))
            hidden = module.to_k.out_features
            # Large enough that a reference visibly moves a random tiny model's pixels.
            out[f"ip_adapter.{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross)
            out[f"ip_adapter.{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross)
            key_id += 2
    return out


def build_tiny_ip_adapter(out_dir: Path) -> Path:
    """A random IP-Adapter for the tiny SDXL and a tiny CLIP image encoder, in h94/IP-Adapter's
    layout: `<subfolder>/<weights>.safetensors` and `<subfolder>/image_encoder/`."""
    out_dir = Path(out_dir)
    sdxl: Any = tiny_sdxl_pipeline()  # Any: mypy sees diffusers' dummy classes
    unet = sdxl.unet
    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        image_size=IP_IMAGE_PX, patch_size=8, num_channels=3)).eval()
    folder = out_dir / IP_ADAPTER_SUBFOLDER
    encoder.save_pretrained(folder / IP_ADAPTER_ENCODER)
    weights = _ip_adapter_state_dict(unet, image_embed_dim=encoder.config.projection_dim)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / IP_ADAPTER_WEIGHTS))
    return out_dir


def _wake_zero_init(model: torch.nn.Module) -> None:
    """Give zero-initialised weights small random values.

    DiffNeXt zero-inits its output conv and timestep mappers (good for training, but a random model
    then ignores the prior's embeddings, text and timestep altogether, and tests could not see
    a prompt change the image).
    """
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1 and not param.any():
                param.normal_(std=0.02)


def tiny_wuerstchen_pipeline() -> WuerstchenCombinedPipeline:
    effnet_channels = 16
    torch.manual_seed(0)
    prior = WuerstchenPrior(c_in=effnet_channels, c=32, depth=2, c_cond=TEXT_HIDDEN, c_r=8, nhead=2)
    torch.manual_seed(0)
    decoder = WuerstchenDiffNeXt(
        c_in=4,
        c_out=4,
        c_r=8,
        c_cond=TEXT_HIDDEN,
        c_hidden=[32],
        nhead=[2],
        blocks=[2],
        level_config=["CTA"],
        inject_effnet=[True],
        effnet_embd=effnet_channels,
        clip_embd=TEXT_HIDDEN,
    )
    _wake_zero_init(decoder)
    torch.manual_seed(0)
    vqgan = PaellaVQModel(bottleneck_blocks=1, embed_dim=32, num_vq_embeddings=16, latent_channels=4)
    torch.manual_seed(0)
    prior_text_encoder = CLIPTextModel(_text_config()).eval()
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(_text_config()).eval()
    return WuerstchenCombinedPipeline(
        tokenizer=build_byte_clip_tokenizer(),
        text_encoder=text_encoder,
        decoder=decoder.eval(),
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=vqgan.eval(),
        prior_tokenizer=build_byte_clip_tokenizer(),
        prior_text_encoder=prior_text_encoder,
        prior_prior=prior.eval(),
        prior_scheduler=DDPMWuerstchenScheduler(),
    )


def tiny_taesd() -> AutoencoderTiny:
    """A tiny `AutoencoderTiny` for sdxl-tiny's latents (4 channels, x8): previews in tests and locally."""
    torch.manual_seed(0)
    vae: Any = AutoencoderTiny(  # Any: mypy sees diffusers' dummy placeholder class
        in_channels=3, out_channels=3, latent_channels=4,
        encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
    )
    return vae.eval()  # type: ignore[no-any-return, unused-ignore]


def _save(pipeline: object, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(out_dir)  # type: ignore[attr-defined]
    return out_dir


def build_tiny_sdxl(out_dir: Path) -> Path:
    return _save(tiny_sdxl_pipeline(), Path(out_dir))


def build_tiny_wuerstchen(out_dir: Path) -> Path:
    return _save(tiny_wuerstchen_pipeline(), Path(out_dir))


def build_tiny_taesd(out_dir: Path) -> Path:
    return _save(tiny_taesd(), Path(out_dir))


TINY_LORAS = ("ink", "neon", "moss")
LORA_DIR = "sdxl-tiny-loras"
LORA_BUILD_VERSION = 1  # the adapters' own version: bumping it rebuilds only them, not the shared models


def tiny_sdxl_lora(seed: int, rank: int = 4, unet: Any = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A random LoRA (PEFT `LoraConfig`) on the tiny SDXL UNet's attention projections: its
    adapter_config and its weights in PEFT's file format (`base_model.model.<module>.lora_A.weight`).
    `init_lora_weights=False` leaves lora_B random (PEFT's default zeros it), so the adapter
    visibly changes the image."""
    from peft import LoraConfig, get_peft_model_state_dict

    unet = unet if unet is not None else tiny_sdxl_pipeline().unet  # type: ignore[attr-defined]
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    torch.manual_seed(seed)
    unet.add_adapter(config, adapter_name="tiny")
    state = get_peft_model_state_dict(unet, adapter_name="tiny")
    unet.delete_adapters("tiny")
    raw = config.to_dict()
    cfg = json.loads(json.dumps(raw, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    cfg["peft_type"] = "LORA"
    return cfg, {"base_model.model." + k: v.detach().contiguous().clone() for k, v in state.items()}


TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def tiny_sdxl_te_lora(seed: int, rank: int = 4, pipeline: Any = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A random LoRA on the tiny SDXL UNet *and* both text encoders, as kohya/A1111 SDXL LoRAs
    often are, in diffusers' pipeline layout (`unet.<module>…`, `text_encoder.<module>…`,
    `text_encoder_2.<module>…`, what `StableDiffusionXLPipeline.save_lora_weights` writes).
    One adapter_config covers all three (same rank; target_modules lists both name sets)."""
    from peft import LoraConfig, get_peft_model_state_dict

    p: Any = pipeline if pipeline is not None else tiny_sdxl_pipeline()
    cfg, unet_part = tiny_sdxl_lora(seed, rank, unet=p.unet)
    weights = {"unet." + k.removeprefix("base_model.model."): v for k, v in unet_part.items()}
    for i, prefix in enumerate(("text_encoder", "text_encoder_2"), start=1):
        encoder = getattr(p, prefix)
        config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=TEXT_ENCODER_TARGETS)
        torch.manual_seed(seed * 100 + i)
        encoder.add_adapter(config, adapter_name="tiny")
        state = get_peft_model_state_dict(encoder, adapter_name="tiny")
        encoder.delete_adapter("tiny")
        weights.update({f"{prefix}.{k}": v.detach().contiguous().clone() for k, v in state.items()})
    cfg["target_modules"] = sorted(set(cfg["target_modules"]) | set(TEXT_ENCODER_TARGETS))
    return cfg, weights


def save_adapter(out_dir: Path, cfg: dict[str, Any], weights: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(weights, str(out_dir / "adapter_model.safetensors"))
    return out_dir


def build_tiny_loras(out_dir: Path, names: tuple[str, ...] = TINY_LORAS, rank: int = 4) -> Path:
    """One PEFT LoRA directory per name under `out_dir` (seeds 1, 2, ...: deterministic)."""
    unet = tiny_sdxl_pipeline().unet  # type: ignore[attr-defined]
    for i, name in enumerate(names, start=1):
        save_adapter(Path(out_dir) / name, *tiny_sdxl_lora(seed=i, rank=rank, unet=unet))
    return Path(out_dir)


def _is_built(path: Path, marker: dict[str, object]) -> bool:
    try:
        return json.loads((path / MARKER).read_text()) == marker
    except (OSError, ValueError):
        return False


def build_all_tiny(out_dir: Path) -> dict[str, Path]:
    """Build the tiny models (SDXL, Würstchen, the IP-Adapter and the preview decoder for the SDXL
    one) and the tiny SDXL LoRA adapters under `out_dir` (skipping any already saved) and write
    manifest.json."""
    out_dir = Path(out_dir)
    builds = {
        "sdxl": (SDXL_DIR, build_tiny_sdxl, SDXL_NATIVE_PX),
        "wuerstchen": (WUERSTCHEN_DIR, build_tiny_wuerstchen, WUERSTCHEN_NATIVE_PX),
        "ip_adapter": (IP_ADAPTER_DIR, build_tiny_ip_adapter, IP_IMAGE_PX),
        "taesd": (TAESD_DIR, build_tiny_taesd, SDXL_NATIVE_PX),
    }
    paths: dict[str, Path] = {}
    manifest: dict[str, dict[str, object]] = {}
    for family, (subdir, build, native_px) in builds.items():
        path = out_dir / subdir
        marker = {"family": family, "build_version": BUILD_VERSION}
        if not _is_built(path, marker):
            shutil.rmtree(path, ignore_errors=True)  # a partial or older build
            build(path)
            # Written after save_pretrained returned: its presence means a complete build.
            (path / MARKER).write_text(json.dumps(marker) + "\n")
        paths[family] = path
        manifest[subdir] = {**marker, "path": subdir, "native_px": native_px}
    lora_path, lora_marker = out_dir / LORA_DIR, {"family": "sdxl-lora", "build_version": LORA_BUILD_VERSION}
    if not _is_built(lora_path, lora_marker):
        shutil.rmtree(lora_path, ignore_errors=True)
        build_tiny_loras(lora_path)
        (lora_path / MARKER).write_text(json.dumps(lora_marker) + "\n")
    paths["sdxl-loras"] = lora_path
    manifest[LORA_DIR] = {**lora_marker, "path": LORA_DIR, "adapters": list(TINY_LORAS)}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m deployments.diffusion.tiny OUT_DIR")
    for name, built in build_all_tiny(Path(sys.argv[1])).items():
        print(f"{name}: {built}")
