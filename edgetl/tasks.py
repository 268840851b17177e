"""What a build learns to predict: its label tasks, each one kind of answer over its own classes.

A recipe has one task (`task: single | multilabel`) or several on one backbone (`tasks:`, one
head each, loss = Σ weight × task loss: `edgetl.multitask`), each a `LabelTask`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgetl import label_metrics
from edgetl.runtime.readout import KINDS, SINGLE, Readout


@dataclass(frozen=True)
class LabelTask:
    """One task: `kind` single (labels (N,) int64, one class per image) or multilabel (labels (N, C) uint8 0/1,
    a set of labels per image) over `classes`; `loss_weight` scales its loss in the sum."""

    name: str
    kind: str
    classes: tuple[str, ...]
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task kind must be one of {KINDS}; got {self.kind!r}")

    def readout(self, val_logits: np.ndarray | None, val_labels: np.ndarray) -> Readout:
        """How the trained model's logits become answers: multilabel thresholds tuned for each label's F1 on the
        val split (`label_metrics.tune_thresholds`) from the PyTorch model's `val_logits` (N, C)."""
        if self.kind == "single":
            return SINGLE
        if val_logits is None:  # a stage folder from before logits were kept: the untuned default
            return Readout("multilabel", (label_metrics.FALLBACK_THRESHOLD,) * len(self.classes))
        probabilities = label_metrics.sigmoid(val_logits)
        return Readout("multilabel", label_metrics.tune_thresholds(probabilities, val_labels))


def readout_for(val_logits: np.ndarray | None, val_labels: np.ndarray) -> Readout:
    """The readout of a model trained on labels like `val_labels` ((N,) or (N, C)), tuned on its `val_logits`."""
    classes = tuple(map(str, range(val_labels.shape[1]))) if val_labels.ndim == 2 else ()
    return task_of(val_labels, classes).readout(val_logits, val_labels)


def task_of(labels: np.ndarray, classes: tuple[str, ...]) -> LabelTask:
    """The one task of a dataset whose train labels are `labels`: (N,) single-label, (N, C) multi-label."""
    return LabelTask("labels", "multilabel" if labels.ndim == 2 else "single", classes)
