"""Several tasks' readouts over one model's outputs: each task's logits are a slice of the concatenated outputs.

A multi-task model has one named output per task; every runtime engine concatenates them along
the class axis (in output order), so parity, the quantization agreement control and validation
judge the (N, Σ classes) logits as they judge one task's, each task through its own `Readout`.
An image agrees only when every task's answer does. Torch-free.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from edgetl.runtime.readout import Readout


@dataclass(frozen=True)
class TaskReadout:
    """One task of a multi-task model: its output `name`, its class names and how its logits become answers."""

    name: str
    classes: tuple[str, ...]
    readout: Readout

    def to_dict(self) -> dict:
        """A bundle manifest's entry in `tasks`."""
        return {"name": self.name, "labels": list(self.classes), **self.readout.to_dict()}


@dataclass(frozen=True)
class TaskSetReadout:
    """The readouts of `tasks`, whose logits lie side by side in the model's (N, Σ classes) outputs."""

    tasks: tuple[TaskReadout, ...]
    kind: str = "tasks"
    multilabel: bool = False

    def slices(self) -> list[slice]:
        """Each task's columns in the concatenated logits."""
        return column_slices(len(t.classes) for t in self.tasks)

    def split(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        """(N, Σ classes) → {task name: (N, its classes)}."""
        return {t.name: logits[:, s] for t, s in zip(self.tasks, self.slices())}

    def per_task(self, logits: np.ndarray, reference: np.ndarray) -> list[tuple[Readout, np.ndarray, np.ndarray]]:
        return [(t.readout, logits[:, s], reference[:, s]) for t, s in zip(self.tasks, self.slices())]

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """(N, Σ classes): each task's probabilities (softmax or sigmoids) side by side."""
        return np.concatenate(
            [t.readout.probabilities(part) for t, part in zip(self.tasks, self.split(logits).values())], 1
        )

    def agree(self, logits: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """(N,) bool: every task's answer is the same as `reference`'s."""
        return np.logical_and.reduce([r.agree(a, b) for r, a, b in self.per_task(logits, reference)])

    def delta(self, logits: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """(N,) the largest task's Σ |probability − reference's probability|."""
        return np.max([r.delta(a, b) for r, a, b in self.per_task(logits, reference)], axis=0)

    def margin(self, reference: np.ndarray) -> np.ndarray:
        """(N,) the smallest task's margin: the answer closest to changing."""
        return np.min([t.readout.margin(part) for t, part in zip(self.tasks, self.split(reference).values())], axis=0)

    def to_dict(self) -> list[dict]:
        """A bundle manifest's `tasks`."""
        return [t.to_dict() for t in self.tasks]

    @classmethod
    def from_manifest(cls, tasks: list[dict]) -> TaskSetReadout:
        return cls(
            tuple(TaskReadout(t["name"], tuple(t["labels"]), Readout(t["kind"], tuple(t["thresholds"]))) for t in tasks)
        )


def column_slices(sizes: Iterable[int]) -> list[slice]:
    """Consecutive blocks of columns of these sizes: each task's columns in the side-by-side labels and logits."""
    ends = np.cumsum(list(sizes), dtype=int)
    return [slice(int(end - size), int(end)) for size, end in zip(np.diff(ends, prepend=0), ends)]
