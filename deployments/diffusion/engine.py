"""The diffusion engine: turns a batch of `ImageTask`s into images with one loaded pipeline.

A plain class (no Ray): the Serve deployment wraps it and calls `generate` in a thread.
This module holds the public API (loading, validation, progress, cancellation, locking) and
returns raw images (the deployment PNG-encodes them off the denoising thread: `png.image_result`);
it dispatches each group of tasks to its family's module: `sdxl.py`, `wuerstchen.py`.
The hooks around a pipeline call (tiling, batch invariance) are in `hooks.py`, PNG output in
`png.py`.

Reproducibility: every task gets its own CPU `torch.Generator` seeded with `task.seed` (CPU so that
a seed gives the same starting noise on CPU and CUDA), and its text embeddings are encoded on
their own (batch of one), so a task's image does not depend on which other tasks share its batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch
from PIL import Image

from deployments.diffusion import img2img, ip_adapter, sdxl, wuerstchen
from deployments.diffusion.config import DiffusionModelConfig, IPAdapterConfig, OptimizeConfig
from deployments.diffusion.hooks import LiveRows, StopDenoising, circular_padding, generators, per_task_calls
from deployments.diffusion.loading import FAMILIES, load_pipeline
from deployments.diffusion.lora import LoraManager
from deployments.diffusion.lora_rows import split_by_slots
from deployments.diffusion.optimize import apply as apply_optimizations
from deployments.diffusion.previews import OnPreview, PreviewDecoder
from deployments.diffusion.rules import SizeRules, check_task
from deployments.diffusion.types import ImageTask

OnStep = Callable[[str | None, int, int], None]
ShouldCancel = Callable[[str], bool]
# Keys that generate_images() leaves in each image's `info` (the compute seconds and batch size of
# its group; the deployment measures its own, tests read these).
COMPUTE_S = "genserve_compute_s"
BATCH_SIZE = "genserve_batch_size"
_MIXED = "mixed-loras"  # ends the group key of tasks whose adapter sets may share a call


class GenerationCancelled(Exception):
    """The task's job was cancelled (through `should_cancel`) before its image was finished."""


def _is_cuda_failure(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "CUDA" in str(exc)
    )



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
        size_rules: SizeRules | None = None,
    ) -> None:
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        if decoder_steps < 1:
            raise ValueError(f"decoder_steps must be >= 1, got {decoder_steps}")
        self.name = name
        self.pipeline = pipeline
        self.family = family
        self._family = sdxl if family == "sdxl" else wuerstchen  # the module that runs it
        self.decoder_steps = decoder_steps
        # Bit-exact seeds across batch compositions cost the denoiser its batching (see
        # hooks.per_task_calls). Default: on for CPU (tests, local), off for CUDA (throughput).
        if batch_invariant is None:
            batch_invariant = torch.device(pipeline.device).type == "cpu"
        self.batch_invariant = batch_invariant
        # The pipeline's own limits; a model config's rules (what the ingress checks) must lie
        # within them, and are then the ones checked here too: one set of rules on both sides.
        multiple, min_size = self._size_rules()
        drawable = SizeRules(multiple=multiple, min_side=min_size)
        if size_rules is not None:
            size_rules.covered_by(drawable)
        self.size_rules = size_rules or drawable
        pipeline.set_progress_bar_config(disable=True)
        if vae_slicing and family == "sdxl":
            # Decode one image at a time: a whole batch's VAE decode is the memory peak at 1024².
            pipeline.vae.enable_slicing()
        # One pipeline call at a time: calls mutate the pipeline (scheduler state, tiling, flags).
        self._lock = threading.Lock()
        self._broken: str | None = None
        # Style/character references (ip_adapter.py): None until `load_ip_adapter`.
        self.references: ip_adapter.ReferenceAdapter | None = None
        # Decodes `partial_images` beside the loop (previews.py); set by from_config when configured.
        self.previews: PreviewDecoder | None = None
        # LoRA adapters (deployments/diffusion/lora.py): set by the server when the model serves them.
        self.adapters: LoraManager | None = None

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
        optimize: OptimizeConfig | None = None,
        vae_slicing: bool = False,
        size_rules: SizeRules | None = None,
        ip_adapter: IPAdapterConfig | None = None,
    ) -> DiffusionEngine:
        pipeline = load_pipeline(
            model_id_or_path, family, dtype=dtype, device=device, variant=variant  # type: ignore[arg-type]
        )
        pipeline = apply_optimizations(pipeline, family, optimize or OptimizeConfig())
        engine = cls(
            name, pipeline, family, decoder_steps=decoder_steps, batch_invariant=batch_invariant,
            vae_slicing=vae_slicing, size_rules=size_rules,
        )
        if ip_adapter is not None:
            engine.load_ip_adapter(ip_adapter)
        return engine

    @classmethod
    def from_config(cls, config: DiffusionModelConfig, device: str) -> DiffusionEngine:
        """Load the model of one deployment's config on `device` (resolved: "cpu" or "cuda"). With
        compile on, the caller warms its size buckets next (warmup.warm_up)."""
        engine = cls.from_pretrained(
            config.name, config.model, config.family, dtype=config.dtype, device=device, variant=config.variant,
            decoder_steps=config.decoder_steps, batch_invariant=config.batch_invariant, optimize=config.optimize,
            vae_slicing=config.vae_slicing,
            size_rules=SizeRules(config.size_multiple, config.min_side, config.max_side),
            ip_adapter=config.ip_adapter)
        if config.previews is not None:
            engine.previews = PreviewDecoder.load(config.previews, dtype=config.dtype, device=device)
        return engine

    def load_ip_adapter(self, config: IPAdapterConfig) -> None:
        """Load the IP-Adapter that draws `task.references` (SDXL family; ip_adapter.py)."""
        if self.family != "sdxl":
            raise ValueError(f"ip_adapter: model {self.name!r} ({self.family}) has no IP-Adapter support")
        with self._lock:
            self.references = ip_adapter.ReferenceAdapter(self.pipeline, config)

    # -- limits and checks ---------------------------------------------------------------------

    def _size_rules(self) -> tuple[int, int]:
        """(size multiple, minimum size) in pixels for width and height."""
        if self.family == "sdxl":
            return sdxl.size_rules(self.pipeline)
        return wuerstchen.size_rules(self.pipeline, self.name)

    @property
    def size_multiple(self) -> int:
        return self.size_rules.multiple

    @property
    def min_size(self) -> int:
        return self.size_rules.min_side

    def validate(self, task: ImageTask) -> None:
        """Raise ValueError (diffusers-style message) if `task` cannot run on this model: the
        contract's rules (`rules.check_task`), the same ones the ingress applied, and what this
        model can draw from images (init image, mask, references; one at scale 0 is absent)."""
        task = ip_adapter.without_zero_scales(task)
        check_task(task, self.size_rules, model=self.name)
        if task.loras:
            if self.adapters is None:
                raise ValueError(f"model {self.name!r} serves no LoRA adapters, but the task has loras")
            self.adapters.check(task.loras)
        if self.family == "wuerstchen":
            # diffusers has no img2img, inpainting or IP-Adapter for Würstchen.
            for given, param in ((task.init_image, "image (init_image, --iw)"), (task.mask, "mask"),
                                 (task.references, "references (--sref/--cref/--oref)")):
                if given:
                    raise ValueError(f"`{param}` is not supported by model {self.name!r} (Würstchen has no "
                                     f"image-to-image pipeline); use an SDXL-family model.")
            return
        img2img.check(task, model=self.name)
        ip_adapter.check(task, loaded=self.references is not None, model=self.name)

    def total_steps(self, task: ImageTask) -> int:
        """Steps the task's progress counts to: what actually runs (img2img runs the last
        `int(steps * strength)` of its schedule; a draft task may run fewer; Würstchen adds its decoder's)."""
        if self.family != "sdxl":
            return task.steps + self.decoder_steps
        steps = sdxl.plan(self.pipeline, task)[2]
        return img2img.steps_run(steps, task.strength) if task.init_image is not None else steps

    def health(self) -> None:
        if self._broken is not None:
            raise RuntimeError(f"diffusion engine {self.name!r} is unusable after: {self._broken}")

    # -- generation ----------------------------------------------------------------------------

    def generate_images(
        self,
        tasks: list[ImageTask],
        *,
        on_step: OnStep | None = None,
        should_cancel: ShouldCancel | None = None,
        on_preview: OnPreview | None = None,
    ) -> list[Image.Image | Exception]:
        """Denoise and decode: one image or exception per task, in input order.

        Tasks with equal `self.group_key()` share one pipeline call. An invalid task gets its
        ValueError without running; a failing group gets its exception without affecting other
        groups. Each image's `info` carries the group's compute seconds and batch size.
        `on_step(task_id, step, total)` is called for every live task after each step.
        `should_cancel(task_id)` is polled after each step: a cancelled task leaves its batch at
        that step (SDXL drops its rows, the others continue bit-identically; Würstchen keeps
        computing it to the end), and when every task of a group is cancelled the group stops.
        Tasks whose job was cancelled get `GenerationCancelled`. `on_preview(task_id, PartialImage)`
        receives the previews of tasks asking for `partial_images` (from the preview thread).
        """
        results: list[Image.Image | Exception | None] = [None] * len(tasks)
        groups: dict[tuple, list[int]] = {}
        tasks = [ip_adapter.without_zero_scales(t) for t in tasks]  # a 0-scale reference draws nothing
        for i, task in enumerate(tasks):
            try:
                self.validate(task)
            except ValueError as exc:
                results[i] = exc
                continue
            groups.setdefault(self.group_key(task), []).append(i)
        for key, members in groups.items():
            # Mixed-adapter groups: sub-batches whose adapters fit the replica's slots at once.
            parts = [members] if key[-1] != _MIXED else [
                [members[j] for j in part] for part in
                split_by_slots([tasks[i].loras for i in members], self.adapters.slots)]  # type: ignore[union-attr]
            for indices in parts:
                group = [tasks[i] for i in indices]
                for i, out in zip(indices, self._run_group(group, on_step, should_cancel, on_preview), strict=True):
                    results[i] = out
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def group_key(self, task: ImageTask) -> tuple[Any, ...]:
        """Tasks with equal keys share one pipeline call (split further only by the slots a mixed
        group's adapters need). With placeholder LoRA slots, the adapter set is not part of it for
        tasks whose adapters can mix (per-row weights: lora_rows.py)."""
        if self.adapters is not None and self.family == "sdxl" and self.adapters.mixes(task.loras):
            return (*task.group_key(with_loras=False), _MIXED)
        return task.group_key()

    def _run_group(
        self, tasks: list[ImageTask], on_step: OnStep | None, should_cancel: ShouldCancel | None,
        on_preview: OnPreview | None = None,
    ) -> list[Image.Image | Exception]:
        cancelled: dict[int, str] = {}

        def poll_cancel(where: str) -> bool:
            """Record newly cancelled tasks; True when no task of the group still wants its image."""
            if should_cancel is not None:
                for j, task in enumerate(tasks):
                    if j not in cancelled and task.task_id is not None and should_cancel(task.task_id):
                        cancelled[j] = where
            return len(cancelled) == len(tasks)

        rows = LiveRows(len(tasks), cancelled)

        def step_done(step: int) -> bool:
            total = self.total_steps(tasks[0])
            if on_step is not None:
                for j in rows.live:  # a task that left the batch (or was cancelled) reports no more steps
                    if j not in cancelled:
                        on_step(tasks[j].task_id, step, total)
            return poll_cancel(f"step {step} of {total}")

        images: dict[int, Image.Image] = {}  # task index -> its image
        if not poll_cancel("before start"):
            started = time.perf_counter()
            try:
                with self._lock, torch.inference_mode(), ExitStack() as stack:
                    lora_rows = None
                    if self.adapters is not None and self.adapters.placeholders is not None:
                        lora_rows = self.adapters.activate_rows([t.loras for t in tasks])  # per-task weights
                    elif self.adapters is not None:  # the group's adapter set (one per group: group_key)
                        self.adapters.activate(tasks[0].loras)
                    stack.enter_context(
                        circular_padding(self._family.tiling_modules(self.pipeline), tasks[0].tile)
                    )
                    if self.previews is not None and on_preview is not None and self.family == "sdxl":
                        stack.enter_context(self.previews.capture(self.pipeline.scheduler, tasks, rows, on_preview))
                    if self.batch_invariant:
                        for module, method in self._family.heavy_calls(self.pipeline):
                            stack.enter_context(per_task_calls(module, method, rows.__len__))
                    finished = self._run_family(tasks, step_done, rows, lora_rows)
                    images = dict(zip(rows.live, finished, strict=True))
            except StopDenoising:
                images = {}
            except Exception as exc:  # one group's failure must not sink the other groups
                if _is_cuda_failure(exc):
                    self._broken = f"{type(exc).__name__}: {exc}"
                return [exc] * len(tasks)
            compute_s = time.perf_counter() - started
            for image in images.values():
                image.info[COMPUTE_S] = compute_s
                image.info[BATCH_SIZE] = len(tasks)

        out: list[Image.Image | Exception] = []
        for j, task in enumerate(tasks):
            if j in cancelled:
                out.append(GenerationCancelled(f"task {task.task_id!r} cancelled {cancelled[j]}"))
            elif j in images:
                out.append(images[j])
            else:  # a task leaves the batch only once cancelled, so unreachable
                out.append(GenerationCancelled(f"task {task.task_id!r} stopped"))
        return out

    def _run_family(
        self, tasks: list[ImageTask], step_done: Callable[[int], bool], rows: LiveRows,
        lora_rows: torch.Tensor | None = None,
    ) -> list[Image.Image]:
        """One pipeline call for a group: the images of the tasks in `rows.live` at the end, in
        that order; `step_done(step)` returns True to stop denoising. `lora_rows`: the tasks' LoRA
        slot weights [tasks, slots] (placeholder slots)."""
        gens = generators(tasks)
        if self.family == "sdxl":
            if self.references is None:
                return sdxl.run(self.pipeline, tasks, step_done, gens, rows, lora_rows=lora_rows)
            with self.references.active(tasks, sdxl.uses_cfg(self.pipeline, tasks[0])) as extra:
                return sdxl.run(self.pipeline, tasks, step_done, gens, rows, extra, lora_rows=lora_rows)
        return wuerstchen.run(self.pipeline, tasks, step_done, gens, decoder_steps=self.decoder_steps)
