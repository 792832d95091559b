"""The diffusion engine: turns a batch of `ImageTask`s into images with one loaded pipeline.

A plain class (no Ray): the Serve deployment wraps it and calls `generate` in a thread.

Reproducibility: every task gets its own CPU `torch.Generator` seeded with `task.seed` (CPU so that
a seed gives the same starting noise on CPU and CUDA), and its text embeddings are encoded on
their own (batch of one), so a task's image does not depend on which other tasks share its batch.
"""

from __future__ import annotations

import io
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from diffusers.utils import BaseOutput
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from deployments.diffusion.loading import FAMILIES, load_pipeline
from deployments.diffusion.optimize import OptimizeOptions
from deployments.diffusion.optimize import apply as apply_optimizations
from deployments.diffusion.types import ImageResult, ImageTask, WeightedPrompt

OnStep = Callable[[str | None, int, int], None]
ShouldCancel = Callable[[str], bool]
# Keys that generate_images() leaves in each image's `info` for to_result().
COMPUTE_S = "genserve_compute_s"
BATCH_SIZE = "genserve_batch_size"


class GenerationCancelled(Exception):
    """The task's job was cancelled (through `should_cancel`) before its image was finished."""


class _StopDenoising(Exception):
    """Raised from a step callback to leave a pipeline that has no `_interrupt` flag."""


def encode_png(image: Image.Image, params: dict[str, Any], *, compress_level: int = 6) -> bytes:
    """PNG bytes with each of `params` stored as a text chunk (non-Latin-1 text as iTXt)."""
    info = PngInfo()
    for key, value in params.items():
        info.add_text(key, str(value))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, compress_level=compress_level)
    return buf.getvalue()


def format_weighted(parts: Sequence[WeightedPrompt]) -> str:
    return " ".join(f"{p.text}::{p.weight:g}" for p in parts)


def png_params(task: ImageTask, model: str) -> dict[str, Any]:
    params: dict[str, Any] = {
        "prompt": task.prompt,
        "negative_prompt": task.negative_prompt,
        "seed": task.seed,
        "steps": task.steps,
        "guidance_scale": task.guidance_scale,
        "model": model,
        "width": task.width,
        "height": task.height,
    }
    if task.tile:
        params["tile"] = True
    if task.weighted_prompts:
        params["weighted_prompts"] = format_weighted(task.weighted_prompts)
    return params


def _is_cuda_failure(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "CUDA" in str(exc)
    )


@contextmanager
def _circular_padding(modules: Sequence[torch.nn.Module], enabled: bool) -> Iterator[None]:
    """Seamless tiling: padded convs wrap around the image edges, restored on exit."""
    saved: list[tuple[torch.nn.Conv2d, str]] = []
    if enabled:
        for module in modules:
            for conv in module.modules():
                if isinstance(conv, torch.nn.Conv2d) and any(p > 0 for p in conv.padding):
                    saved.append((conv, conv.padding_mode))
                    conv.padding_mode = "circular"
    try:
        yield
    finally:
        for conv, mode in saved:
            conv.padding_mode = mode


def _take(value: Any, rows: list[int], n: int) -> Any:
    """`value` with only `rows` of every tensor whose first dimension is the batch (`n`)."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() > 0 and value.shape[0] == n else value
    if isinstance(value, (tuple, list)):
        return type(value)(_take(v, rows, n) for v in value)
    if isinstance(value, dict):
        return {k: _take(v, rows, n) for k, v in value.items()}
    return value


def _merge(outs: list[Any], order: torch.Tensor) -> Any:
    """Concatenate per-task outputs and put the rows back in the batch's order."""
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outs)[order]
    if isinstance(first, BaseOutput):
        return type(first)(**{k: _merge([o[k] for o in outs], order) for k in first.keys()})
    if isinstance(first, tuple):
        return tuple(_merge([o[i] for o in outs], order) for i in range(len(first)))
    return first


@contextmanager
def _per_task_calls(module: torch.nn.Module, method: str, n_tasks: int) -> Iterator[None]:
    """Run `module.<method>` once per task, on exactly the rows that task would have alone.

    CPU kernels pick different code paths by batch size (oneDNN conv algorithms, MKL's small-M
    GEMM, thread splits, channels-last GroupNorm at N=1), so the same row computed in a batch of
    1 and of 4 differs in the last bits, and after rounding to uint8 about one pixel value in a
    few hundred moves by 1. Feeding each task's rows (its own, or its [cond, uncond] pair under
    guidance) as their own call gives every task the shapes of a lone run: batch-invariant by
    construction. Everything between these calls (scheduler steps, guidance) is elementwise.
    """
    original = getattr(module, method)

    def per_task(*args: Any, **kwargs: Any) -> Any:
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        n = first.shape[0] if first is not None and first.dim() > 0 else 0
        if n_tasks == 1 or n not in (n_tasks, 2 * n_tasks):
            return original(*args, **kwargs)
        groups = [[i] if n == n_tasks else [i, n_tasks + i] for i in range(n_tasks)]
        outs = [original(*_take(args, g, n), **_take(kwargs, g, n)) for g in groups]
        order = torch.argsort(torch.tensor([i for g in groups for i in g]))
        return _merge(outs, order.to(first.device))

    setattr(module, method, per_task)  # instance attribute shadows the class's method
    try:
        yield
    finally:
        delattr(module, method)


def _weighted_sum(parts: Sequence[tuple[float, tuple[torch.Tensor, ...]]]) -> tuple[torch.Tensor, ...]:
    total = sum(w for w, _ in parts)
    n = len(parts[0][1])
    return tuple(sum(w * emb[i] for w, emb in parts) / total for i in range(n))  # type: ignore[misc]


class DiffusionEngine:
    """Generates images for batches of `ImageTask`s with one SDXL-family or Würstchen pipeline.

    Multi-prompt weights (`task.weighted_prompts`, from `a::2 b::-0.5`): each part is encoded on
    its own with the pipeline's text encoder(s) and the embeddings are averaged with the weights as
    given, `sum(w_i * e_i) / sum(w_i)` — for SDXL both the per-token and the pooled embeddings, for
    Würstchen the prior's text embeddings (the prior decides the image content; the decoder sees the
    positively weighted parts joined by ", "). A negative weight pushes away from its part; the
    weights must not sum to 0. The negative prompt is encoded separately and is not weighted.

    Würstchen: `task.steps` are the prior's steps and `guidance_scale` the prior's guidance; the
    decoder runs `decoder_steps` steps without guidance (diffusers' defaults for the combined
    pipeline). Progress counts prior steps then decoder steps.
    """

    def __init__(
        self,
        name: str,
        pipeline: Any,
        family: str,
        *,
        decoder_steps: int = 12,
        batch_invariant: bool | None = None,
        vae_slicing: bool = False,
    ) -> None:
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        if decoder_steps < 1:
            raise ValueError(f"decoder_steps must be >= 1, got {decoder_steps}")
        self.name = name
        self.pipeline = pipeline
        self.family = family
        self.decoder_steps = decoder_steps
        # Bit-exact seeds across batch compositions cost the denoiser its batching (see
        # _per_task_calls). Default: on for CPU (tests, local), off for CUDA (throughput).
        if batch_invariant is None:
            batch_invariant = torch.device(pipeline.device).type == "cpu"
        self.batch_invariant = batch_invariant
        self.size_multiple, self.min_size = self._size_rules()
        pipeline.set_progress_bar_config(disable=True)
        if vae_slicing and family == "sdxl":
            # Decode one image at a time: a whole batch's VAE decode is the memory peak at 1024².
            pipeline.vae.enable_slicing()
        # One pipeline call at a time: calls mutate the pipeline (scheduler state, tiling, flags).
        self._lock = threading.Lock()
        self._broken: str | None = None

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        model_id_or_path: str,
        family: str,
        dtype: str = "float32",
        device: str = "cpu",
        *,
        variant: str | None = None,
        decoder_steps: int = 12,
        batch_invariant: bool | None = None,
        optimize: dict | OptimizeOptions | None = None,
        vae_slicing: bool = False,
    ) -> DiffusionEngine:
        pipeline = load_pipeline(
            model_id_or_path, family, dtype=dtype, device=device, variant=variant  # type: ignore[arg-type]
        )
        pipeline = apply_optimizations(pipeline, family, OptimizeOptions.of(optimize))
        return cls(
            name, pipeline, family, decoder_steps=decoder_steps, batch_invariant=batch_invariant,
            vae_slicing=vae_slicing,
        )

    # -- limits and checks ---------------------------------------------------------------------

    def _size_rules(self) -> tuple[int, int]:
        """(size multiple, minimum size) in pixels for width and height."""
        if self.family == "sdxl":
            # The SDXL pipeline checks divisibility by 8; the VAE needs its own scale factor.
            multiple = math.lcm(8, int(self.pipeline.vae_scale_factor))
            return multiple, 4 * multiple
        # Würstchen: the prior's grid is `resolution_multiple` (42.67) px, the decoder scales it by
        # `latent_dim_scale` (10.67) and the VQGAN by 4, with ceil/int rounding between them: only
        # some sizes come out as asked (others change size or break pixel_unshuffle). Find the
        # smallest step for which 1x..4x all round-trip; 128 px for the released configs.
        for multiple in range(8, 4097, 8):
            if all(self._wuerstchen_out_px(k * multiple) == k * multiple for k in (1, 2, 3, 4)):
                return multiple, multiple
        raise ValueError(f"no image size round-trips through the Würstchen pipeline {self.name!r}")

    def _wuerstchen_out_px(self, px: int) -> int:
        prior_cfg = self.pipeline.prior_pipe.config
        decoder_cfg = self.pipeline.decoder_pipe.config
        vq_cfg = self.pipeline.vqgan.config
        vq_scale = vq_cfg.up_down_scale_factor * 2 ** (vq_cfg.levels - 1)
        prior_px = math.ceil(px / prior_cfg.resolution_multiple)
        decoder_px = int(prior_px * decoder_cfg.latent_dim_scale)
        if decoder_px % 2:  # DiffNeXt pixel-unshuffles by 2
            return -1
        return decoder_px * vq_scale

    def validate(self, task: ImageTask) -> None:
        """Raise ValueError (diffusers-style message) if `task` cannot run on this model."""
        h, w, m = task.height, task.width, self.size_multiple
        if h % m or w % m:
            raise ValueError(f"`height` and `width` have to be divisible by {m} but are {h} and {w}.")
        if h < self.min_size or w < self.min_size:
            raise ValueError(
                f"`height` and `width` have to be at least {self.min_size} but are {h} and {w}."
            )
        if not isinstance(task.steps, int) or task.steps < 1:
            raise ValueError(f"`steps` has to be a positive integer but is {task.steps!r}.")
        if not task.guidance_scale >= 0:
            raise ValueError(f"`guidance_scale` has to be >= 0 but is {task.guidance_scale!r}.")
        if not 0 <= task.seed < 2**64:
            raise ValueError(f"`seed` has to be in [0, 2**64) but is {task.seed}.")
        if task.weighted_prompts and sum(p.weight for p in task.weighted_prompts) == 0:
            raise ValueError(
                "multi-prompt weights must not sum to 0 but "
                f"{format_weighted(task.weighted_prompts)!r} does"
            )

    def total_steps(self, task: ImageTask) -> int:
        return task.steps + (self.decoder_steps if self.family == "wuerstchen" else 0)

    def health(self) -> None:
        if self._broken is not None:
            raise RuntimeError(f"diffusion engine {self.name!r} is unusable after: {self._broken}")

    # -- generation ----------------------------------------------------------------------------

    def generate(
        self,
        tasks: list[ImageTask],
        *,
        on_step: OnStep | None = None,
        should_cancel: ShouldCancel | None = None,
    ) -> list[ImageResult | Exception]:
        """`generate_images` then PNG-encode each image (see `to_result`)."""
        images = self.generate_images(tasks, on_step=on_step, should_cancel=should_cancel)
        return [
            img if isinstance(img, Exception) else self.to_result(task, img)
            for task, img in zip(tasks, images, strict=True)
        ]

    def to_result(self, task: ImageTask, image: Image.Image) -> ImageResult:
        """PNG-encode one image from `generate_images` (can run off the denoising thread)."""
        return ImageResult(
            png=encode_png(image, png_params(task, self.name)),
            seed=task.seed,
            width=image.width,
            height=image.height,
            steps=task.steps,
            guidance_scale=task.guidance_scale,
            model=self.name,
            batch_size=int(image.info.get(BATCH_SIZE, 1)),
            compute_s=float(image.info.get(COMPUTE_S, 0.0)),
            extra={"family": self.family},
        )

    def generate_images(
        self,
        tasks: list[ImageTask],
        *,
        on_step: OnStep | None = None,
        should_cancel: ShouldCancel | None = None,
    ) -> list[Image.Image | Exception]:
        """Denoise and decode: one image or exception per task, in input order.

        Tasks with equal `group_key()` share one pipeline call. An invalid task gets its
        ValueError without running; a failing group gets its exception without affecting other
        groups. Each image's `info` carries the group's compute seconds and batch size.
        `on_step(task_id, step, total)` is called for every task after each step; when
        `should_cancel(task_id)` holds for every task of a group (so never for a group holding a
        task without task_id), the group stops at that step. Tasks whose job was cancelled get
        `GenerationCancelled`.
        """
        results: list[Image.Image | Exception | None] = [None] * len(tasks)
        groups: dict[tuple, list[int]] = {}
        for i, task in enumerate(tasks):
            try:
                self.validate(task)
            except ValueError as exc:
                results[i] = exc
                continue
            groups.setdefault(task.group_key(), []).append(i)
        for indices in groups.values():
            group = [tasks[i] for i in indices]
            for i, out in zip(indices, self._run_group(group, on_step, should_cancel), strict=True):
                results[i] = out
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _run_group(
        self, tasks: list[ImageTask], on_step: OnStep | None, should_cancel: ShouldCancel | None
    ) -> list[Image.Image | Exception]:
        cancelled: dict[int, str] = {}

        def poll_cancel(where: str) -> bool:
            """Record newly cancelled tasks; True when no task of the group still wants its image."""
            if should_cancel is not None:
                for j, task in enumerate(tasks):
                    if j not in cancelled and task.task_id is not None and should_cancel(task.task_id):
                        cancelled[j] = where
            return len(cancelled) == len(tasks)

        def step_done(step: int) -> bool:
            total = self.total_steps(tasks[0])
            if on_step is not None:
                for task in tasks:
                    on_step(task.task_id, step, total)
            return poll_cancel(f"step {step} of {total}")

        images: list[Image.Image] = []
        if not poll_cancel("before start"):
            started = time.perf_counter()
            try:
                with self._lock, torch.inference_mode(), ExitStack() as stack:
                    stack.enter_context(_circular_padding(self._tiling_modules(), tasks[0].tile))
                    if self.batch_invariant:
                        for module, method in self._heavy_calls():
                            stack.enter_context(_per_task_calls(module, method, len(tasks)))
                    if self.family == "sdxl":
                        images = self._run_sdxl(tasks, step_done)
                    else:
                        images = self._run_wuerstchen(tasks, step_done)
            except _StopDenoising:
                images = []
            except Exception as exc:  # one group's failure must not sink the other groups
                if _is_cuda_failure(exc):
                    self._broken = f"{type(exc).__name__}: {exc}"
                return [exc] * len(tasks)
            compute_s = time.perf_counter() - started
            for image in images:
                image.info[COMPUTE_S] = compute_s
                image.info[BATCH_SIZE] = len(tasks)

        out: list[Image.Image | Exception] = []
        for j, task in enumerate(tasks):
            if j in cancelled:
                out.append(GenerationCancelled(f"task {task.task_id!r} cancelled {cancelled[j]}"))
            elif j < len(images):
                out.append(images[j])
            else:  # stopped early only when every task was cancelled, so unreachable
                out.append(GenerationCancelled(f"task {task.task_id!r} stopped"))
        return out

    def _tiling_modules(self) -> list[torch.nn.Module]:
        p = self.pipeline
        if self.family == "sdxl":
            return [p.unet, p.vae]
        return [p.prior_prior, p.decoder, p.vqgan]

    def _heavy_calls(self) -> list[tuple[torch.nn.Module, str]]:
        """The model calls that see the whole batch (what `batch_invariant` splits per task)."""
        p = self.pipeline
        if self.family == "sdxl":
            return [(p.unet, "forward"), (p.vae, "decode")]
        return [(p.prior_prior, "forward"), (p.decoder, "forward"), (p.vqgan, "decode")]

    @staticmethod
    def _generators(tasks: Sequence[ImageTask]) -> list[torch.Generator]:
        return [torch.Generator(device="cpu").manual_seed(t.seed) for t in tasks]

    # -- SDXL ------------------------------------------------------------------------------------

    def _run_sdxl(self, tasks: list[ImageTask], step_done: Callable[[int], bool]) -> list[Image.Image]:
        p = self.pipeline
        first = tasks[0]
        cfg = first.guidance_scale > 1 and p.unet.config.time_cond_proj_dim is None
        cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def encode(text: str) -> tuple[torch.Tensor, torch.Tensor]:
            # One text at a time so embeddings don't depend on the batch they arrive in.
            if text not in cache:
                emb, _, pooled, _ = p.encode_prompt(
                    prompt=text, device=p._execution_device, do_classifier_free_guidance=False
                )
                cache[text] = (emb, pooled)
            return cache[text]

        def positive(task: ImageTask) -> tuple[torch.Tensor, ...]:
            if not task.weighted_prompts:
                return encode(task.prompt)
            return _weighted_sum([(wp.weight, encode(wp.text)) for wp in task.weighted_prompts])

        pos = [positive(t) for t in tasks]

        def negative(j: int) -> tuple[torch.Tensor, ...]:
            if not tasks[j].negative_prompt and p.config.force_zeros_for_empty_prompt:
                # SDXL's own rule: an absent negative prompt means zero embeddings, not "".
                return tuple(torch.zeros_like(t) for t in pos[j])
            return encode(tasks[j].negative_prompt)

        kwargs: dict[str, Any] = {
            "prompt_embeds": torch.cat([e for e, _ in pos]),
            "pooled_prompt_embeds": torch.cat([pl for _, pl in pos]),
        }
        if cfg:
            neg = [negative(j) for j in range(len(tasks))]
            kwargs["negative_prompt_embeds"] = torch.cat([e for e, _ in neg])
            kwargs["negative_pooled_prompt_embeds"] = torch.cat([pl for _, pl in neg])

        def on_step_end(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if step_done(i + 1):
                # diffusers' own stop flag: the loop skips the remaining steps and the pipeline
                # still runs its clean-up (offload hooks); the decoded images are discarded.
                pipe._interrupt = True
                raise_after[0] = True
            return tensors

        raise_after = [False]
        images = p(
            **kwargs,
            height=first.height,
            width=first.width,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            generator=self._generators(tasks),
            callback_on_step_end=on_step_end,
            output_type="pil",
        ).images
        if raise_after[0]:
            raise _StopDenoising()
        return list(images)

    # -- Würstchen -------------------------------------------------------------------------------

    def _run_wuerstchen(
        self, tasks: list[ImageTask], step_done: Callable[[int], bool]
    ) -> list[Image.Image]:
        p = self.pipeline
        prior, decoder = p.prior_pipe, p.decoder_pipe
        device = p._execution_device
        first = tasks[0]
        cfg = first.guidance_scale > 1
        prior_cache: dict[str, tuple[torch.Tensor]] = {}

        def prior_encode(text: str) -> tuple[torch.Tensor]:
            if text not in prior_cache:
                emb, _ = prior.encode_prompt(device, 1, False, prompt=[text])
                prior_cache[text] = (emb,)
            return prior_cache[text]

        def prior_positive(task: ImageTask) -> torch.Tensor:
            if not task.weighted_prompts:
                return prior_encode(task.prompt)[0]
            return _weighted_sum([(wp.weight, prior_encode(wp.text)) for wp in task.weighted_prompts])[0]

        def decoder_text(task: ImageTask) -> str:
            if not task.weighted_prompts:
                return task.prompt
            return ", ".join(wp.text for wp in task.weighted_prompts if wp.weight > 0)

        # diffusers 0.42's decoder repeats each of a list of B prompts B times (B*B rows against B
        # latents: "Sizes of tensors must match"), so a batch of different prompts fails. Encode
        # each decoder prompt on its own here and hand the rows to the decoder below.
        decoder_rows = torch.cat(
            [decoder.encode_prompt([decoder_text(t)], device, 1, False)[0] for t in tasks]
        )

        kwargs: dict[str, Any] = {"prompt_embeds": torch.cat([prior_positive(t) for t in tasks])}
        if cfg:
            kwargs["negative_prompt_embeds"] = torch.cat(
                [prior_encode(t.negative_prompt)[0] for t in tasks]
            )

        def prior_step(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if step_done(i + 1):
                raise _StopDenoising()  # these pipelines have no `_interrupt` flag
            return tensors

        def decoder_step(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if step_done(first.steps + i + 1):
                raise _StopDenoising()
            return tensors

        def decoder_encode(*args: Any, **kw: Any) -> tuple[torch.Tensor, None]:
            return decoder_rows, None  # decoder guidance is 0: no unconditional rows needed

        decoder.encode_prompt = decoder_encode  # instance attribute shadows the method
        try:
            images = p(
                prompt=[decoder_text(t) for t in tasks],
                **kwargs,
                height=first.height,
                width=first.width,
                prior_num_inference_steps=first.steps,
                prior_guidance_scale=first.guidance_scale,
                num_inference_steps=self.decoder_steps,
                decoder_guidance_scale=0.0,
                generator=self._generators(tasks),
                prior_callback_on_step_end=prior_step,
                callback_on_step_end=decoder_step,
                output_type="pil",
            ).images
        finally:
            del decoder.encode_prompt
        return list(images)
