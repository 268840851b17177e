"""Resize-then-center-crop for less than Pillow's full resize, within one 8-bit level of it.

The contract resizes the whole image and keeps the center crop, so a 500×375 photo is
resized to 341×256 and a third of that work is thrown away. Pillow resizes in two 8-bit
passes; here the first runs over the full extent of its axis exactly as Pillow's full resize
does (the same coefficients, so the same pixels) but only over the source lines the crop
needs, and the second only over the crop, through a fractional box whose float32 coordinates
move a pixel by at most one level. Measured on a 2-core AMD EPYC (AVX2, benchmarks/runtime.py):
1.24 ms against 1.51 for Pillow's full resize then crop at 500×375 → 224 px bicubic.

What was measured and dropped: Pillow's one-call `resize(box=crop)` (0.89 ms) puts float32
coordinates into both passes and moved a real photo of the parity test by 2 levels; splitting
the crop's rows over two threads cost more than it saved (the model's threads hold both cores).

Pillow 13 picks the order of its passes from the sizes (`_vertical_first`); the two orders
round differently (up to 20 levels on noise, 9 on photos), so the passes run here in the
order the full resize would run them. numpy and Pillow only: this runs on the device.
"""

from __future__ import annotations

import math

import numpy as np
import PIL
from PIL import Image

_SUPPORT = {Image.Resampling.BILINEAR: 1.0, Image.Resampling.BICUBIC: 2.0}  # Pillow's filter radii
_PILLOW_MAJOR = int(PIL.__version__.split(".")[0])
# Lines up to this many pixels are copied out before the first pass; larger spans are handed to
# Pillow as a box, which adds an exact identity pass over them (measured: the copy is 0.5 ms
# cheaper at 500×375, the identity pass 20 ms cheaper at 4032×3024).
_COPY_PIXELS = 1 << 20
# A photo's first pass is never this wide (an 8K frame's long side is 7,680 columns). Wider ones
# come from extreme aspect ratios (a 65,000×1 strip resized to 96 px is 7 M columns), where
# Pillow's coefficient tables alone take hundreds of MB: those run over the crop's columns. A
# vertical first pass never gets there: it runs only when the height shrinks, over at most the
# image's rows.
_FULL_PASS_MAX = 8192


def resized_crop(image: Image.Image, new_size: tuple[int, int], corner: tuple[int, int], size: int, resample: Image.Resampling) -> np.ndarray:
    """`image.resize(new_size, resample).crop((x, y, x + size, y + size))` as uint8 (size, size, 3),
    for `corner` = (x, y), within one 8-bit level. NEAREST and a resize to the same size take
    that path as it is (there are no passes to save)."""
    left, top = corner
    if resample not in _SUPPORT or new_size == image.size:
        return np.asarray(image.resize(new_size, resample).crop((left, top, left + size, top + size)), dtype=np.uint8)
    (width, height), (new_width, new_height) = image.size, new_size
    if _vertical_first(image.size, new_size):  # the crop's columns, all rows of the output; then the columns
        first, last = _source_span(left, left + size, new_width, width, resample)
        lines = _first_pass(image, (first, 0, last, height), (last - first, new_height), resample)
        lines = lines.crop((0, top, last - first, top + size))
        scale = width / new_width
        box = (left * scale - first, 0, (left + size) * scale - first, size)
    else:  # the crop's rows, all columns of the output; then the rows
        first, last = _source_span(top, top + size, new_height, height, resample)
        if new_width <= _FULL_PASS_MAX:
            lines = _first_pass(image, (0, first, width, last), (new_width, last - first), resample)
            lines = lines.crop((left, 0, left + size, last - first))
        else:  # the crop's columns only, through a fractional box: within two 8-bit levels
            box = (left * width / new_width, first, (left + size) * width / new_width, last)
            lines = image.resize((size, last - first), resample, box=box, reducing_gap=None)
        scale = height / new_height
        box = (0, top * scale - first, size, (top + size) * scale - first)
    return np.asarray(lines.resize((size, size), resample, box=box, reducing_gap=None), dtype=np.uint8)


def _first_pass(
    image: Image.Image, lines: tuple[int, int, int, int], out: tuple[int, int], resample: Image.Resampling,
) -> Image.Image:
    """The `lines` box (whole rows or whole columns) resized along its other axis to `out`: the
    pixels of those lines of the full resize's first pass."""
    (left, top, right, bottom) = lines
    if (right - left) * (bottom - top) <= _COPY_PIXELS:
        return image.crop(lines).resize(out, resample, reducing_gap=None)
    return image.resize(out, resample, box=lines, reducing_gap=None)


def _source_span(start: int, stop: int, new_length: int, length: int, resample: Image.Resampling) -> tuple[int, int]:
    """The source lines that output lines [start, stop) of a resize to `new_length` read, with a
    line to spare on each side (at the image's edges Pillow renormalizes; in between it must not)."""
    scale = length / new_length
    reach = _SUPPORT[resample] * max(scale, 1.0) + 1
    return max(0, math.floor(start * scale - reach)), min(length, math.ceil(stop * scale + reach))


def _vertical_first(size: tuple[int, int], new_size: tuple[int, int]) -> bool:
    """Whether Pillow's resize from `size` to `new_size` runs its vertical pass first.

    Pillow 13 does when the height loses more than twice as many rows as the width loses
    columns (python-pillow/Pillow#9549); earlier versions always run the horizontal pass
    first. Decided from the sizes alone, so it costs nothing whatever the image's shape;
    tests/test_hostile_images.py checks it against Pillow's own resize.
    """
    (width, height), (new_width, new_height) = size, new_size
    return _PILLOW_MAJOR >= 13 and new_height < height and height - new_height > 2 * (width - new_width)
