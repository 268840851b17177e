"""The preprocessing contract and the one implementation of it.

Training eval, export validation and the device runtime all call these functions, so
what the device feeds the model is what the build measured. numpy and Pillow only:
this module runs on the device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from edgetl.runtime.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageSource, ImageTooLarge, load_rgb
from edgetl.runtime.resize import resized_crop

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageDecodeError",
    "ImageSource",
    "ImageTooLarge",
    "Preprocessing",
    "crop_uint8",
    "load_rgb",
    "normalize",
    "preprocess",
    "preprocess_uint8",
]
Interpolation = Literal["nearest", "bilinear", "bicubic"]
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to `resize_size`, center-crop `input_size`, scale to [0, 1], normalize.

    Plain data, stored as JSON in checkpoints, ONNX metadata and bundles.

    >>> Preprocessing(224, 256, "bilinear", (0.5,) * 3, (0.5,) * 3).to_dict()["input_size"]
    224
    """

    input_size: int
    resize_size: int
    interpolation: Interpolation
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layout: Literal["NCHW"] = "NCHW"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        missing = {"input_size", "resize_size", "interpolation", "mean", "std"} - set(data)
        if missing:
            raise ValueError(f"preprocessing contract is missing {sorted(missing)}; got keys {sorted(data)}")
        if data["interpolation"] not in _RESAMPLE:
            raise ValueError(
                f"preprocessing interpolation must be one of {sorted(_RESAMPLE)}; got {data['interpolation']!r}"
            )
        return cls(
            input_size=int(data["input_size"]),
            resize_size=int(data["resize_size"]),
            interpolation=data["interpolation"],
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
            layout=data.get("layout", "NCHW"),
        )


def crop_uint8(image: Image.Image, pre: Preprocessing) -> np.ndarray:
    """Resize the shorter side, center-crop: the model's input as uint8 (H, W, 3)."""
    width, height = image.size
    # torchvision's Resize(int) arithmetic (the long side truncated, not rounded), so a
    # model trained elsewhere with torchvision's eval transform sees the same pixels here.
    short, long = min(width, height), max(width, height)
    new_long = max(pre.input_size, int(pre.resize_size * long / short))
    new_size = (pre.resize_size, new_long) if width <= height else (new_long, pre.resize_size)
    left = int(round((new_size[0] - pre.input_size) / 2.0))
    top = int(round((new_size[1] - pre.input_size) / 2.0))
    return resized_crop(image, new_size, (left, top), pre.input_size, _RESAMPLE[pre.interpolation])


def normalize(batch: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """uint8 (N, H, W, 3) → C-contiguous float32 (N, 3, H, W), scaled to [0, 1] and normalized.

    A uint8 pixel has 256 values, so each channel is a 256-entry lookup table computed with
    the float32 arithmetic `(v / 255 - mean) / std` once: the same bits as computing every
    pixel, 2.5× faster than the element-wise version (measured 0.8 against 2.0 ms at 224 px).
    """
    mean = np.asarray(pre.mean, dtype=np.float32).reshape(3, 1)
    inv_std = (1.0 / np.asarray(pre.std, dtype=np.float32)).reshape(3, 1)
    table = (np.arange(256, dtype=np.float32)[None] * np.float32(1.0 / 255.0) - mean) * inv_std  # (3, 256)
    out = np.empty((batch.shape[0], 3, *batch.shape[1:3]), dtype=np.float32)
    for channel in range(3):
        np.take(table[channel], batch[..., channel], out=out[:, channel])
    return out


def preprocess_uint8(
    source: ImageSource, pre: Preprocessing, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """One input → its uint8 (S, S, 3) crop. The training data cache stores exactly this.

    Raises ImageDecodeError naming the input (ImageTooLarge over `max_pixels`); see `edgetl.runtime.decode`.
    """
    return crop_uint8(load_rgb(source, name, max_pixels), pre)


def preprocess(
    source: ImageSource, pre: Preprocessing, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """One input → the model's float32 (1, 3, S, S) tensor."""
    return normalize(preprocess_uint8(source, pre, name, max_pixels)[None], pre)
