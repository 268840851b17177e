"""The trained model as its stage folder holds it: checkpoint.pt, train.json and the val/test logits.

The train stage and the AdaBN stage both leave this layout; later stages load it back with
`TrainedModel.load` and get the model itself only when they need it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from edgetl import models
from edgetl.fileio import write_json
from edgetl.models import BackboneSpec
from edgetl.notes import render
from edgetl.recipe import Recipe
from edgetl.train.trainer import TrainJob, TrainResult

CHECKPOINT = "checkpoint.pt"
TRAINED_ON = ("device", "precision", "world_size")  # train.json's record of where the model trained


@dataclass(frozen=True)
class TrainedModel:
    """A train (or AdaBN) stage's result: its checkpoint, the epochs that made it and its PyTorch logits."""

    checkpoint: Path  # <folder>/checkpoint.pt
    history: list[dict]  # per epoch: epoch, train_loss, val_accuracy, val_loss, lr, seconds
    best_epoch: int
    val_accuracy: float
    test_accuracy: float
    train_seconds: float
    notes: list[str] = field(default_factory=list)
    val_logits: np.ndarray | None = None  # the export parity check's PyTorch reference (absent in older folders)
    test_logits: np.ndarray | None = None  # validation's PyTorch reference
    trained_on: dict = field(default_factory=dict)  # device, precision, world_size (absent in older folders)

    @cached_property
    def loaded(self) -> models.Checkpoint:
        """The checkpoint: the model (eval mode) with its backbone, preprocessing and labels; read on first use."""
        return models.load_checkpoint(self.checkpoint)

    @property
    def model(self) -> models.TransferModel:
        return self.loaded.model

    def summary(self) -> dict:
        """train.json's content, which the report's `training` section and metrics.json repeat."""
        return {
            "history": self.history,
            "best_epoch": self.best_epoch,
            "val_accuracy": self.val_accuracy,
            "test_accuracy": self.test_accuracy,
            "train_seconds": self.train_seconds,
            "notes": self.notes,
            **self.trained_on,
        }

    def save(self, folder: Path) -> None:
        """train.json and the logits into `folder`, beside the checkpoint already written there.

        Raises OutputError when the disk refuses a write.
        """
        if self.val_logits is not None:  # None after resuming a snapshot written before they were kept
            np.save(folder / "val_logits.npy", self.val_logits)
        if self.test_logits is not None:
            np.save(folder / "test_logits.npy", self.test_logits)
        write_json(folder / "train.json", self.summary())

    @classmethod
    def load(cls, folder: Path) -> TrainedModel:
        """The stage folder `save` wrote (or an older one, without val_logits.npy)."""
        summary = json.loads((folder / "train.json").read_text())
        files = {split: folder / f"{split}_logits.npy" for split in ("val", "test")}
        logits = {split: np.load(file) for split, file in files.items() if file.is_file()}
        return cls(
            folder / CHECKPOINT,
            summary["history"],
            summary["best_epoch"],
            summary["val_accuracy"],
            summary["test_accuracy"],
            summary["train_seconds"],
            summary["notes"],
            logits.get("val"),
            logits.get("test"),
            {name: summary[name] for name in TRAINED_ON if name in summary},
        )


def save_result(folder: Path, result: TrainResult, spec: BackboneSpec, job: TrainJob, recipe: Recipe) -> TrainedModel:
    """The train stage's files for `result`: the best model's checkpoint (with the backbone, `job`'s
    preprocessing and classes, and the recipe), train.json and the logits.

    Raises OutputError when the disk refuses a write.
    """
    models.save_checkpoint(folder / CHECKPOINT, result.model, spec, job.pre, job.dataset.classes, recipe)
    trained = TrainedModel(
        folder / CHECKPOINT,
        result.history,
        result.best_epoch,
        result.val_accuracy,
        result.test_accuracy,
        round(result.seconds, 2),
        [render(note) for note in result.notes],
        result.val_logits,
        result.test_logits,
        {"device": result.device, "precision": result.precision, "world_size": result.world_size},
    )
    trained.save(folder)
    return trained
