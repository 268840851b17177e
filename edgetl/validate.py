"""Validate stage: prove every artifact is the model that was trained, and measure it.

Two steps. `parity` runs the FP32 ONNX and IR files on every validation image and stops the
build if any logit is off PyTorch's by more than the tolerance (or is not finite).
`run` then measures every artifact × runtime on the test split, with PyTorch eager FP32 as
the baseline row: accuracy with its 95% interval, agreement with PyTorch, the accuracy
drop with its paired interval, interleaved latency percentiles, throughput, file size,
load time and the peak memory of a process that only runs inference.
"""

from __future__ import annotations

import json
import logging
import math
import os
import site
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import edgetl
from edgetl import label_metrics, multitask
from edgetl.build_report import ParityOutcome
from edgetl.data import Split
from edgetl.errors import ExportError, InferenceError
from edgetl.export import model_files
from edgetl.fileio import write_json
from edgetl.infer import EVAL_BATCH, in_batches, model_logits
from edgetl.models import TransferModel
from edgetl.notes import Note, render
from edgetl.recipe import MeasureConfig
from edgetl.runtime.bench import interleaved_latency
from edgetl.runtime.engines import Engine, open_engine
from edgetl.runtime.metrics import Latency, VariantMetrics
from edgetl.runtime.preprocess import Preprocessing, normalize
from edgetl.runtime.readout import SINGLE, Readout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Artifact:
    """One file on one runtime (or the PyTorch model itself, with file None)."""

    name: str
    runtime: str  # pytorch | onnxruntime | openvino
    precision: str  # fp32 | fp16 | int8
    file: Path | None
    float_layers: list[str] = field(default_factory=list)
    notes: Sequence[str | Note] = field(default_factory=list)  # sentences, or records the report renders


@dataclass(frozen=True)
class Validation:
    """The validate stage's result: one row per variant, the PyTorch baseline first. Its stage folder holds
    `variants.json`, the rows as report.json lists them."""

    variants: list[VariantMetrics]

    def save(self, folder: Path) -> None:
        """Write `folder/variants.json`. Raises OutputError when the disk refuses it."""
        write_json(folder / "variants.json", [v.to_dict() for v in self.variants])

    @classmethod
    def load(cls, folder: Path) -> Validation:
        """Read what `save` wrote. Raises OSError, ValueError (not JSON), KeyError (a row lacks a field)."""
        return cls([VariantMetrics.from_dict(v) for v in json.loads((folder / "variants.json").read_text())])


def parity(
    model: TransferModel,
    artifacts: list[Artifact],
    val: Split,
    pre: Preprocessing,
    tolerance: float,
    threads: int | None,
    val_logits: np.ndarray | None = None,
) -> list[ParityOutcome]:
    """Every FP32 artifact must match PyTorch on every validation image, or the build stops: every logit (every
    task's output's) within `tolerance`. Then the answers (top-1; label sets: the set at the thresholds tuned on
    these PyTorch logits; several tasks: every task's; `edgetl.multitask.readout_for`) differ only at near-ties,
    where either is PyTorch's for the tolerance: top-1 and top-2, or a logit and its threshold, within 2 × it.

    `val_logits`: the PyTorch logits training computed at its best epoch (checked on a few images). Raises
    ExportError naming the worst images, or InferenceError when any logit (the artifact's or PyTorch's) is NaN or
    infinite: a non-finite delta is never within tolerance.

    >>> parity(model, [Artifact("onnx-fp32", "onnxruntime", "fp32", Path("model.onnx"))], dataset.val, pre, 1e-3, None)
    """
    reference = pytorch_logits(model, val, pre, val_logits)
    readout = multitask.readout_for(reference, val.labels, val.tasks)
    outcomes = []
    for artifact in artifacts:
        logits, _ = _run_batches(open_checked(artifact, threads), val.images, pre, artifact, EVAL_BATCH)
        delta, disagree = np.abs(logits - reference).max(axis=1), ~readout.agree(logits, reference)  # (N,) each
        bad = np.flatnonzero(~(delta <= tolerance))  # ~(<=): a NaN delta (either side NaN) fails
        outcome = ParityOutcome(
            artifact.name,
            artifact.runtime,
            len(val.labels),
            float(1 - disagree.mean()),
            float(delta.max()),
            tolerance,
            not len(bad),
            multitask.parity_per_task(readout, logits, reference, tolerance),
        )
        outcomes.append(outcome)
        log.info(
            "parity %s: agreement %.4f, max |Δlogit| %.2e (tolerance %.0e)",
            artifact.name,
            outcome.agreement,
            outcome.max_abs_logit_delta,
            tolerance,
        )
        _check_finite(artifact, logits, reference, val)
        if len(bad):
            worst = bad[np.argsort(-delta[bad])][:5]
            listing = "; ".join(
                f"{val.sources[i]} (|Δlogit| {delta[i]:.2e}{', answer differs' if disagree[i] else ''})" for i in worst
            )
            raise ExportError(
                f"{artifact.name} on {artifact.runtime}{multitask.failing(outcome.tasks)} disagrees with PyTorch on "
                f"{len(bad)} of {len(val.labels)} validation images beyond |Δlogit| {tolerance:g}: {listing}. Check "
                "the export (opset, custom layers), or raise `export.parity_tolerance` if the difference is expected."
            )
    return outcomes


def _check_finite(artifact: Artifact, logits: np.ndarray, reference: np.ndarray, val: Split) -> None:
    """Raises InferenceError when the artifact's or PyTorch's logits hold a NaN or an infinity."""
    finite, finite_reference = np.isfinite(logits).all(axis=1), np.isfinite(reference).all(axis=1)  # (N,)
    if not (finite.all() and finite_reference.all()):
        first = np.flatnonzero(~(finite & finite_reference))[0]
        raise InferenceError(
            f"parity of {artifact.file} failed: logits are not finite (NaN or inf): {artifact.name} on "
            f"{artifact.runtime} on {int((~finite).sum())} of {len(val.labels)} validation images, PyTorch on "
            f"{int((~finite_reference).sum())}; first {val.sources[first]}. A model with non-finite outputs cannot be "
            "shipped; when PyTorch's are non-finite too, the recipe's training values diverged (lower `train.lr` or "
            "`train.weight_decay`)."
        )


@dataclass(frozen=True)
class Baseline:
    """The PyTorch model artifacts are measured against, its checkpoint (for the fresh-process probe), its test
    logits as training computed them (None: computed here) and how its answers are read."""

    model: TransferModel
    checkpoint: Path
    test_logits: np.ndarray | None = None
    readout: Readout = SINGLE


def run(
    model: TransferModel,
    artifacts: list[Artifact],
    test: Split,
    pre: Preprocessing,
    config: MeasureConfig,
    checkpoint: Path,
    test_logits: np.ndarray | None = None,
) -> Validation:
    """`measure` for a single-label model (its answers are its top-1 classes)."""
    return measure(Baseline(model, checkpoint, test_logits), artifacts, test, pre, config)


def measure(
    against: Baseline, artifacts: list[Artifact], test: Split, pre: Preprocessing, config: MeasureConfig
) -> Validation:
    """Measure the PyTorch baseline and every artifact on the test split; one row per variant, its answers
    read by `against.readout` (label sets: `label_metrics.variant_scores`).

    `against.test_logits`: the baseline's logits as training computed them (one PyTorch pass over
    the test split saved: 36 s for lite0 at 224 px on 1,000 images); checked on a few images.
    Raises ExportError when a runtime cannot load or run an artifact, or the fresh-process probe fails.
    """
    model, checkpoint, test_logits, readout = against.model, against.checkpoint, against.test_logits, against.readout
    threads = config.threads
    torch.set_num_threads(threads or torch.get_num_threads())
    baseline = Artifact("pytorch-fp32", "pytorch", "fp32", None)
    engines: dict[str, Engine] = {a.name: open_checked(a, threads) for a in artifacts}
    engines[baseline.name] = _TorchEngine(model)
    # The baseline's logits in channels_last (infer.model_logits, 1.6× faster); its
    # latency and throughput below are timed as users run eager PyTorch: plain NCHW.
    passes = {a.name: _run_batches(engines[a.name], test.images, pre, a, config.throughput_batch) for a in artifacts}
    logits = {baseline.name: pytorch_logits(model, test, pre, test_logits)} | {name: p[0] for name, p in passes.items()}
    latency, throughput = _speed(engines, passes, test, pre, config)
    rows = []
    for artifact in (baseline, *artifacts):
        process = _probe_process(artifact, checkpoint, threads, pre.input_size)
        file = artifact.file or checkpoint
        measured = {
            "latency_ms": Latency(**{k: round(latency[artifact.name][k], 3) for k in ("p50", "p90", "p99")}),
            "throughput_ips": round(throughput[artifact.name], 1),
            **process,  # load_seconds, peak_rss_mb
            **_scores(logits[artifact.name], logits[baseline.name], test.labels, readout),
        }
        row = VariantMetrics(
            name=artifact.name, runtime=artifact.runtime, precision=artifact.precision, file=file.name,
            size_mb=round(_size_mb(file), 3), test_images=len(test.labels), float_layers=artifact.float_layers,
            **_notes(artifact.notes), **measured,
        )  # fmt: skip
        rows.append(row)
        log.info(
            "%-14s acc %.4f  agree %.4f  drop %+.4f  p50 %.2f ms  %.1f img/s  %.2f MB",
            row.name,
            row.accuracy,
            row.agreement,
            row.accuracy_drop,
            row.latency_ms.p50,
            row.throughput_ips,
            row.size_mb,
        )
    return Validation(rows)


def _speed(
    engines: dict[str, Engine],
    passes: dict[str, tuple[np.ndarray, list[float]]],
    test: Split,
    pre: Preprocessing,
    config: MeasureConfig,
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Interleaved batch-1 latency percentiles (ms) and throughput (images/s) of every engine."""
    one = normalize(test.images[:1], pre)
    # After the test-pass batches (PyTorch's included): glibc then keeps PyTorch's activations
    # mapped between calls; before, each batch-1 forward page-faults them in (19 vs 24-27 ms).
    calls = {name: (lambda e=e: e.run(one)) for name, e in engines.items()}
    latency = interleaved_latency(calls, config.latency_rounds, config.latency_runs, config.warmup)
    seconds = _batch_seconds(engines, passes, test, pre, config.throughput_batch)
    return latency, {name: config.throughput_batch / s for name, s in seconds.items()}


def _scores(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray, readout: Readout) -> dict[str, Any]:
    """Accuracy, agreement with the baseline's `reference` logits, the paired drop from its accuracy with their
    intervals, the confusion matrix (label sets: mAP, label-set agreement, F1s; several tasks: each task's)."""
    if readout.kind == "tasks":  # a multi-task model's TaskSetReadout: each task scored as this function scores it
        return multitask.variant_scores(logits, reference, labels, readout, _scores)
    if readout.multilabel:
        return label_metrics.variant_scores(logits, reference, labels, readout)
    predicted, top_reference = logits.argmax(1), reference.argmax(1)
    correct, correct_reference = predicted == labels, top_reference == labels
    return {
        "accuracy": float(correct.mean()),
        "accuracy_ci95": wilson_interval(int(correct.sum()), len(labels)),
        "agreement": float((predicted == top_reference).mean()),
        "accuracy_drop": float(correct_reference.mean() - correct.mean()),
        "accuracy_drop_ci95": paired_drop_interval(correct_reference, correct),
        "confusion_matrix": confusion_matrix(labels, predicted, logits.shape[1]),
    }


def _notes(notes: Sequence[str | Note]) -> dict[str, Any]:
    """A row's `notes` as sentences, and `note_records` for the notes given as records (None when none were)."""
    records = [note.to_dict() for note in notes if isinstance(note, Note)]
    sentences = [note if isinstance(note, str) else render(note) for note in notes]
    return {"notes": sentences, "note_records": records or None}


def pytorch_logits(model: TransferModel, split: Split, pre: Preprocessing, saved: np.ndarray | None) -> np.ndarray:
    """The model's PyTorch logits on `split`: the saved ones when they match the model on a
    few images (a pass over 1,000 lite0 images at 224 px costs ~30 s), else computed."""
    if saved is None:
        return model_logits(model, split.images, pre)
    sample = model_logits(model, split.images[:_CHECKED], pre)
    if saved.shape == (len(split.labels), sample.shape[1]) and np.allclose(saved[:_CHECKED], sample, atol=1e-4):
        return saved
    log.warning("the saved PyTorch logits do not match the model; recomputing them")
    return model_logits(model, split.images, pre)


_CHECKED = 16  # images on which saved logits must match the model


def open_checked(artifact: Artifact, threads: int | None) -> Engine:
    """Open an artifact; a file the runtime cannot load or run becomes an ExportError naming it."""
    try:
        engine = open_engine(artifact.file, artifact.runtime, threads)
    except Exception as exc:  # runtimes raise their own exception types; the message names op and node
        raise ExportError(f"{artifact.runtime} cannot load {artifact.file} ({artifact.name}): {exc}") from None
    return engine


def _run_batches(
    engine: Engine, images: np.ndarray, pre: Preprocessing, artifact: Artifact, batch: int
) -> tuple[np.ndarray, list[float]]:
    """Logits over `images`, and the seconds each full batch took in the runtime (normalizing not counted).

    Raises ExportError naming the artifact when the runtime fails on a batch."""
    seconds = []

    def timed(chunk: np.ndarray) -> np.ndarray:
        inputs = normalize(chunk, pre)
        started = time.perf_counter()
        logits = engine.run(inputs)
        if len(inputs) == batch:
            seconds.append(time.perf_counter() - started)
        return logits

    try:
        outputs = in_batches(timed, images, batch)
    except Exception as exc:  # e.g. an op with no kernel for these inputs
        raise ExportError(f"{artifact.runtime} failed running {artifact.file} ({artifact.name}): {exc}") from None
    return np.concatenate(outputs), seconds


def _batch_seconds(
    engines: dict[str, Engine],
    passes: dict[str, tuple[np.ndarray, list[float]]],
    test: Split,
    pre: Preprocessing,
    batch: int,
) -> dict[str, float]:
    """Median seconds per full batch for each engine, for its throughput. The test pass's
    batches when there are enough of them (31 of 32 images at 1,000 test images: a steadier
    median than timing extra batches, and no extra time); otherwise, and for PyTorch, whose
    logits training saved, a warm-up and three timed batches."""
    median = {name: float(np.median(p[1])) for name, p in passes.items() if len(p[1]) >= _TIMED_BATCHES}
    many = normalize(np.resize(test.images[:batch], (batch, *test.images.shape[1:])), pre)
    untimed = {name: (lambda e=e: e.run(many)) for name, e in engines.items() if name not in median}
    timed = interleaved_latency(untimed, rounds=_TIMED_BATCHES, runs_per_round=1, warmup=1) if untimed else {}
    return median | {name: t["p50"] / 1000.0 for name, t in timed.items()}


_TIMED_BATCHES = 3


class _TorchEngine:
    runtime = "pytorch"

    def __init__(self, model: TransferModel) -> None:
        self.model = model.eval()

    def run(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.from_numpy(batch)).numpy()


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, classes: int) -> list[list[int]]:
    """Counts: rows are the true class, columns the predicted one."""
    return np.bincount(labels * classes + predicted, minlength=classes * classes).reshape(classes, classes).tolist()


def wilson_interval(successes: int, total: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion (sane at 0 and 1, unlike the normal one)."""
    if total == 0:
        return [0.0, 1.0]
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return [round(max(0.0, centre - half), 5), round(min(1.0, centre + half), 5)]


def paired_drop_interval(reference_correct: np.ndarray, correct: np.ndarray, z: float = 1.96) -> list[float]:
    """95% interval of the accuracy drop, paired per image (the same test images on both)."""
    diff = reference_correct.astype(np.float64) - correct.astype(np.float64)
    half = z * diff.std(ddof=1) / math.sqrt(len(diff)) if len(diff) > 1 else 0.0
    return [round(float(diff.mean() - half), 5), round(float(diff.mean() + half), 5)]


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in model_files(path)) / 1e6


def _probe_process(artifact: Artifact, checkpoint: Path, threads: int | None, size: int) -> dict:
    """Load time and peak RSS of a fresh process that loads this artifact and predicts.

    Isolated from the user's working directory, whose modules would otherwise come first on
    its import path (`-m` puts the cwd there: an `inspect.py` beside the recipe broke it):
    it runs in the artifact's own folder, which holds no Python files (`-P` would say the
    same, but only from Python 3.11), and finds edgetl as this process did.
    """
    target = Path(artifact.file or checkpoint).resolve()
    command = [sys.executable, "-m", "edgetl.probe", artifact.runtime, str(target), str(size), str(threads or 0)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=target.parent, env=_probe_environment()
    )
    if done.returncode != 0:
        raise ExportError(
            f"measuring {artifact.name} in a fresh process failed: "
            f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
        )
    return json.loads(done.stdout)


def _probe_environment() -> dict[str, str]:
    """This environment, with PYTHONPATH's entries made absolute (the probe runs in another folder)
    and edgetl's source tree first when it is not installed (found through the cwd, say)."""
    root = os.path.realpath(Path(edgetl.__file__).parent.parent)
    installed = root in {os.path.realpath(p) for p in (*site.getsitepackages(), site.getusersitepackages())}
    entries = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(([] if installed else [root]) + entries)}
