"""Size buckets: the few shapes a compiled replica runs (`optimize.buckets` of a model's config).

A compiled UNet is specialised to one latent height/width; every new size would compile again for
minutes inside a user's request. With buckets, a request's size snaps to the nearest bucket (in
log width / log height, so aspect ratio and area count alike), the image is generated at the
bucket and resized to the size asked for, and `warmup.warm_up` runs each bucket at replica start so the
compile (or the load from the compile cache) happens before the replica takes traffic.
"""

from __future__ import annotations

import math

Bucket = tuple[int, int]  # (width, height)

# SDXL's training aspect-ratio buckets around one megapixel (the sizes it draws best).
SDXL_BUCKETS = ("1024x1024", "1152x896", "896x1152", "1216x832", "832x1216", "1344x768", "768x1344",
                "1536x640", "640x1536")


def parse(spec: str) -> Bucket:
    """`"1216x832"` -> (1216, 832); ValueError naming the entry otherwise."""
    try:
        w, h = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        raise ValueError(f"bucket {spec!r} must be WIDTHxHEIGHT, e.g. '1024x1024'") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"bucket {spec!r} must have positive sides")
    return w, h


def snap(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket nearest (width, height) in log space; (width, height) itself without buckets.
    Ties go to the smaller bucket (cheaper), then to the first listed."""
    if not buckets:
        return width, height

    def distance(b: Bucket) -> tuple[float, int]:
        d = math.hypot(math.log(b[0] / width), math.log(b[1] / height))
        return round(d, 9), b[0] * b[1]

    return min(buckets, key=distance)
