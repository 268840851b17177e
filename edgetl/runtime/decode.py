"""Decode any accepted input to an upright 8-bit RGB image, with bounded memory and time.

The build's data stage and the device runtime both decode through `load_rgb`, so they accept,
refuse and convert the same inputs the same way. What is accepted:

- files and bytes Pillow can read (JPEG, PNG, TIFF, WebP, BMP, GIF: the first frame), PIL images
  and numpy arrays (H, W), (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA;
- 8-bit modes as Pillow converts them to RGB; transparency composited onto white;
- 16-bit images (`I;16*` modes, uint16 arrays) scaled from 0..65535;
- 32-bit integer and float images and arrays by their value range, when it is unambiguous:
  floats in 0..1 are scaled ×255, integer values in 0..255 are 8-bit, in 0..65535 16-bit;
  anything else (negative, larger, fractional above 1, NaN or inf) is refused.

An image larger than `max_pixels` is refused from its header, before any pixel is decoded,
and the conversions run over bands of rows, so the peak memory of one decode is at most
about 7 bytes per pixel (a 4-byte source plus its RGB result). numpy and Pillow only.

The contract's `decode: reduced` passes `min_side` (its resize size): an image at least twice
that is brought down by 2, 4 or 8 (`reduction`), a JPEG while it is decoded, in the DCT domain,
in a quarter of the time (4032×3024: 12 against 48 ms on a 2-core AMD EPYC), anything else after.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, JpegImagePlugin, UnidentifiedImageError

ImageSource = str | Path | bytes | Image.Image | np.ndarray

# 20 MP (5472×3648): the worst decode (a 4-byte mode, or an EXIF-rotated JPEG) then peaks near
# 150 MB, which with a model session's ~90 MB leaves ~50 MB of the 300 MB that
# deploy/systemd/edgetl.service allows (24 MP measured 265 MB with the tiny test model alone).
DEFAULT_MAX_PIXELS = 20_000_000
_BAND_PIXELS = 1 << 20  # rows converted at a time: ~1 MP, a few MB of temporaries
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
# EXIF orientation → the transpose that makes the image upright (the table of ImageOps.exif_transpose).
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EIGHT_BIT_MODES = ("1", "L", "P", "LA", "PA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


class ImageDecodeError(ValueError):
    """An input is not a readable image; the message names it and says why."""


class ImageTooLarge(ImageDecodeError):
    """An image has more pixels than the limit; the message names its size and the limit."""


def load_rgb(
    source: ImageSource,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int | None = None,
) -> Image.Image:
    """Decode one input to an upright 8-bit RGB image (EXIF orientation applied).

    With `min_side` (the contract's `decode: reduced`, at its resize size) an image whose shorter
    side is at least twice `min_side` comes out `reduction(size, min_side)` times smaller: JPEG
    files and bytes decoded at that scale in the DCT domain (Pillow's `draft`), anything else
    decoded in full and averaged over blocks (`Image.reduce`). Raises ImageDecodeError (naming
    the input and the reason) for anything that is not an accepted image, and ImageTooLarge,
    before decoding, for one over `max_pixels` (counted at full size).

    >>> load_rgb(np.zeros((32, 48), np.uint8)).size
    (48, 32)
    >>> load_rgb("camera.jpg", min_side=256).size  # a 4032×3024 JPEG, decoded at 1/8 scale
    (504, 378)
    """
    label = name or (str(source) if isinstance(source, (str, Path)) else type(source).__name__)
    if isinstance(source, np.ndarray):
        rgb = _array_to_rgb(source, label, max_pixels)
        return _reduced(rgb, reduction(rgb.size, min_side))
    image = _open(source, label)
    upright = None
    try:
        _check_size(image.size, label, max_pixels)
        factor = reduction(image.size, min_side)
        # Only a file edgetl opened: drafting a caller's image would change it under them.
        if factor > 1 and image is not source and isinstance(image, JpegImagePlugin.JpegImageFile):
            factor = 1 if image.draft(None, (min_side, min_side)) is not None else factor
        image.load()
        transpose = _EXIF_TRANSPOSE.get(image.getexif().get(ExifTags.Base.Orientation, 1))
        rgb = _to_rgb(image, label)  # before transposing: the transpose copies, and RGB is the smallest copy
        if rgb is not image and image is not source:
            image.close()  # frees the decoded source before the transpose allocates
        rgb = _reduced(rgb, factor)
        upright = rgb.transpose(transpose) if transpose is not None else rgb
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{label} is too large to decode ({exc}); edgetl's limit is {max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"{label} is corrupt or truncated ({exc})") from None
    finally:
        if image is not source and upright is not image:
            image.close()  # a multi-frame file keeps its file open after load()
    return upright


def reduction(size: tuple[int, int], min_side: int | None) -> int:
    """The factor `decode: reduced` shrinks an image of `size` by: the largest of 8, 4 and 2 that
    keeps its shorter side ≥ `min_side` (the scales a JPEG decodes at in the DCT domain, chosen
    by Pillow's `draft` with the same rule), else 1.

    >>> reduction((4032, 3024), 256), reduction((500, 375), 256)
    (8, 1)
    """
    if not min_side:
        return 1
    return next((factor for factor in (8, 4, 2) if min(size) >= factor * min_side), 1)


def _reduced(image: Image.Image, factor: int) -> Image.Image:
    return image.reduce(factor) if factor > 1 else image


def _open(source: ImageSource, label: str) -> Image.Image:
    """The opened image (header read, pixels not decoded yet)."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            reason = "is a broken symbolic link" if path.is_symlink() else "does not exist"
            raise ImageDecodeError(f"{label} {reason}")
        if not path.is_file():  # a folder, a FIFO or a device would be read forever or not at all
            kind = "a folder" if path.is_dir() else "not a regular file"
            raise ImageDecodeError(f"{label} is {kind}; pass an image file")
    elif not isinstance(source, (bytes, bytearray)):
        raise ImageDecodeError(f"{label}: expected a path, bytes, a PIL image or a numpy array")
    try:
        return Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{label} is not an image file Pillow can read") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{label} is too large to decode ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"{label} is corrupt or truncated ({exc})") from None


def _check_size(size: tuple[int, int], label: str, max_pixels: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageDecodeError(f"{label} is empty ({width}×{height} pixels)")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{label} is {width}×{height} = {width * height} pixels, more than the limit of {max_pixels}; "
            f"downscale it, or raise the limit (`--max-pixels`, `data.max_image_pixels`) where memory allows"
        )


def _to_rgb(image: Image.Image, label: str) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        return _banded(image, lambda band: _gray(np.asarray(band), "16bit"))
    if image.mode in ("I", "F"):
        scale = _value_scale(image, label)
        return _banded(image, lambda band: _gray(np.asarray(band), scale))
    if image.mode not in _EIGHT_BIT_MODES:
        raise ImageDecodeError(
            f"{label} has pixel mode {image.mode!r}, which edgetl does not read; save it as 8-bit RGB"
        )
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        return _banded(image, _on_white)
    return _banded(image, lambda band: band.convert("RGB"))


def _banded(image: Image.Image, convert: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """`convert` (a per-pixel conversion to RGB) applied over bands of rows: the same pixels as
    one call on the whole image, without a second full-size temporary."""
    width, height = image.size
    rows = max(1, _BAND_PIXELS // width)
    if rows >= height:
        return convert(image)
    out = Image.new("RGB", image.size)
    for top in range(0, height, rows):
        out.paste(convert(image.crop((0, top, width, min(height, top + rows)))), (0, top))
    return out


def _on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def _value_scale(image: Image.Image, label: str) -> str:
    """How a 32-bit integer or float image's values map to 8 bits: 'unit', '8bit' or '16bit'."""
    lo, hi, integral = np.inf, -np.inf, True
    width, height = image.size
    rows = max(1, _BAND_PIXELS // width)
    for top in range(0, height, rows):
        band = np.asarray(image.crop((0, top, width, min(height, top + rows))))
        if image.mode == "F":
            if not np.isfinite(band).all():
                raise ImageDecodeError(f"{label} holds NaN or infinite values; edgetl reads finite pixel values only")
            integral = integral and bool(np.all(band == np.rint(band)))
        lo, hi = min(lo, float(band.min())), max(hi, float(band.max()))
    return _scale_for(lo, hi, integral, image.mode == "F", f"mode {image.mode}", label)


def _scale_for(lo: float, hi: float, integral: bool, is_float: bool, what: str, label: str) -> str:
    if is_float and lo >= 0 and hi <= 1:
        return "unit"
    if lo >= 0 and integral and hi <= 255:
        return "8bit"
    if lo >= 0 and integral and hi <= 65535:
        return "16bit"
    raise ImageDecodeError(
        f"{label} has {what} values from {lo:g} to {hi:g}, which is not an unambiguous pixel range; edgetl reads "
        "floats in 0..1 and whole numbers in 0..255 (8-bit) or 0..65535 (16-bit): rescale it to one of those"
    )


def _gray(values: np.ndarray, scale: str) -> Image.Image:
    """(H, W) or (H, W, C) values → 8-bit, by `scale`; grayscale becomes RGB."""
    if scale == "unit":
        pixels = np.rint(values.astype(np.float32) * 255.0).astype(np.uint8)
    elif scale == "16bit":  # round(v / 257) exactly: 65535 = 257 × 255 and v / 257 never ends in .5
        pixels = ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)
    else:
        pixels = values.astype(np.uint8)
    image = Image.fromarray(pixels)
    return image.convert("RGB") if image.mode == "L" else image


def _array_to_rgb(array: np.ndarray, label: str, max_pixels: int) -> Image.Image:
    shape_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))
    if not shape_ok:
        raise ImageDecodeError(
            f"{label}: arrays must be (H, W), (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA; got shape {array.shape}"
        )
    if array.dtype.kind not in "buif":
        raise ImageDecodeError(
            f"{label}: arrays must hold numbers (uint8, uint16, other integers or floats); got {array.dtype}"
        )
    _check_size((array.shape[1], array.shape[0]), label, max_pixels)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        array = _array_to_uint8(array, label)
    return _to_rgb(Image.fromarray(np.ascontiguousarray(array)), label)


def _array_to_uint8(array: np.ndarray, label: str) -> np.ndarray:
    is_float = array.dtype.kind == "f"
    if array.dtype == np.uint16:
        scale = "16bit"
    else:
        if is_float and not np.isfinite(array).all():
            raise ImageDecodeError(f"{label} holds NaN or infinite values; edgetl reads finite pixel values only")
        integral = not is_float or bool(np.all(array == np.rint(array)))
        scale = _scale_for(float(array.min()), float(array.max()), integral, is_float, f"{array.dtype} array", label)
    return np.asarray(_gray(array, scale))
