"""The multipart forms of `POST /v1/images/edits` and `/v1/images/variations` (OpenAI's shape, what
`client.images.edit(...)` and `client.images.create_variation(...)` send) → the typed
`ImageGenerationRequest` every image route renders, plus the images sent with it (`SentImages`).

An `image` (or `image[]`, the openai client's name for a list) part is either a file or a text
value naming an image: an http(s) URL, a `data:image/...;base64,` URL or a `file-...` upload id.
`mask` likewise. Unknown fields are 400 (a typo must not silently do nothing).

`stream` and `partial_images` go to the same `ImageGenerationRequest` fields as the JSON route's, so
their limits and errors are one rule (400 naming the field); edits stream `image_edit.*` events.
Variations don't stream (OpenAI's don't either): `stream` there is a 400 naming it.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from serve_app.errors import APIError, bad_request
from serve_app.images.conditioning import Sent, SentImages
from serve_app.images.protocol import ImageGenerationRequest

# Fields passed on to ImageGenerationRequest (validated there), per route.
_COMMON = {"n", "size", "response_format", "user", "model", "quality", "seed", "negative_prompt", "steps",
           "guidance_scale", "metadata"}
EDIT_FIELDS = _COMMON | {"prompt", "template", "template_version", "enhance", "stream", "partial_images"}
VARIATION_FIELDS = _COMMON
_IMAGE_FIELDS = {"image", "image[]"}


async def _sent(value: UploadFile | str, param: str) -> Sent:
    if isinstance(value, UploadFile):
        return Sent(param, data=await value.read())
    text = value.strip()
    if not text:
        raise bad_request(f"`{param}` is empty.", param=param, code="invalid_image")
    return Sent(param, source=text)


def _request(fields: dict[str, Any]) -> ImageGenerationRequest:
    try:
        return ImageGenerationRequest.model_validate(fields)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        raise bad_request(f"Invalid value for {param!r}: {first.get('msg', 'invalid value')}.", param=param) from None


def _check_fields(form: FormData, allowed: set[str]) -> None:
    for key in form:
        if key not in allowed and key not in _IMAGE_FIELDS | {"mask", "output_format", "strength"}:
            raise bad_request(f"Unknown field {key!r}.", param=key, code="unknown_field")
    if form.get("output_format", "png") != "png":
        raise bad_request("output_format must be `png` (genserve draws PNGs).", param="output_format")


def _text(form: FormData, key: str) -> str:
    value = form.get(key)
    if not isinstance(value, str):
        raise bad_request(f"`{key}` must be a text field.", param=key)
    return value


async def _images(form: FormData) -> tuple[Sent, ...]:
    values = [*form.getlist("image"), *form.getlist("image[]")]
    if not values:
        raise bad_request("`image` is required: the image to start from.", param="image", code="missing_image")
    return tuple([await _sent(v, "image") for v in values])


def _strength(form: FormData) -> float | None:
    raw = form.get("strength")
    if raw is None:
        return None
    try:
        value = float(_text(form, "strength"))
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise bad_request(f"strength must be a number above 0 and at most 1, got {raw!r}.", param="strength")
    return value


async def edit_form(form: FormData) -> tuple[ImageGenerationRequest, SentImages]:
    """`/v1/images/edits`: `image` (one or several), optional `mask`, `prompt` and the usual fields;
    genserve's `strength` (0–1] overrides the one from `--iw` and the mask rule."""
    _check_fields(form, EDIT_FIELDS)
    if "prompt" not in form:
        raise bad_request("`prompt` is required.", param="prompt", code="missing_prompt")
    fields = {k: _text(form, k) for k in EDIT_FIELDS if k in form}
    images = await _images(form)
    mask = await _sent(form["mask"], "mask") if "mask" in form else None
    return _request(fields), SentImages(images=images, mask=mask, strength=_strength(form))


async def variation_form(form: FormData, strength: float) -> tuple[ImageGenerationRequest, SentImages]:
    """`/v1/images/variations`: one `image`, no prompt: img2img at `strength` (the config's
    `image_inputs.variation_strength`) with an empty prompt."""
    if "stream" in form and str(form["stream"]).strip().lower() not in ("false", "0"):
        raise bad_request("/v1/images/variations does not stream (OpenAI's variations don't either); drop `stream`, "
                          "or stream an edit of the image (POST /v1/images/edits).", param="stream",
                          code="unsupported")
    _check_fields(form, VARIATION_FIELDS | {"stream"})
    if "strength" in form:
        raise bad_request("Unknown field 'strength'.", param="strength", code="unknown_field")
    fields = {k: _text(form, k) for k in VARIATION_FIELDS if k in form}  # `stream` (false) is not passed on
    images = await _images(form)
    if len(images) != 1:
        raise bad_request(f"A variation takes one `image`, got {len(images)}.", param="image", code="too_many_images")
    # An empty prompt is not a valid generation request; it is the point of a variation.
    body = _request({**fields, "prompt": "variation"}).model_copy(update={"prompt": ""})
    return body, SentImages(images=images, strength=strength)


__all__ = ["APIError", "edit_form", "variation_form"]
