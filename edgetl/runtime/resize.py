"""Resize-then-center-crop for less than Pillow's full resize, within one 8-bit level of it.

The contract resizes the whole image and keeps the center crop, so a 500×375 photo is
resized to 341×256 and a third of that work is thrown away. Pillow resizes in two 8-bit
passes; here the first runs over the full extent of its axis exactly as Pillow's full resize
does (the same coefficients, so the same pixels) but only over the source lines the crop
needs, and the second only over the crop, through a fractional box whose float32 coordinates
move a pixel by at most one level. Measured on a 2-core AMD EPYC (AVX2, benchmarks/runtime.py),
500×375 → 224 px bicubic: 1.25 ms against 1.50 for Pillow's full resize then crop; with the
crop's halves on two threads 0.8 ms on idle cores, but 4.0 against 1.75 where other work held
them, so only a lone prediction splits (`threads`).

Dropped: Pillow's one-call `resize(box=crop)` (0.86 ms) puts float32 coordinates into both
passes, and moved a real photo of the parity test by 2 levels.

Pillow 13 picks the order of its passes from the sizes (`vertical_first`); the two orders
round differently (up to 20 levels on noise, 9 on photos), so the passes run here in the
order the full resize would run them. numpy and Pillow only: this runs on the device.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

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
_SPLIT_FROM_SIZE = 128  # smaller crops resample in ~0.1 ms, what handing half to a thread costs


def resized_crop(
    image: Image.Image,
    new_size: tuple[int, int],
    corner: tuple[int, int],
    size: int,
    resample: Image.Resampling,
    threads: int = 1,
) -> np.ndarray:
    """`image.resize(new_size, resample).crop((x, y, x + size, y + size))` as uint8 (size, size, 3),
    for `corner` = (x, y), within one 8-bit level. `threads` 2 resamples the two halves of a
    large crop at once (for a lone prediction on idle cores; a caller whose other cores are busy
    passes 1). NEAREST and a resize to the same size take that path as it is."""
    left, top = corner
    if resample not in _SUPPORT or new_size == image.size:
        return np.asarray(image.resize(new_size, resample).crop((left, top, left + size, top + size)), dtype=np.uint8)
    vertical = vertical_first(image.size, new_size)
    if threads < 2 or size < _SPLIT_FROM_SIZE:
        return _block(image, new_size, corner, size, (0, size), vertical, resample)
    other_half = _pool().submit(_block, image, new_size, corner, size, (size // 2, size), vertical, resample)
    half = _block(image, new_size, corner, size, (0, size // 2), vertical, resample)
    return np.concatenate([half, other_half.result()], axis=1 if vertical else 0)


def _block(
    image: Image.Image,
    new_size: tuple[int, int],
    corner: tuple[int, int],
    size: int,
    span: tuple[int, int],
    vertical: bool,
    resample: Image.Resampling,
) -> np.ndarray:
    """Rows `span` of the crop (`vertical` False: the horizontal pass runs first), or its columns.

    The first pass covers the full extent of its axis over the source lines the block needs, the
    second only the block, through a fractional box."""
    (left, top), (start, stop) = corner, span
    (width, height), (new_width, new_height) = image.size, new_size
    if vertical:
        first, last = _source_span(left + start, left + stop, new_width, width, resample)
        lines = _first_pass(image, (first, 0, last, height), (last - first, new_height), resample)
        lines = lines.crop((0, top, last - first, top + size))
        scale = width / new_width
        box, out = ((left + start) * scale - first, 0, (left + stop) * scale - first, size), (stop - start, size)
    else:
        first, last = _source_span(top + start, top + stop, new_height, height, resample)
        if new_width <= _FULL_PASS_MAX:
            lines = _first_pass(image, (0, first, width, last), (new_width, last - first), resample)
            lines = lines.crop((left, 0, left + size, last - first))
        else:  # the crop's columns only, through a fractional box: within two 8-bit levels
            columns = (left * width / new_width, first, (left + size) * width / new_width, last)
            lines = image.resize((size, last - first), resample, box=columns, reducing_gap=None)
        scale = height / new_height
        box, out = (0, (top + start) * scale - first, size, (top + stop) * scale - first), (size, stop - start)
    return np.asarray(lines.resize(out, resample, box=box, reducing_gap=None), dtype=np.uint8)


def _first_pass(
    image: Image.Image,
    lines: tuple[int, int, int, int],
    out: tuple[int, int],
    resample: Image.Resampling,
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


def vertical_first(size: tuple[int, int], new_size: tuple[int, int]) -> bool:
    """Whether Pillow's resize from `size` to `new_size` runs its vertical pass first.

    Pillow 13 does when the height loses more than twice as many rows as the width loses
    columns (python-pillow/Pillow#9549); earlier versions always run the horizontal pass
    first. Decided from the sizes alone, so it costs nothing whatever the image's shape;
    tests/test_hostile_images.py checks it against Pillow's own resize.
    """
    (width, height), (new_width, new_height) = size, new_size
    return _PILLOW_MAJOR >= 13 and new_height < height and height - new_height > 2 * (width - new_width)


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    """The thread that resamples the second half of a split crop (the caller does the first)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgetl-resize")


if hasattr(os, "register_at_fork"):  # POSIX: a forked child inherits the pool's queue but not its thread
    os.register_at_fork(after_in_child=_pool.cache_clear)
