"""The images a request starts from or refers to, attached to its `ImageSpec`.

`attach` (at the ingress, before quota: bad input is refused before anything is charged) loads
every image the prompt names (image prompts, `--sref`, `--cref`, `--oref`) and the images sent
with an edit or a variation, checks them (images/inputs.py) and records them in the spec as
references (`ImageRef`: source + sha256) with the strength and IP-Adapter scales of
prompts/mapping.py. `load` is what a job's runner calls before each attempt: the same sources
again, refused unless each still has its sha256 (a deleted upload or a changed URL fails the
job with the reason; bytes sent with a request are not stored and can't be loaded again).

Rules (docs/prompt-parameters.md, docs/api-images.md):
- one image prompt per request (Midjourney blends several; one init image is what img2img takes);
- an edit's first `image` is the init image, further ones are character references;
- an edit without `mask` uses the image's fully transparent pixels as the mask, if it has some;
- strength: variations use `image_inputs.variation_strength`; an inpainting edit without `--iw`
  repaints the masked area fully (1.0); otherwise `strength_for_image_weight(--iw)`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import anyio

from deployments.diffusion.types import InputImage
from serve_app.images.inputs import ImageInputs, InputRefused, alpha_mask
from serve_app.images.spec import UPLOAD, ImageRef, ImageSpec, ReferenceSpec
from serve_app.prompts import mapping

EDIT_REFERENCE_SCALE = mapping.REFERENCE_SCALE_DEFAULT


@dataclass(frozen=True)
class Sent:
    """An image given with the request: bytes (multipart) or a source string (URL, data URL, file id)."""

    param: str
    data: bytes | None = None
    source: str | None = None

    @property
    def stored_source(self) -> str:
        """What the spec keeps: the URL or file id; `upload` for bytes and data URLs."""
        return self.source if self.source is not None and not self.source.startswith("data:") else UPLOAD


@dataclass(frozen=True)
class SentImages:
    """The images of `POST /v1/images/edits` or `/variations`."""

    images: tuple[Sent, ...]
    mask: Sent | None = None
    strength: float | None = None  # fixed (variations); None: from `--iw` and the mask rule


def _refused(status: int, message: str, param: str, code: str) -> InputRefused:
    return InputRefused(status, message, param=param, code=code)


class Conditioning:
    def __init__(self, inputs: ImageInputs) -> None:
        self.inputs = inputs

    async def _one(self, sent: Sent, tenant_id: int | None, *, mask: bool = False) -> InputImage:
        if sent.data is not None:
            return await self.inputs.from_bytes(sent.data, param=sent.param, mask=mask)
        assert sent.source is not None
        return await self.inputs.load(sent.source, param=sent.param, tenant_id=tenant_id, mask=mask)

    async def attach(self, spec: ImageSpec, *, tenant_id: int | None,
                     sent: SentImages | None = None) -> tuple[ImageSpec, dict[str, InputImage]]:
        """`spec` with its input images recorded, and the loaded images by sha256."""
        p = spec.params
        if len(p.image_prompts) > 1:
            raise _refused(422, f"the prompt starts with {len(p.image_prompts)} image prompts; one is supported "
                           "(it is the image the picture starts from). Give others as --sref or --cref.",
                           "prompt", "too_many_image_prompts")
        if sent is not None and p.image_prompts:
            raise _refused(400, "an edit takes its image from `image`, not from an image URL in the prompt.",
                           "prompt", "image_prompt_with_image")
        named = [Sent("prompt", source=s) for s in p.image_prompts] + [
            Sent("--sref", source=s) for s in p.style_refs] + [
            Sent("--cref", source=s) for s in p.character_refs] + (
            [Sent("--oref", source=p.omni_ref)] if p.omni_ref else [])
        given = list(sent.images) if sent else []
        total = len(named) + len(given) + (1 if sent and sent.mask else 0)
        limit = self.inputs.cfg.max_images
        if total > limit:
            param = given[0].param if given else named[0].param
            raise _refused(400, f"the request has {total} input images; the limit is {limit}.", param,
                           "too_many_input_images")
        if not named and not given:
            return spec, {}
        # All at once: fetches overlap; the first refusal cancels the rest.
        order = [*given, *named]
        loaded: list[InputImage | None] = [None] * len(order)

        async def load(i: int, s: Sent) -> None:
            loaded[i] = await self._one(s, tenant_id)

        mask_img: InputImage | None = None

        async def load_mask() -> None:
            nonlocal mask_img
            if sent is not None and sent.mask is not None:
                mask_img = await self._one(sent.mask, tenant_id, mask=True)
            elif given and given[0].data is not None:
                data, cfg, param = given[0].data, self.inputs.cfg, given[0].param
                mask_img = await anyio.to_thread.run_sync(lambda: alpha_mask(data, cfg, param=param))

        try:
            async with asyncio.TaskGroup() as group:
                for i, s in enumerate(order):
                    group.create_task(load(i, s))
                if given:
                    group.create_task(load_mask())
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
        images = [im for im in loaded if im is not None]
        by_sha = {im.sha256: im for im in images}
        refs = [ImageRef(source=s.stored_source, sha256=im.sha256, param=s.param) for s, im in zip(order, images,
                                                                                                     strict=True)]
        update: dict[str, object] = {}
        init_ref: ImageRef | None = None
        if given:
            init_ref = refs[0]
        elif p.image_prompts:
            init_ref = refs[len(given)]
        references = self._references(spec, refs[len(given) + len(p.image_prompts):], refs[1:len(given)])
        if init_ref is not None:
            update["init_image"] = init_ref
            update["strength"] = self._strength(spec, sent, has_mask=mask_img is not None)
        if mask_img is not None:
            init = by_sha[init_ref.sha256] if init_ref else None
            self._same_size(init, mask_img, sent.mask.param if sent and sent.mask else "mask")
            by_sha[mask_img.sha256] = mask_img
            source = sent.mask.stored_source if sent and sent.mask else UPLOAD
            update["mask"] = ImageRef(source=source, sha256=mask_img.sha256, param="mask")
        update["references"] = references
        return spec.model_copy(update=update), by_sha

    @staticmethod
    def _strength(spec: ImageSpec, sent: SentImages | None, *, has_mask: bool) -> float:
        if sent is not None and sent.strength is not None:
            return sent.strength
        if has_mask and spec.params.image_weight is None:
            return 1.0
        return mapping.strength_for_image_weight(spec.params.image_weight)

    @staticmethod
    def _references(spec: ImageSpec, named: Sequence[ImageRef], extra: Sequence[ImageRef]) -> tuple[ReferenceSpec, ...]:
        p = spec.params
        out: list[ReferenceSpec] = []
        for ref in named:
            if ref.param == "--sref":
                out.append(ReferenceSpec(kind="style", image=ref, scale=mapping.reference_scale(p.style_weight)))
            elif ref.param == "--cref":
                out.append(ReferenceSpec(kind="character", image=ref, scale=mapping.character_scale(p.character_weight)))
            else:  # --oref
                out.append(ReferenceSpec(kind="character", image=ref, scale=mapping.reference_scale(p.omni_weight)))
        out.extend(ReferenceSpec(kind="character", image=ref, scale=EDIT_REFERENCE_SCALE) for ref in extra)
        return tuple(out)

    @staticmethod
    def _same_size(init: InputImage | None, mask: InputImage, param: str) -> None:
        from io import BytesIO

        from PIL import Image

        if init is None:
            return
        with Image.open(BytesIO(init.png)) as a, Image.open(BytesIO(mask.png)) as b:
            if a.size != b.size:
                raise _refused(400, f"the mask is {b.width}x{b.height} but the image is {a.width}x{a.height}; "
                               "they must be the same size.", param, "mask_size_mismatch")

    async def load(self, spec: ImageSpec, *, tenant_id: int | None) -> dict[str, InputImage]:
        """A stored spec's images, loaded again and checked against their sha256 (a job's attempt)."""
        out: dict[str, InputImage] = {}
        for ref in spec.image_refs:
            if ref.source == UPLOAD:
                raise _refused(422, f"{ref.param}: an image sent with the request is not kept and can't be "
                               "loaded again.", ref.param, "input_image_gone")
            img = await self.inputs.load(ref.source, param=ref.param, tenant_id=tenant_id, mask=ref is spec.mask)
            if img.sha256 != ref.sha256:
                raise _refused(422, f"{ref.param}: the image at {ref.source!r} changed since the request was "
                               "accepted.", ref.param, "input_image_changed")
            out[img.sha256] = img
        return out


__all__ = ["Conditioning", "Sent", "SentImages"]
