"""Full-size SDXL and Würstchen architectures with random weights, built from config (no download possible).

Same shapes, so the same FLOPs and bytes as stabilityai/stable-diffusion-xl-base-1.0: what a
throughput benchmark needs. The configs below are that model's published component configs. The
tokenizers are genserve's offline byte-level CLIP tokenizer (77 tokens, like the real one); text
encoding is a negligible share of the work.
"""

from __future__ import annotations

from pathlib import Path

import torch

SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1,
    norm_eps=1e-5, norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2816,
    sample_size=128, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True,
)
SDXL_VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    force_upcast=True, in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3,
    sample_size=1024, scaling_factor=0.13025, up_block_types=["UpDecoderBlock2D"] * 4,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768,
              bos_token_id=0, eos_token_id=2, pad_token_id=1)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1280,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)
EULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
             prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear")


def full_sdxl_pipeline(device: str = "cuda", dtype: torch.dtype = torch.float16):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from deployments.diffusion.tokenizer import build_byte_clip_tokenizer

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: 3.5B parameters on CPU take minutes
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=build_byte_clip_tokenizer(),
        tokenizer_2=build_byte_clip_tokenizer(), unet=unet, scheduler=EulerDiscreteScheduler(**EULER))
    return pipe.to(device=device, dtype=dtype)


def build_full_sdxl(out_dir: Path, device: str = "cuda") -> Path:
    """Save the random full-size pipeline (fp16) so the app loads it with from_pretrained."""
    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").exists():
        return out_dir
    pipe = full_sdxl_pipeline(device)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out_dir


# Würstchen v2 (warp-ai/wuerstchen): prior = WuerstchenPrior(c=1536, c_cond=1280, depth=32, nhead=24)
# with a CLIP ViT-bigG text encoder; decoder = WuerstchenDiffNeXt's defaults (the released stage B)
# with a CLIP ViT-H text encoder; PaellaVQModel's defaults (stage A).
WUERSTCHEN_PRIOR = dict(c_in=16, c=1536, c_cond=1280, c_r=64, depth=32, nhead=24, dropout=0.1)
CLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
              max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1024,
              bos_token_id=0, eos_token_id=2, pad_token_id=1)


def full_wuerstchen_pipeline(device: str = "cuda", dtype: torch.dtype = torch.float16):
    from diffusers import DDPMWuerstchenScheduler
    from diffusers.pipelines.deprecated.wuerstchen import (
        PaellaVQModel,
        WuerstchenCombinedPipeline,
        WuerstchenDiffNeXt,
        WuerstchenPrior,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from deployments.diffusion.tokenizer import build_byte_clip_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        prior = WuerstchenPrior(**WUERSTCHEN_PRIOR)
        decoder = WuerstchenDiffNeXt()
        vqgan = PaellaVQModel()
        prior_te = CLIPTextModel(CLIPTextConfig(**CLIP_BIGG))
        te = CLIPTextModel(CLIPTextConfig(**CLIP_H))
    pipe = WuerstchenCombinedPipeline(
        tokenizer=build_byte_clip_tokenizer(), text_encoder=te, decoder=decoder, scheduler=DDPMWuerstchenScheduler(),
        vqgan=vqgan, prior_tokenizer=build_byte_clip_tokenizer(), prior_text_encoder=prior_te, prior_prior=prior,
        prior_scheduler=DDPMWuerstchenScheduler())
    return pipe.to(device=device, dtype=dtype)


def build_full_wuerstchen(out_dir: Path, device: str = "cuda") -> Path:
    """Save the random full-size Würstchen pipeline (fp16) for from_pretrained."""
    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").exists():
        return out_dir
    if device == "cpu":  # CPU smoke runs: the tiny pipeline, same code path
        from deployments.diffusion.tiny import build_tiny_wuerstchen

        return build_tiny_wuerstchen(out_dir)
    pipe = full_wuerstchen_pipeline(device)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    del pipe
    torch.cuda.empty_cache()
    return out_dir
