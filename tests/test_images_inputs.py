"""Input images (serve_app/images/inputs.py, conditioning.py): real HTTP from a server on 127.0.0.1
through the URL guard, and every refusal (private address, too large, not an image, decompression
bomb, too many, timeout, redirect, deleted upload, changed URL)."""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from serve_app.files import TenantFiles
from serve_app.images.conditioning import Conditioning, Sent, SentImages
from serve_app.images.config import ImageInputsConfig
from serve_app.images.inputs import ImageInputs, InputRefused, decode_image, sniff
from serve_app.images.spec import ImageSpec
from serve_app.prompts.params import PromptParams, parse_prompt
from serve_app.storage import LocalResultStore
from tests.image_server import ImageServer, Route, gradient_png, png_bytes

OPEN = ImageInputsConfig(allow_hosts=["127.0.0.1"], max_bytes=256 * 1024, max_pixels=512 * 512, fetch_timeout_s=1.0)


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    s = ImageServer()
    s.add("/cat.png", Route(gradient_png((48, 40))))
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(gradient_png((40, 32)))).save(jpeg, "JPEG")
    s.add("/cat.jpg", Route(jpeg.getvalue(), content_type="image/jpeg"))
    webp = io.BytesIO()
    Image.new("RGBA", (16, 16), (1, 2, 3, 4)).save(webp, "WEBP")
    s.add("/cat.webp", Route(webp.getvalue(), content_type="image/webp"))
    s.add("/lies.png", Route(b"<html>not an image</html>", content_type="image/png"))
    s.add("/big.png", Route(b"\x89PNG\r\n\x1a\n" + b"\0" * (300 * 1024)))
    s.add("/big-chunked.png", Route(b"\x89PNG\r\n\x1a\n" + b"\0" * (300 * 1024), chunked=True))
    bomb = io.BytesIO()
    Image.new("1", (8000, 8000)).save(bomb, "PNG")  # 64 megapixels in a few kB
    s.add("/bomb.png", Route(bomb.getvalue()))
    s.add("/truncated.png", Route(gradient_png((64, 64))[:-200]))
    s.add("/slow.png", Route(gradient_png(), delay_s=3.0))
    s.add("/moved.png", Route(status=302, headers={"Location": s.url("/cat.png")}))
    s.add("/gone.png", Route(status=410))
    yield s
    s.close()


def _png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.size


async def test_fetches_checks_and_reencodes(server: ImageServer) -> None:
    inputs = ImageInputs(OPEN)
    img = await inputs.load(server.url("/cat.png"), param="prompt", tenant_id=None)
    assert img.sha256 == hashlib.sha256(img.png).hexdigest()
    with Image.open(io.BytesIO(img.png)) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (48, 40))
    again = await inputs.load(server.url("/cat.png"), param="prompt", tenant_id=None)
    assert again.png == img.png  # deterministic: the sha256 is a stable key
    jpg = await inputs.load(server.url("/cat.jpg"), param="--sref", tenant_id=None)
    webp = await inputs.load(server.url("/cat.webp"), param="--sref", tenant_id=None)
    assert _png_size(jpg.png) == (40, 32) and _png_size(webp.png) == (16, 16)
    mask = await inputs.load(server.url("/cat.png"), param="mask", tenant_id=None, mask=True)
    with Image.open(io.BytesIO(mask.png)) as im:
        assert im.mode == "L"


async def test_data_urls_and_bytes() -> None:
    inputs = ImageInputs(OPEN)
    data = gradient_png((24, 24))
    img = await inputs.load("data:image/png;base64," + base64.b64encode(data).decode(), param="image", tenant_id=None)
    assert img == await inputs.from_bytes(data, param="image")
    with pytest.raises(InputRefused) as e:
        await inputs.load("data:image/png;base64,@@@", param="image", tenant_id=None)
    assert (e.value.status, e.value.param) == (400, "image")
    with pytest.raises(InputRefused) as e:
        await inputs.load("data:text/plain;base64,aGk=", param="image", tenant_id=None)
    assert e.value.status == 400
    huge = "data:image/png;base64," + "A" * (OPEN.max_bytes * 2)
    with pytest.raises(InputRefused) as e:
        await inputs.load(huge, param="image", tenant_id=None)
    assert (e.value.status, e.value.code) == (413, "image_too_large")


@pytest.mark.parametrize("path, status, code", [
    ("/lies.png", 422, "invalid_image"),
    ("/big.png", 413, "image_too_large"),
    ("/big-chunked.png", 413, "image_too_large"),
    ("/bomb.png", 413, "image_too_large"),  # a few kB on the wire, 64 megapixels decoded
    ("/truncated.png", 422, "invalid_image"),
    ("/slow.png", 422, "image_fetch_timeout"),
    ("/moved.png", 422, "image_fetch_failed"),
    ("/gone.png", 422, "image_fetch_failed"),
    ("/missing.png", 422, "image_fetch_failed"),
])
async def test_refusals_name_the_parameter(server: ImageServer, path: str, status: int, code: str) -> None:
    with pytest.raises(InputRefused) as e:
        await ImageInputs(OPEN).load(server.url(path), param="--sref", tenant_id=None)
    err = e.value.api_error()
    assert (err.status, err.param, err.code) == (status, "--sref", code), err.message
    assert "--sref" in err.message
    if path == "/bomb.png":
        assert "pixels" in err.message  # refused by the pixel limit, not the byte cap


async def test_redirect_is_not_followed(server: ImageServer) -> None:
    before = len(server.hits)
    with pytest.raises(InputRefused, match="redirects are not followed"):
        await ImageInputs(OPEN).load(server.url("/moved.png"), param="prompt", tenant_id=None)
    assert server.hits[before:] == ["/moved.png"]


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:{port}/cat.png", "http://localhost:{port}/cat.png", "http://[::ffff:127.0.0.1]:{port}/cat.png",
    "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x.png", "http://[::1]/x.png",
    "ftp://example.com/x.png",
])
async def test_private_addresses_are_refused_by_default(server: ImageServer, url: str) -> None:
    before = len(server.hits)
    with pytest.raises(InputRefused) as e:
        await ImageInputs(ImageInputsConfig()).load(url.format(port=server.port), param="prompt", tenant_id=None)
    assert (e.value.status, e.value.param, e.value.code) == (400, "prompt", "invalid_image_url")
    assert len(server.hits) == before  # refused before any connection


def test_decoder_limits_without_network() -> None:
    assert sniff(b"GIF89a....") is None
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, "GIF")
    with pytest.raises(InputRefused) as e:
        decode_image(gif.getvalue(), OPEN, param="image")
    assert e.value.status == 422
    with pytest.raises(InputRefused) as e:
        decode_image(png_bytes((600, 600)), OPEN, param="image")  # 360,000 pixels > 512² = 262,144
    assert e.value.status == 413
    rgba = decode_image(png_bytes((8, 8), (1, 2, 3, 0), mode="RGBA"), OPEN, param="image")
    with Image.open(io.BytesIO(rgba.png)) as im:
        assert im.mode == "RGB"


def _spec(prompt: str) -> ImageSpec:
    parsed = parse_prompt(prompt)
    return ImageSpec(model="sdxl-tiny", prompt=parsed.text, params=parsed.params, width=64, height=64, steps=2,
                     negative_prompt="", tile=False, seeds=(1,), guidance_scales=(5.0,))


async def test_attach_maps_flags_and_runner_reloads(server: ImageServer) -> None:
    cond = Conditioning(ImageInputs(OPEN))
    cat, jpg = server.url("/cat.png"), server.url("/cat.jpg")
    spec, images = await cond.attach(_spec(f"{cat} a cat --iw 1.5 --sref {jpg} --sw 1000 --oref {cat} --ow 100"),
                                     tenant_id=None)
    assert spec.init_image is not None and spec.init_image.source == cat and spec.strength == 0.5
    assert [(r.kind, r.scale, r.image.source) for r in spec.references] == [("style", 1.2, jpg), ("character", 0.6, cat)]
    assert set(images) == {spec.init_image.sha256, spec.references[0].image.sha256}
    tasks = spec.tasks(images=images)
    assert tasks[0].init_image is not None and tasks[0].init_image.sha256 == spec.init_image.sha256
    assert tasks[0].strength == 0.5 and tasks[0].references[0].scale == 1.2
    # The stored form carries references only, and a job's runner loads the same images again.
    stored = ImageSpec.from_stored(spec.model_dump(mode="json"))
    assert b"base64" not in spec.model_dump_json().encode() and len(spec.model_dump_json()) < 4000
    assert await cond.load(stored, tenant_id=None) == images
    with pytest.raises(ValueError, match="not loaded"):
        stored.tasks()


async def test_changed_url_fails_the_reload(server: ImageServer) -> None:
    cond = Conditioning(ImageInputs(OPEN))
    url = server.add("/changing.png", Route(gradient_png((32, 32))))
    spec, _ = await cond.attach(_spec(f"{url} a cat"), tenant_id=None)
    server.add("/changing.png", Route(png_bytes((32, 32))))
    with pytest.raises(InputRefused) as e:
        await cond.load(spec, tenant_id=None)
    assert (e.value.code, e.value.param) == ("input_image_changed", "prompt")


async def test_too_many_images_and_prompts(server: ImageServer) -> None:
    cfg = OPEN.model_copy(update={"max_images": 2})
    cond = Conditioning(ImageInputs(cfg))
    cat = server.url("/cat.png")
    with pytest.raises(InputRefused) as e:
        await cond.attach(_spec(f"{cat} x --sref {cat} {cat}"), tenant_id=None)
    assert (e.value.status, e.value.code) == (400, "too_many_input_images")
    with pytest.raises(InputRefused) as e:
        await cond.attach(_spec(f"{cat} {cat} x"), tenant_id=None)
    assert (e.value.status, e.value.param) == (422, "prompt")
    sent = SentImages(images=(Sent("image", data=gradient_png()),) * 2, mask=Sent("mask", data=png_bytes()))
    with pytest.raises(InputRefused) as e:
        await cond.attach(_spec("x"), tenant_id=None, sent=sent)
    assert (e.value.status, e.value.param) == (400, "image")


async def test_edit_masks(server: ImageServer) -> None:
    cond = Conditioning(ImageInputs(OPEN))
    # No mask: the image's transparent pixels are the mask (OpenAI's rule), strength 1 (inpainting).
    im = Image.new("RGBA", (32, 32), (10, 20, 30, 255))
    im.paste((0, 0, 0, 0), (0, 0, 16, 32))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    spec, images = await cond.attach(_spec("x"), tenant_id=None, sent=SentImages(images=(Sent("image", data=buf.getvalue()),)))
    assert spec.mask is not None and spec.strength == 1.0
    with Image.open(io.BytesIO(images[spec.mask.sha256].png)) as m:
        assert m.getpixel((0, 0)) == 255 and m.getpixel((31, 0)) == 0
    # Opaque image, no mask: img2img at the default --iw 1.
    spec, _ = await cond.attach(_spec("x"), tenant_id=None, sent=SentImages(images=(Sent("image", data=gradient_png()),)))
    assert spec.mask is None and spec.strength == pytest.approx(0.6667)
    with pytest.raises(InputRefused) as e:
        await cond.attach(_spec("x"), tenant_id=None, sent=SentImages(
            images=(Sent("image", data=gradient_png((64, 64))),), mask=Sent("mask", data=png_bytes((32, 32)))))
    assert (e.value.status, e.value.param, e.value.code) == (400, "mask", "mask_size_mismatch")


async def test_uploads_are_per_tenant_and_deleted_uploads_fail_jobs(tmp_path: Path) -> None:
    store = LocalResultStore(tmp_path, signing_key=b"k" * 32)
    files = TenantFiles(store, OPEN)
    obj = await files.upload(1, gradient_png((20, 10)), filename="cat.png", purpose="vision")
    assert obj.id.startswith("file-") and (obj.width, obj.height) == (20, 10) and obj.filename == "cat.png"
    assert await files.get(2, obj.id) is None and await files.read(2, obj.id) is None  # another tenant
    assert [f.id for f in await files.list_files(1)] == [obj.id] and await files.list_files(2) == []
    cond = Conditioning(ImageInputs(OPEN, uploads=files))
    spec, images = await cond.attach(_spec(f"{obj.id} a cat"), tenant_id=1)
    assert spec.init_image is not None and spec.init_image.sha256 == obj.sha256
    with pytest.raises(InputRefused) as e:
        await cond.attach(_spec(f"{obj.id} a cat"), tenant_id=2)
    assert (e.value.status, e.value.code) == (404, "file_not_found")
    assert await files.delete(1, obj.id) and not await files.delete(1, obj.id)
    with pytest.raises(InputRefused) as e:
        await cond.load(spec, tenant_id=1)
    assert (e.value.status, e.value.code, e.value.param) == (404, "file_not_found", "prompt")
    with pytest.raises(InputRefused) as e:
        await files.upload(1, b"not an image", filename="x", purpose="vision")
    assert (e.value.status, e.value.param) == (422, "file")


def test_prompt_params_defaults() -> None:
    assert PromptParams().image_sources == ()
