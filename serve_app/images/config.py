"""Typed settings of images given as input (image prompts, references, edits, uploads): the
`image_inputs:` block of the app args. Defaults suit a public service; the allow-list opens the
URL guard (serve_app/netguard) for internal hosts, as `jobs.webhooks` does for webhooks."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ImageInputsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_images: int = Field(4, ge=1, le=16, description="Input images per request: image prompt, mask, "
                            "--sref/--cref/--oref images and edit images together.")
    max_bytes: int = Field(8 << 20, ge=1024, le=64 << 20, description="Largest encoded image (an upload, a fetched "
                           "URL's body, a data URL after base64): larger is 413 before anything is decoded.")
    max_pixels: int = Field(4096 * 4096, ge=64 * 64, le=8192 * 8192, description="Largest decoded image "
                            "(width x height); more is refused before decoding (decompression bombs).")
    fetch_timeout_s: float = Field(10.0, gt=0.0, le=120.0, description="Per URL: resolve, connect and read.")
    allow_private: bool = Field(False, description="Let image URLs reach loopback/private/link-local addresses "
                                "(internal setups only).")
    allow_hosts: list[str] = Field(default_factory=list, description="Host names, IPs or CIDRs image URLs may "
                                   "reach although not public, e.g. an internal CDN at 10.1.0.0/16.")
    variation_strength: float = Field(0.6, gt=0.0, le=1.0, description="img2img strength of "
                                      "/v1/images/variations (lower: closer to the image).")
    max_files_per_tenant: int = Field(1000, ge=1, description="Uploads a tenant may keep (POST /v1/files).")


__all__ = ["ImageInputsConfig"]
