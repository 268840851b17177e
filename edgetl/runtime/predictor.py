"""`Predictor`: a checked bundle, its preprocessing contract and an engine, behind two calls.

The preprocessing is the bundle's contract applied by `edgetl.runtime.preprocess`, the
same function the build's data stage and validation used, so the device sees the inputs
the build measured. numpy, Pillow and the runtime only.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import PIL

from edgetl.errors import BundleError, InferenceError
from edgetl.runtime.bundle import Bundle, open_bundle
from edgetl.runtime.engines import RUNTIMES, Engine, RuntimeMissing, is_installed, open_engine
from edgetl.runtime.preprocess import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    ImageSource,
    Preprocessing,
    normalize,
    preprocess_uint8,
)
from edgetl.runtime.readout import Readout
from edgetl.runtime.taskset import TaskSetReadout

Crop = np.ndarray  # uint8 (S, S, 3)
# A lone prediction resizes on two threads when there are two cores: 0.8 against 1.2 ms at
# 500×375 on an idle 2-core AMD EPYC (the model's threads sleep meanwhile). Where other work
# holds the cores the split costs more than it saves (4.0 against 1.75 ms measured), so the
# throughput path and the server resize on one.
LONE_THREADS = min(2, os.cpu_count() or 1)
BATCH = 4  # images per model call when predicting many: 1 and 4 within 3% on 2 cores, 16 a third slower
T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True)
class Prediction:
    """Top-k labels with their softmax scores, best first."""

    labels: list[str]
    scores: list[float]

    @property
    def label(self) -> str:
        return self.labels[0]

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "top_k": [{"label": label, "score": round(s, 6)} for label, s in zip(self.labels, self.scores)],
        }


@dataclass(frozen=True)
class LabelSetPrediction:
    """A multi-label bundle's answer: the labels whose sigmoid probability reaches their threshold, highest first,
    and every label's probability (in the bundle's label order)."""

    labels: list[str]
    scores: dict[str, float]

    def to_dict(self) -> dict:
        """`{"labels": [{"label", "score"}, …], "scores": {label: probability, …}}`."""
        return {
            "labels": [{"label": label, "score": round(self.scores[label], 6)} for label in self.labels],
            "scores": {label: round(p, 6) for label, p in self.scores.items()},
        }


@dataclass(frozen=True)
class TasksPrediction:
    """A multi-task bundle's answer: each task's own (`Prediction` or `LabelSetPrediction`), by task name."""

    tasks: dict[str, Prediction | LabelSetPrediction]

    def to_dict(self) -> dict:
        """`{"tasks": {name: that task's usual result, …}}`."""
        return {"tasks": {name: p.to_dict() for name, p in self.tasks.items()}}


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
    def load(
        cls,
        bundle: str | Path,
        runtime: str = "auto",
        threads: int | None = None,
        expected_sha256: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> Predictor:
        """Open and verify a bundle (folder or .tar.gz) and load its model on `runtime`.

        `auto` is the runtime the build selected. OpenVINO also runs a bundle's ONNX model;
        ONNX Runtime cannot run an OpenVINO IR. `expected_sha256` pins the bundle's digest
        (the sha256 of its edgetl.json). Raises BundleError (exit 2) for a bundle that is not
        the pinned one, breaks the manifest schema, was modified, or whose edgetl.json says
        other labels, preprocessing or shapes than its model file; InferenceError (exit 4)
        when the runtime cannot load the model file. Images over `max_pixels` are refused from
        their header (ImageTooLarge), before decoding.
        """
        opened = open_bundle(Path(bundle), expected_sha256=expected_sha256)
        _warn_if_pillow_differs(opened.manifest, bundle)
        chosen = opened.manifest["runtime"] if runtime == "auto" else runtime
        if chosen not in RUNTIMES:
            raise BundleError(f"runtime {runtime!r} is not one of auto, {', '.join(RUNTIMES)}.")
        if chosen == "onnxruntime" and opened.model.suffix != ".onnx":
            raise BundleError(
                f"{opened.model} is an OpenVINO IR; ONNX Runtime cannot run it. Use --runtime openvino (`pip "
                "install 'edgetl[openvino]'`)."
            )
        if not is_installed(chosen):
            extra = "'edgetl[openvino]'" if chosen == "openvino" else "onnxruntime"
            raise BundleError(
                f"this bundle runs on {chosen}, which is not installed; install it with `pip install {extra}`."
            )
        try:
            engine = open_engine(opened.model, chosen, threads)
        except RuntimeMissing as exc:
            raise BundleError(str(exc)) from None
        except Exception as exc:  # each runtime raises its own types for a bad file (InvalidProtobuf, RuntimeError…)
            reason = " ".join(str(exc).split())
            raise InferenceError(
                f"{chosen} cannot load {opened.where(opened.manifest['model'])}: {reason}. The file has the sha256 its "
                f"manifest records; if this {chosen} is older than the build's (`edgetl info` lists it), upgrade it, "
                "else rebuild the bundle."
            ) from None
        _check_model_matches_manifest(opened, engine)
        return cls(opened, engine, max_pixels)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.bundle.labels

    @functools.cached_property
    def readout(self) -> Readout | TaskSetReadout:
        """How the model's logits become answers: top-k softmax, a multi-label bundle's thresholded sigmoids, or each
        task's of a multi-task bundle. Read from the manifest once, not per request."""
        tasks = self.bundle.manifest.get("tasks")
        return TaskSetReadout.from_manifest(tasks) if tasks else Readout.from_manifest(self.bundle.manifest)

    def predict(self, image: ImageSource, top_k: int = 5) -> Prediction:
        """One image (path, bytes, PIL image or uint8 array) → its top-k labels."""
        return self.classify(self.crop(image, threads=LONE_THREADS)[None], top_k)[0]

    def predict_batch(self, images: Iterable[ImageSource], top_k: int = 5, batch: int = BATCH) -> list[Prediction]:
        """Several images, in model calls of `batch`, decoded while the model runs (`stream`).
        A bad image raises ImageDecodeError naming it."""
        predictions = []
        for outcome in self.stream(images, top_k, batch):
            if isinstance(outcome, ImageDecodeError):
                raise outcome
            predictions.append(outcome)
        return predictions

    def stream(
        self,
        images: Iterable[ImageSource],
        top_k: int = 5,
        batch: int = BATCH,
    ) -> Iterator[Prediction | ImageDecodeError]:
        """One outcome per image, in order: its prediction, or the ImageDecodeError that says why it
        has none. A decoding thread works up to two batches ahead while the model runs a batch of
        `batch`; memory holds at most one decode and 3 × `batch` crops at a time. Fastest with the
        model on one core fewer than the machine has (`Predictor.load(threads=...)`, as `edgetl
        predict` does for many files): on 2 cores (AMD EPYC), 500×375 JPEGs, 396 images/s
        against 280 predicting them one by one (benchmarks/runtime.py's folder throughput).

        >>> [o.label for o in predictor.stream(["cat.jpg", "dog.png"])]
        ['cat', 'dog']
        """
        outcomes: list[Crop | ImageDecodeError] = []
        crops = 0
        for outcome in _ahead(self._crop_or_error, images, 2 * batch):
            outcomes.append(outcome)
            crops += isinstance(outcome, np.ndarray)
            if crops == batch:
                yield from self._classified(outcomes, top_k)
                outcomes, crops = [], 0
        yield from self._classified(outcomes, top_k)

    def _crop_or_error(self, image: ImageSource) -> Crop | ImageDecodeError:
        try:
            return self.crop(image)
        except ImageDecodeError as exc:
            return exc

    def _classified(self, outcomes: list[Crop | ImageDecodeError], top_k: int) -> list[Prediction | ImageDecodeError]:
        """The crops among `outcomes` classified in one model call, the errors left in their places."""
        crops = [o for o in outcomes if isinstance(o, np.ndarray)]
        predictions = iter(self.classify(np.stack(crops), top_k) if crops else [])
        return [o if isinstance(o, ImageDecodeError) else next(predictions) for o in outcomes]

    def crop(self, image: ImageSource, name: str | None = None, threads: int = 1) -> np.ndarray:
        """Decode and crop one image as the contract says: uint8 (S, S, 3). `threads` 2 splits the resize
        over two threads: faster on idle cores, slower where other work holds them."""
        return preprocess_uint8(image, self.bundle.preprocessing, name, self.max_pixels, threads)

    def classify(self, crops: np.ndarray, top_k: int = 5) -> list[Prediction]:
        """uint8 (N, S, S, 3) crops → N predictions with softmax scores."""
        return self.predictions(self.engine.run(normalize(crops, self.bundle.preprocessing)), top_k)

    def predictions(self, logits: np.ndarray, top_k: int = 5) -> list[Prediction] | list[LabelSetPrediction]:
        """(N, classes) logits → N top-k predictions with softmax scores; for a multi-label bundle, N label sets
        (`top_k` does not apply: every label above its threshold); for a multi-task bundle, N `TasksPrediction`s.

        Raises InferenceError when the logits are not (N, labels) or hold NaN or inf: such a
        model cannot predict, and a score must never be NaN.
        """
        if logits.ndim != 2 or logits.shape[1] != len(self.labels):
            raise InferenceError(
                f"{self.engine.runtime} returned outputs of shape {logits.shape} from {self._model_name()}; "
                f"its {len(self.labels)} labels need (N, {len(self.labels)}). Rebuild the bundle."
            )
        bad = logits.size - int(np.count_nonzero(np.isfinite(logits)))
        if bad:
            raise InferenceError(
                f"{self.engine.runtime} returned {bad} non-finite value(s) (NaN or inf) in {logits.size} outputs "
                f"of {self._model_name()}: the model cannot predict. Rebuild it (check the training for a diverging "
                "loss)."
            )
        return _answers(self.readout, self.labels, logits, top_k)

    def _model_name(self) -> str:
        """The model file as messages name it (looked up only for one: it stats the bundle's path)."""
        return self.bundle.where(self.bundle.manifest["model"])


def _answers(readout: Readout | TaskSetReadout, labels: tuple[str, ...], logits: np.ndarray, top_k: int) -> list:
    """(N, classes) finite logits → N answers: top-k softmax, label sets, or (several tasks) each task's."""
    if readout.kind == "tasks":
        per_task = {t.name: _answers(t.readout, t.classes, part, top_k) for t, part in
                    zip(readout.tasks, readout.split(logits).values())}  # fmt: skip
        return [TasksPrediction({name: answers[i] for name, answers in per_task.items()}) for i in range(len(logits))]
    if readout.multilabel:
        return [_label_set(labels, p, chosen) for p, chosen in
                zip(readout.probabilities(logits), readout.decide(logits))]  # fmt: skip
    shifted = logits - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(shifted)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    k = max(1, min(top_k, probabilities.shape[1]))
    order = np.argsort(-probabilities, axis=1)[:, :k]
    return [Prediction([labels[i] for i in row], [float(p[i]) for i in row]) for p, row in zip(probabilities, order)]


def _label_set(labels: tuple[str, ...], probabilities: np.ndarray, chosen: np.ndarray) -> LabelSetPrediction:
    """One image's label set: the `chosen` labels by descending probability."""
    order = [i for i in np.argsort(-probabilities, kind="stable") if chosen[i]]
    return LabelSetPrediction([labels[i] for i in order], {name: float(p) for name, p in zip(labels, probabilities)})


def _warn_if_pillow_differs(manifest: dict, bundle: str | Path) -> None:
    """Pillow's resize rounding is part of the pixels the build validated, and it changes
    between major versions (which of the two passes runs first moves photos by up to 9
    levels at some sizes): say so when the device's major version is not the build's."""
    built, here = manifest.get("versions", {}).get("pillow"), PIL.__version__
    if built and built.split(".")[0] != here.split(".")[0]:
        warnings.warn(
            f"{bundle} was validated with Pillow {built}, this device has Pillow {here}: resizing may round some "
            "image sizes differently, by a few 8-bit levels. For the validated pixels: pip install "
            f"'pillow=={built}'.",
            RuntimeWarning,
            stacklevel=3,
        )


def _check_model_matches_manifest(bundle: Bundle, engine: Engine) -> None:
    """The model file carries its own labels and preprocessing (written at export) and its shapes:
    refuse an edgetl.json that says otherwise, naming the first field that differs."""
    model, size, shape = bundle.where(bundle.manifest["model"]), bundle.preprocessing.input_size, engine.input_shape
    if len(shape) != 4 or not {shape[1]} <= {3, None} or not set(shape[2:]) <= {size, None}:
        raise BundleError(
            f"{model} takes inputs of shape {_shape(shape)}, but its edgetl.json says "
            f"`preprocessing.input_size` {size}, for (N, 3, {size}, {size}): edgetl.json does not describe this model."
        )
    classes = engine.output_shape[-1] if engine.output_shape else None
    if classes is not None and classes != len(bundle.labels):
        raise BundleError(
            f"{model} outputs {classes} scores per image, but its edgetl.json has {len(bundle.labels)} `labels`: "
            "edgetl.json does not describe this model."
        )
    try:
        labels = json.loads(engine.metadata["edgetl.labels"])
        pre = Preprocessing.from_dict(json.loads(engine.metadata["edgetl.preprocessing"])).to_dict()
    except KeyError as exc:
        raise BundleError(
            f"{model} carries no {exc} metadata, so its edgetl.json cannot be checked against it; "
            "rebuild the bundle with `edgetl build`."
        ) from None
    except (ValueError, TypeError, AttributeError) as exc:
        raise BundleError(f"{model}'s own edgetl metadata is not readable ({exc}); rebuild the bundle.") from None
    found = _first_difference("labels", list(bundle.labels), labels) or _first_difference(
        "preprocessing", bundle.preprocessing.to_dict(), pre
    )
    if found:
        field, ours, theirs = found
        raise BundleError(
            f"`{field}` is {ours!r} in the edgetl.json of {bundle.source}, but {theirs!r} in {model} itself: "
            "the manifest was modified or belongs to another build. Copy the bundle again from the build."
        )


def _first_difference(field: str, ours, theirs) -> tuple[str, object, object] | None:
    """The first (field, ours, theirs) where two JSON values differ, descending into lists and mappings of one shape."""
    if isinstance(ours, dict) and isinstance(theirs, dict) and ours.keys() == theirs.keys():
        return next(filter(None, (_first_difference(f"{field}.{k}", ours[k], theirs[k]) for k in ours)), None)
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        pairs = enumerate(zip(ours, theirs))
        return next(filter(None, (_first_difference(f"{field}[{i}]", a, b) for i, (a, b) in pairs)), None)
    return None if ours == theirs else (field, ours, theirs)


def _shape(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


def _ahead(work: Callable[[T], U], items: Iterable[T], lookahead: int) -> Iterator[U]:
    """`map(work, items)` run on one background thread up to `lookahead` items ahead of the consumer.

    One thread, not one per core: two full-size decodes at once would pass the 300 MB that
    deploy/systemd/edgetl.service allows, and the model already uses every core it is given.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgetl-decode") as pool:
        pending: deque[Future[U]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(work, item))
                if len(pending) > lookahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # a consumer that stops early (or an error) leaves nothing decoding
            for future in pending:
                future.cancel()
