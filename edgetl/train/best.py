"""Which epoch a training run keeps, and when its val split cannot tell: the best epoch and the ranking notes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgetl import label_metrics, multitask
from edgetl.notes import Note

# Below this many val images one image moves val accuracy by over 2 points, more than late
# epochs usually differ by: their ranking is then mostly noise, and the report says so.
SMALL_VAL_SPLIT = 50


@dataclass(frozen=True)
class BestEpoch:
    """The epoch kept so far: the highest val accuracy, ties broken by the lower val loss."""

    epoch: int
    accuracy: float
    loss: float
    state: dict[str, torch.Tensor]  # a copy of the model's weights at that epoch
    val_logits: np.ndarray | None = None

    def beaten_by(self, accuracy: float, loss: float) -> bool:
        return (accuracy, -loss) > (self.accuracy, -self.loss)

    def to_dict(self) -> dict:
        """For the resumable snapshot."""
        return {
            "epoch": self.epoch,
            "accuracy": self.accuracy,
            "loss": self.loss,
            "state": self.state,
            "val_logits": self.val_logits,
        }

    @classmethod
    def from_dict(cls, data: dict) -> BestEpoch:
        # Snapshots written before val loss and val logits were kept have neither.
        return cls(data["epoch"], data["accuracy"], data.get("loss", math.inf), data["state"], data.get("val_logits"))


def val_loss(logits: np.ndarray, labels: np.ndarray, tasks: tuple = ()) -> float:
    """The loss that breaks ties of val accuracy (or mAP): plain cross-entropy (no smoothing, no class weights),
    or binary cross-entropy for (N, C) label sets (no positive weights); a multi-task split's `tasks`: their
    weighted sum (`edgetl.multitask.val_loss`)."""
    if tasks:
        return multitask.val_loss(logits, labels, tasks)
    if labels.ndim == 2:
        return label_metrics.bce(logits, labels)
    return float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels).long()))


def ranking_notes(history: list[dict], best_epoch: int, val_images: int) -> list[Note]:
    """The report's notes when the val split cannot rank epochs: too small, or tied (saturated) at the top.

    >>> [note.kind for note in ranking_notes([{"epoch": 1, "val_accuracy": 1.0}] * 2, 1, 20)]
    ['small_val_split', 'saturated_val_accuracy']
    """
    notes = []
    if val_images < SMALL_VAL_SPLIT:
        notes.append(
            Note("small_val_split", {"images": val_images, "points": 100 / val_images, "minimum": SMALL_VAL_SPLIT})
        )
    top = max((h["val_accuracy"] for h in history), default=None)
    tied = [h["epoch"] for h in history if h["val_accuracy"] == top]
    if len(tied) > 1:
        values = {"count": len(tied), "epochs": ", ".join(map(str, tied)), "best_epoch": best_epoch}
        saturated = top == 1.0
        notes.append(
            Note(
                "saturated_val_accuracy" if saturated else "tied_val_accuracy",
                values if saturated else {"accuracy": top, **values},
            )
        )
    return notes
