"""The diffusion deployment's contract: one image model's typed config (`diffusion_models[]` of the
app's args), bound to `DiffusionDeployment` as this object.

Defined here, beside the code that reads it, and composed by `serve_app/config.py` (the app's
`args`); nothing in it knows about HTTP or tenants. Errors name the field and the value.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.diffusion.buckets import parse


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchingConfig(_Strict):
    """Also the `user_config` of a Diffusion deployment (all but `priority_aging_s`): a `serve deploy`
    that changes it reconfigures the running replicas (DiffusionServer.reconfigure)."""

    max_batch_size: int = Field(8, ge=1, le=128, description="Images per denoising call.")
    batch_wait_timeout_s: float = Field(
        0.05, ge=0.0, le=10.0, description="How long a partial batch waits for more requests."
    )
    max_batch_megapixels: float | None = Field(
        None, gt=0.0, le=1000.0, description="Most pixels one batch may hold (sum over its images, in "
        "megapixels): the replica's GPU memory cap. The batcher closes a batch before it would exceed this, "
        "the ingress refuses (422) an image larger than it, and on CUDA the replica runs this worst case once "
        "at start. None: max_batch_size images at the model's native resolution.")
    priority_aging_s: float = Field(
        10.0, gt=0.0, le=3600.0, description="Plan priority aging: each second waited adds 1/aging_s to "
        "an image's priority, so a low plan waits at most ~aging_s x priority gap (docs/priority-and-quality.md).")


class AdaptiveQualityConfig(_Strict):
    """Fewer steps under load for requests that allow it (deployments/diffusion/quality.py).
    Load = (images queued + running on the replica) / max_batch_size."""

    enabled: bool = False
    high_water: float = Field(1.5, ge=0.0, description="Degrade when load exceeds this.")
    low_water: float = Field(0.5, ge=0.0, description="Restore once load stays at or below this for hold_s.")
    hold_s: float = Field(5.0, ge=0.0, le=600.0)
    min_steps_fraction: float = Field(0.5, gt=0.0, le=1.0, description="Degraded steps = ceil(steps x this).")
    min_steps: int = Field(1, ge=1, le=200, description="Never fewer steps than this.")
    fallback: Literal["steps", "draft"] = Field("steps", description="What degraded work gets: fewer steps "
                                                "(min_steps_fraction), or the model's draft tier (optimize.draft; "
                                                "needs it enabled).")

    @model_validator(mode="after")
    def _check_marks(self) -> AdaptiveQualityConfig:
        if self.low_water > self.high_water:
            raise ValueError(f"low_water ({self.low_water}) must be <= high_water ({self.high_water})")
        return self


CompileMode = Literal["none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class DraftConfig(_Strict):
    """The draft tier (deployments/diffusion/unet_split.py): DeepCache-style reuse of the UNet's deep
    features. Runs only for tasks that ask for draft quality; default-quality tasks are unaffected."""

    cache_interval: int = Field(0, ge=0, le=10, description="Run the full UNet every N-th step and only its "
                                "shallow blocks in between (0 or 1: no draft tier). SDXL only.")
    steps_fraction: float = Field(1.0, gt=0.0, le=1.0, description="Draft tasks run ceil(steps x this) steps.")

    @property
    def enabled(self) -> bool:
        return self.cache_interval > 1 or self.steps_fraction < 1.0


class OptimizeConfig(_Strict):
    """Pipeline speed-ups (deployments/diffusion/optimize.py; measured effects in docs/optimize.md).
    Eager is the default: compiling costs minutes per size bucket at replica start (seconds with a
    warm compile cache)."""

    compile: CompileMode = "none"
    channels_last: bool = False
    fuse_qkv: bool = False
    fp8: bool = Field(False, description="float8 (e4m3, per-row scales) weights and dynamic activations for "
                      "the UNet's linear layers (torchao; Hopper or newer). Not lossless: see docs/optimize.md.")
    cache_dir: str | None = Field(None, description="Inductor/Triton compile cache (TORCHINDUCTOR_CACHE_DIR), "
                                  "shared by the replicas of a host so a new one loads instead of compiling. "
                                  "None: $TORCHINDUCTOR_CACHE_DIR if set, else $GENSERVE_WORK/compile-cache.")
    buckets: list[str] = Field(default_factory=list, description="Sizes `WxH` that requests snap to (nearest in "
                               "log width/height); the image is generated at the bucket and resized to the size "
                               "asked for. With compile on, one compiled graph per bucket. Empty: no snapping.")
    warmup: bool = Field(True, description="With compile on, run every bucket x warmup batch size once at replica "
                         "start (compiling or loading from cache) so no request pays a compile.")
    warmup_batch_sizes: list[int] = Field(default_factory=list, description="Batch sizes to warm per bucket. "
                                          "Empty: 1 and the largest batch the bucket's megapixel budget allows. "
                                          "(One graph serves every batch size; each new size records a CUDA "
                                          "graph, ~1 s, not a compile.)")
    draft: DraftConfig = Field(default_factory=DraftConfig)

    @model_validator(mode="after")
    def _check_buckets(self) -> OptimizeConfig:
        for b in self.buckets:
            parse(b)  # raises ValueError naming the bad entry
        if any(b < 1 for b in self.warmup_batch_sizes):
            raise ValueError(f"warmup_batch_sizes must be >= 1, got {self.warmup_batch_sizes}")
        return self

    @property
    def enabled(self) -> bool:
        return self != OptimizeConfig()

    @property
    def compiled(self) -> bool:
        return self.compile != "none"


class IPAdapterConfig(_Strict):
    """Style/character references through IP-Adapter (deployments/diffusion/ip_adapter.py), loaded
    with diffusers' `load_ip_adapter(repo, subfolder=, weight_name=, image_encoder_folder=)`. SDXL
    family only. Without this section, tasks with references are refused (422 at the ingress)."""

    repo: str = Field(description="Hub id or local directory holding the adapter weights.")
    subfolder: str = Field("", description="Folder of `weight_name` inside `repo` (h94/IP-Adapter: sdxl_models).")
    weight_name: str = Field(description="The adapter's safetensors file, e.g. ip-adapter-plus_sdxl_vit-h.safetensors.")
    image_encoder: str = Field("image_encoder", description="CLIP vision encoder folder: a bare name is taken "
                               "inside `subfolder`, a path with '/' from the repo root (models/image_encoder: ViT-H).")
    style_blocks: dict[str, Any] | None = Field(
        None, description="UNet blocks a style reference acts on, as diffusers' set_ip_adapter_scale takes them "
        "(InstantStyle on SDXL: {up: {block_0: [0.0, 1.0, 0.0]}}); each entry is multiplied by the reference's "
        "scale. None: every block (a style reference then also carries layout, like a character one).")
    embedding_cache: int = Field(256, ge=1, le=100_000, description="Reference images whose CLIP embeddings a replica "
                                 "keeps (LRU by the image's sha256).")


class PreviewsConfig(_Strict):
    """Streamed partial images (`partial_images`): a tiny VAE (`AutoencoderTiny`, TAESD-style) decodes
    the latents at a few steps beside the denoising loop (deployments/diffusion/previews.py)."""

    vae: str = Field(description="Hub id or local directory of an `AutoencoderTiny` matching the model's "
                     "latents, e.g. `madebyollin/taesdxl` for SDXL (loaded with from_pretrained).")
    max_side: int | None = Field(512, ge=16, le=4096, description="Previews are downscaled to at most this "
                                 "longest side (PNG bytes on the wire and in the job store stay small); None: "
                                 "the full size the tiny VAE decodes.")
# The attention projections: what diffusers' SDXL LoRA training scripts (and genserve's tiny adapters) target.
DEFAULT_HOTSWAP_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LoraServingConfig(_Strict):
    """LoRA adapters on this model's replicas (issue 21; docs/lora.md)."""

    enabled: bool = Field(True, description="Serve requests with `loras` (SDXL family only; Würstchen refuses them).")
    max_adapters_per_replica: int = Field(
        4, ge=1, le=64, description="Adapters a replica keeps loaded (LRU): Serve's multiplexing "
        "`max_num_models_per_replica` (adapter sets) and the pipeline's adapter slots. Also the most adapters "
        "one image may use.")
    hotswap_target_rank: int | None = Field(
        None, ge=1, le=1024, description="With a compiled engine: every slot holds a zero placeholder LoRA of this "
        "rank from before the warm-up (deployments/diffusion/lora_slots.py), and adapters are written into it in "
        "place, so no request recompiles; the largest rank an adapter may have (larger ones are refused). With "
        "optimize.compile on and this unset, the model serves no adapters (each new adapter would recompile "
        "the UNet). Meant for compiled engines: without compile it only adds the placeholders' work.")
    hotswap_target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_HOTSWAP_TARGETS), min_length=1,
        description="With hotswap_target_rank: the UNet layers any adapter may target, as PEFT `target_modules` "
        "(a layer matches an entry equal to its name or ending with `.<entry>`). Every slot holds a zero "
        "placeholder LoRA on these layers from the start, so the warm-up compiles the UNet with them and an "
        "adapter is written into them in place; an adapter targeting any other UNet layer is refused (400). "
        "Default: the attention projections, what diffusers' SDXL LoRA training scripts target. Each extra "
        "layer costs every request a rank-`hotswap_target_rank` LoRA per slot on it.")

    @field_validator("hotswap_target_modules")
    @classmethod
    def _check_targets(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if not t or t != t.strip() or t.startswith(".") or t.endswith(".")]
        if bad:
            raise ValueError(f"hotswap_target_modules: {bad} are not module names (e.g. 'to_q', 'ff.net.2')")
        if len(set(v)) != len(v):
            raise ValueError(f"hotswap_target_modules lists a name twice: {v}")
        return v


class DiffusionModelConfig(_Strict):
    name: str = Field(description="Public model name (the `model` field of requests).")
    family: Literal["sdxl", "wuerstchen"]
    model: str = Field(description="Hub id or local directory, loaded with from_pretrained.")
    aliases: list[str] = Field(default_factory=list, description="Other names, e.g. `v6` for `--v 6`.")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    variant: str | None = None
    native_resolution: int = Field(1024, ge=8, le=4096, description="Side of the native square size.")
    size_multiple: int = Field(64, ge=8, le=128, description="Width/height are snapped to this.")
    max_side: int = Field(1536, ge=8, le=8192)
    min_side: int = Field(64, ge=8, le=4096)
    default_steps: int = Field(30, ge=1, le=200)
    max_steps: int = Field(80, ge=1, le=500)
    default_guidance: float = Field(5.0, ge=0.0, le=50.0)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    batch_invariant: bool | None = Field(
        None, description="Run the heavy models once per image so a seed gives the same pixels alone or "
        "in a batch (CPU kernels change with batch size). None = on for CPU, off for CUDA.")
    decoder_steps: int = Field(12, ge=1, le=100, description="Würstchen decoder steps (task steps are the prior's).")
    optimize: OptimizeConfig = Field(default_factory=OptimizeConfig)
    adaptive_quality: AdaptiveQualityConfig = Field(default_factory=AdaptiveQualityConfig)
    lora: LoraServingConfig = Field(default_factory=LoraServingConfig)
    vae_slicing: bool = Field(
        True, description="SDXL: decode a batch's latents one image at a time. The VAE decode of a whole "
        "batch is the memory peak at large sizes; slicing cuts it at a small cost (benchmarks/README.md).")
    ip_adapter: IPAdapterConfig | None = Field(None, description="IP-Adapter weights for `--sref`/`--cref` "
                                               "references (SDXL family). None: references are refused.")
    probe_memory: bool = Field(
        True, description="On CUDA, run the largest batch the limits allow (1 step) when the replica starts, "
        "so a budget that does not fit the replica's GPU share fails the deploy instead of a request later.")
    previews: PreviewsConfig | None = Field(
        None, description="The preview decoder behind `partial_images` (streamed partial images, job "
        "previews). None: requests asking for partial images are refused with 422. SDXL family only.")
    description: str = ""

    @model_validator(mode="after")
    def _check_sizes(self) -> DiffusionModelConfig:
        if self.previews is not None and self.family != "sdxl":
            raise ValueError(f"previews: model {self.name!r} is {self.family}, whose latents no tiny VAE decodes; "
                             "previews are for the sdxl family only")
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) must be <= max_side ({self.max_side})")
        if self.native_resolution % self.size_multiple:
            raise ValueError(
                f"native_resolution ({self.native_resolution}) must be a multiple of "
                f"size_multiple ({self.size_multiple})"
            )
        if self.native_resolution**2 / 1e6 > self.batch_megapixels:
            raise ValueError(f"batching.max_batch_megapixels ({self.batch_megapixels:g}) is smaller than one image at "
                             f"the native resolution ({self.native_resolution}px): every default request would be refused")
        self._check_buckets_fit()
        if self.adaptive_quality.fallback == "draft" and not self.has_draft_tier:
            raise ValueError("adaptive_quality.fallback is 'draft' but the model has no draft tier "
                             "(SDXL family with optimize.draft.cache_interval > 1 or steps_fraction < 1)")
        if self.ip_adapter is not None and self.family != "sdxl":
            raise ValueError(f"ip_adapter: the {self.family} family has no IP-Adapter support in diffusers (SDXL only)")
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps ({self.default_steps}) must be <= max_steps ({self.max_steps})")
        return self

    def _check_buckets_fit(self) -> None:
        """Every bucket must be a size this model accepts and fit one batch's pixel budget."""
        m = self.size_multiple
        for spec in self.optimize.buckets:
            w, h = parse(spec)
            if w % m or h % m:
                raise ValueError(f"optimize.buckets: {spec} is not a multiple of size_multiple ({m})")
            if not (self.min_side <= min(w, h) and max(w, h) <= self.max_side):
                raise ValueError(f"optimize.buckets: {spec} is outside min_side..max_side "
                                 f"({self.min_side}..{self.max_side})")
            if w * h / 1e6 > self.batch_megapixels:
                raise ValueError(f"optimize.buckets: {spec} is larger than batching.max_batch_megapixels "
                                 f"({self.batch_megapixels:g})")

    @property
    def has_draft_tier(self) -> bool:
        """Whether `quality: "draft"` means anything here (the draft tier is SDXL's split UNet)."""
        return self.family == "sdxl" and self.optimize.draft.enabled

    @property
    def serves_loras(self) -> bool:
        """Whether replicas of this model load adapters (see LoraServingConfig)."""
        return (self.lora.enabled and self.family == "sdxl"
                and (not self.optimize.compiled or self.lora.hotswap_target_rank is not None))

    @property
    def deployment_name(self) -> str:
        return f"Diffusion-{self.name}"

    @property
    def batch_megapixels(self) -> float:
        """The batch pixel budget in megapixels (see `BatchingConfig.max_batch_megapixels`)."""
        if self.batching.max_batch_megapixels is not None:
            return self.batching.max_batch_megapixels
        return self.batching.max_batch_size * self.native_resolution**2 / 1e6

    def batching_user_config(self) -> dict[str, float | int]:
        """The deployment's `user_config` (JSON, as Serve requires): batching with the pixel budget
        resolved, so a `serve deploy` that changes any of it reconfigures replicas in place."""
        return {"max_batch_size": self.batching.max_batch_size,
                "batch_wait_timeout_s": self.batching.batch_wait_timeout_s,
                "max_batch_megapixels": self.batch_megapixels}
