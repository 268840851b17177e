"""How a model's logits become its answer: one label (softmax, argmax) or a label set (sigmoid ≥ per-label thresholds).

The exported model outputs logits for either task; the readout is applied in float, in numpy,
by everything that judges or serves an answer: the parity check, the quantization agreement
control, validation and the device runtime. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("single", "multilabel")


@dataclass(frozen=True)
class Readout:
    """`kind` single: the answer is the top-1 class; multilabel: the set of labels whose sigmoid probability is
    ≥ its threshold (`thresholds`, one per label, in [0, 1]).

    >>> Readout("multilabel", (0.5, 0.3)).decide(np.array([[0.0, -0.5]]))
    array([[ True,  True]])
    """

    kind: str = "single"
    thresholds: tuple[float, ...] = ()

    @property
    def multilabel(self) -> bool:
        return self.kind == "multilabel"

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """(N, C) logits → (N, C) float64 probabilities: softmax over classes, or each label's sigmoid."""
        x = logits.astype(np.float64)
        if self.multilabel:
            return 0.5 * (1.0 + np.tanh(0.5 * x))  # the sigmoid, without exp's overflow warning at large |x|
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def decide(self, logits: np.ndarray) -> np.ndarray:
        """(N, C) logits → the answers: (N,) class indices, or (N, C) bool label sets."""
        if self.multilabel:
            return self.probabilities(logits) >= np.asarray(self.thresholds)
        return logits.argmax(1)

    def agree(self, logits: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """(N,) bool: the same top-1 class, or exactly the same label set, as `reference`'s logits."""
        same = self.decide(logits) == self.decide(reference)
        return same.all(axis=1) if self.multilabel else same

    def delta(self, logits: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """(N,) Σ over classes of |probability − reference's probability|."""
        return np.abs(self.probabilities(logits) - self.probabilities(reference)).sum(axis=1)

    def margin(self, reference: np.ndarray) -> np.ndarray:
        """(N,) how far each image's answer is from changing, in logits: top-1 minus top-2, or the smallest
        distance of a label's logit to its threshold's logit."""
        if self.multilabel:
            t = np.clip(np.asarray(self.thresholds, dtype=np.float64), 1e-6, 1 - 1e-6)
            return np.abs(reference - np.log(t / (1 - t))).min(axis=1)
        top2 = np.sort(reference, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]

    def to_dict(self) -> dict:
        """A bundle manifest's `task`."""
        # unrounded: the device decides exactly as validation did
        return {"kind": self.kind, "thresholds": [float(t) for t in self.thresholds]}

    @classmethod
    def from_manifest(cls, manifest: dict) -> Readout:
        """A bundle manifest's readout: its `task` (checked by the schema), or single-label without one."""
        task = manifest.get("task")
        return cls(task["kind"], tuple(task["thresholds"])) if task else SINGLE


SINGLE = Readout()
