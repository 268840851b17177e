"""Several tasks on one backbone: their labels side by side, their summed loss and their mean primary metric.

A multi-task dataset keeps each image's labels as one (Σ classes,) row of 0/1: a one-hot block
for each single-label task, a 0/1 block per label for each multi-label task, in the recipe's
task order (`edgetl.multitask_data`). The model's one head outputs the blocks' logits side by
side (one Linear, split by slices: the features are shared, the heads are its row blocks), and
the export names one output per task (`TaskOutputs`).

Early stopping and model selection use the mean of the tasks' primary metrics: top-1 accuracy
for a single-label task, mAP for a multi-label one.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgetl import label_metrics
from edgetl import tasks as tasks_module
from edgetl.runtime.taskset import TaskReadout, TaskSetReadout, column_slices
from edgetl.tasks import LabelTask


def slices(tasks: tuple[LabelTask, ...]) -> list[slice]:
    """Each task's columns in the labels and logits."""
    return column_slices(len(t.classes) for t in tasks)


def readout_for(val_logits: np.ndarray | None, val_labels: np.ndarray, tasks: tuple[LabelTask, ...] = ()):
    """The readout of a model trained on labels like `val_labels`, tuned on its `val_logits`: one task's
    (`edgetl.tasks.readout_for`), or with `tasks` each task's (`LabelTask.readout`) as a `TaskSetReadout`."""
    if not tasks:
        return tasks_module.readout_for(val_logits, val_labels)
    parts = []
    for task, s in zip(tasks, slices(tasks)):
        logits = None if val_logits is None else val_logits[:, s]
        parts.append(TaskReadout(task.name, task.classes, task.readout(logits, val_labels[:, s])))
    return TaskSetReadout(tuple(parts))


def primary_metrics(logits: np.ndarray, labels: np.ndarray, tasks: tuple[LabelTask, ...]) -> dict[str, float]:
    """{task name: top-1 accuracy (single) or mAP (multilabel)} of (N, Σ classes) logits against 0/1 labels."""
    out = {}
    for task, s in zip(tasks, slices(tasks)):
        if task.kind == "multilabel":
            out[task.name] = label_metrics.mean_average_precision(logits[:, s], labels[:, s])
        else:
            out[task.name] = float((logits[:, s].argmax(1) == labels[:, s].argmax(1)).mean()) if len(logits) else 0.0
    return out


def mean_primary(logits: np.ndarray, labels: np.ndarray, tasks: tuple[LabelTask, ...]) -> float:
    """The build's one number for a multi-task split: the mean of `primary_metrics`."""
    return float(np.mean(list(primary_metrics(logits, labels, tasks).values())))


class TaskSetLoss(nn.Module):
    """Σ loss_weight × each task's loss over its slice of (B, Σ classes) logits: cross-entropy (its one-hot
    block's class) for a single-label task, binary cross-entropy (the mean over images and labels) for a
    multi-label one."""

    def __init__(self, tasks: tuple[LabelTask, ...]) -> None:
        super().__init__()
        self.parts = [(s, t.kind == "multilabel", t.loss_weight) for t, s in zip(tasks, slices(tasks))]

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total = logits.new_zeros(())
        for s, multilabel, weight in self.parts:
            part, truth = logits[:, s], labels[:, s]
            if multilabel:
                loss = nn.functional.binary_cross_entropy_with_logits(part, truth.to(part.dtype))
            else:
                loss = nn.functional.cross_entropy(part, truth.argmax(1))
            total = total + weight * loss
        return total


def val_loss(logits: np.ndarray, labels: np.ndarray, tasks: tuple[LabelTask, ...]) -> float:
    """`TaskSetLoss` of whole-split numpy logits, for breaking ties of the mean primary metric."""
    with torch.no_grad():
        return float(TaskSetLoss(tasks)(torch.from_numpy(logits).float(), torch.from_numpy(labels).long()))


class TaskOutputs(nn.Module):
    """The model with one output per task, named by `output_names` in the export: (B, Σ classes) logits split
    into each task's (B, its classes)."""

    def __init__(self, model: nn.Module, tasks: tuple[LabelTask, ...]) -> None:
        super().__init__()
        self.model = model
        self.output_names = [t.name for t in tasks]
        self.widths = [len(t.classes) for t in tasks]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.split(self.model(x), self.widths, dim=1))


def variant_scores(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray, readout: TaskSetReadout, score):
    """A validation row's fields for a multi-task variant: `tasks` holds each task's own fields (`score`, the
    validation's scoring of one task's logits against its labels: (N,) classes or (N, C) label sets); `accuracy` is
    the mean of the tasks' primary metrics, `accuracy_drop` the mean of their drops, and `agreement` the share of
    test images on which every task's answer is the baseline's (`reference` logits)."""
    per = {}
    for task, s in zip(readout.tasks, readout.slices()):
        truth = labels[:, s] if task.readout.multilabel else labels[:, s].argmax(1)
        per[task.name] = {"kind": task.readout.kind} | score(logits[:, s], reference[:, s], truth, task.readout)
    return {
        "accuracy": float(np.mean([p["accuracy"] for p in per.values()])),
        "agreement": float(readout.agree(logits, reference).mean()) if len(logits) else 1.0,
        "accuracy_drop": float(np.mean([p["accuracy_drop"] for p in per.values()])),
        "tasks": per,
    }


def parity_per_task(readout, logits: np.ndarray, reference: np.ndarray, tolerance: float) -> dict | None:
    """A multi-task model's parity per output: the share of images whose answer is PyTorch's (`reference`), the
    largest |Δlogit| and whether every logit is within `tolerance` (`edgetl.validate.parity`'s rule); None for a
    one-task `readout`."""
    if readout.kind != "tasks":
        return None
    out = {}
    for task, (part_readout, part, ref) in zip(readout.tasks, readout.per_task(logits, reference)):
        agree, delta = part_readout.agree(part, ref), np.abs(part - ref).max(axis=1)
        passed = bool((delta <= tolerance).all())
        out[task.name] = {"agreement": float(agree.mean()), "max_abs_logit_delta": float(delta.max()), "passed": passed}
    return out


def failing(per_task: dict | None) -> str:
    """` (output NAME, …)` naming a multi-task model's outputs that failed parity, for an error message; "" else."""
    names = [name for name, outcome in (per_task or {}).items() if not outcome["passed"]]
    return f" (output{'s' if len(names) > 1 else ''} {', '.join(names)})" if names else ""
