"""`Predictor`: a checked bundle, its preprocessing contract and an engine, behind two calls.

The preprocessing is the bundle's contract applied by `edgetl.runtime.preprocess`, the
same function the build's data stage and validation used, so the device sees the inputs
the build measured. numpy, Pillow and the runtime only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import PIL

from edgetl.errors import BundleError
from edgetl.runtime.bundle import Bundle, open_bundle
from edgetl.runtime.engines import RUNTIMES, Engine, RuntimeMissing, is_installed, open_engine
from edgetl.runtime.preprocess import DEFAULT_MAX_PIXELS, ImageSource, normalize, preprocess_uint8


@dataclass(frozen=True)
class Prediction:
    """Top-k labels with their softmax scores, best first."""

    labels: list[str]
    scores: list[float]

    @property
    def label(self) -> str:
        return self.labels[0]

    def to_dict(self) -> dict:
        return {"label": self.label, "top_k": [{"label": l, "score": round(s, 6)} for l, s in zip(self.labels, self.scores)]}


class Predictor:
    """Classify images with a deploy bundle.

    >>> predictor = Predictor.load("runs/quickstart/quickstart.tar.gz")
    >>> predictor.predict("digit.png", top_k=3).label
    '7'
    """

    def __init__(self, bundle: Bundle, engine: Engine, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.bundle = bundle
        self.engine = engine
        self.max_pixels = max_pixels

    @classmethod
    def load(cls, bundle: str | Path, runtime: str = "auto", threads: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Predictor:
        """Open and verify a bundle (folder or .tar.gz) and load its model on `runtime`.

        `auto` is the runtime the build selected. OpenVINO also runs a bundle's ONNX model;
        ONNX Runtime cannot run an OpenVINO IR. Images over `max_pixels` are refused from
        their header (ImageTooLarge), before decoding.
        """
        opened = open_bundle(Path(bundle))
        _warn_if_pillow_differs(opened.manifest, bundle)
        chosen = opened.manifest["runtime"] if runtime == "auto" else runtime
        if chosen not in RUNTIMES:
            raise BundleError(f"runtime {runtime!r} is not one of auto, {', '.join(RUNTIMES)}.")
        if chosen == "onnxruntime" and opened.model.suffix != ".onnx":
            raise BundleError(f"{opened.model} is an OpenVINO IR; ONNX Runtime cannot run it. Use --runtime openvino (`pip install 'edgetl[openvino]'`).")
        if not is_installed(chosen):
            extra = "'edgetl[openvino]'" if chosen == "openvino" else "onnxruntime"
            raise BundleError(f"this bundle runs on {chosen}, which is not installed; install it with `pip install {extra}`.")
        try:
            engine = open_engine(opened.model, chosen, threads)
        except RuntimeMissing as exc:
            raise BundleError(str(exc)) from None
        return cls(opened, engine, max_pixels)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.bundle.labels

    def predict(self, image: ImageSource, top_k: int = 5) -> Prediction:
        """One image (path, bytes, PIL image or uint8 array) → its top-k labels."""
        return self.predict_batch([image], top_k)[0]

    def predict_batch(self, images: Sequence[ImageSource], top_k: int = 5) -> list[Prediction]:
        """Several images in one model call. A bad image raises ImageDecodeError naming it."""
        return self.classify(np.stack([self.crop(image) for image in images]), top_k)

    def crop(self, image: ImageSource, name: str | None = None) -> np.ndarray:
        """Decode and crop one image as the contract says: uint8 (S, S, 3)."""
        return preprocess_uint8(image, self.bundle.preprocessing, name, self.max_pixels)

    def classify(self, crops: np.ndarray, top_k: int = 5) -> list[Prediction]:
        """uint8 (N, S, S, 3) crops → N predictions with softmax scores."""
        return self.predictions(self.engine.run(normalize(crops, self.bundle.preprocessing)), top_k)

    def predictions(self, logits: np.ndarray, top_k: int = 5) -> list[Prediction]:
        """(N, classes) logits → N top-k predictions with softmax scores."""
        shifted = logits - logits.max(axis=1, keepdims=True)
        probabilities = np.exp(shifted)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        k = max(1, min(top_k, probabilities.shape[1]))
        order = np.argsort(-probabilities, axis=1)[:, :k]
        return [Prediction([self.labels[i] for i in row], [float(p[i]) for i in row]) for p, row in zip(probabilities, order)]


def _warn_if_pillow_differs(manifest: dict, bundle: str | Path) -> None:
    """Pillow's resize rounding is part of the pixels the build validated, and it changes
    between major versions (which of the two passes runs first moves photos by up to 9
    levels at some sizes): say so when the device's major version is not the build's."""
    built, here = manifest.get("versions", {}).get("pillow"), PIL.__version__
    if built and built.split(".")[0] != here.split(".")[0]:
        warnings.warn(f"{bundle} was validated with Pillow {built}, this device has Pillow {here}: resizing may round some image sizes differently, by a few 8-bit levels. For the validated pixels: pip install 'pillow=={built}'.", RuntimeWarning, stacklevel=3)
