"""Aspect-ratio buckets, pure arithmetic (no files, no models): the sizes an
image may train at instead of one square, and which of them an image takes.
`prepare --crop bucket` and `train --buckets` share them, as kohya's
sd-scripts' BucketManager and diffusers' --aspect_ratio_buckets do.

The buckets of a resolution R: every (width, height) whose sides are
multiples of ``bucket_step(R)`` (64 from R = 512 up), whose area is at most
R x R with the long side as large as that allows for each short side, and
whose aspect lies between 1:4 and 4:1, both ways round; plus the square R x R itself (R need not
be a multiple of the step). An image takes the bucket nearest its aspect on
a log scale (a 2:1 and a 1:2 photo are equally far from the square); it is
scaled to cover the bucket and the excess cut evenly from both sides, the
least crop that gives the bucket's shape.
"""

from __future__ import annotations

import math

Size = tuple[int, int]  # width, height in pixels
MAX_RATIO = 4.0  # the longest side at most 4 x the shortest (sd-scripts' 256..1024 at 512)


def bucket_step(resolution: int) -> int:
    """The multiple every bucket side is rounded to: 64 (SD's UNet halves the
    latents three times, 8 x 8 = 64 px) from 512 px up; below, an eighth of
    the resolution in multiples of 8, at least 8 (the built-in tiny models
    train at 32-64 px, where 64 would leave the square alone)."""
    if resolution >= 512:
        return 64
    return max(8, resolution // 64 * 8)


def bucket_sizes(resolution: int, max_ratio: float = MAX_RATIO) -> list[Size]:
    """Every bucket of ``resolution``, widest last: see the module's docstring."""
    step, area = bucket_step(resolution), resolution * resolution
    sizes = {(resolution, resolution)}
    for short in range(step, resolution + 1, step):  # the short side; the long as large as fits
        long = area // short // step * step
        if short <= long <= max_ratio * short:
            sizes |= {(short, long), (long, short)}
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def nearest_bucket(width: int, height: int, buckets: list[Size]) -> Size:
    """The bucket whose aspect is nearest ``width``:``height`` on a log scale;
    of equally near ones the largest (the square at --resolution before a
    rounded square beside it)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def bucket_box(width: int, height: int, bucket: Size) -> tuple[int, int, int, int]:
    """The centred part of a ``width`` x ``height`` image with the bucket's
    aspect: (left, top, right, bottom), the least crop (one axis whole)."""
    aspect = bucket[0] / bucket[1]
    w = min(width, round(height * aspect))
    h = min(height, round(width / aspect))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h
