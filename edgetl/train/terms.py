"""Loss terms: what distillation and domain adaptation add to the label loss, behind one small protocol.

The trainer computes the label loss, scales it by every term's `label_weight`, and adds each
term's `loss` for the batch; a term never branches the loop. A term is an `nn.Module`, so its
parameters train with the head's learning rate and its state goes into the resumable snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class TrainBatch:
    """One training step's batch, after the model's forward pass."""

    index: torch.Tensor  # (B,) positions in the train split
    inputs: torch.Tensor  # the student's input: normalized (augmented) images, or cached frozen-prefix outputs
    labels: torch.Tensor  # (B,)
    target_features: torch.Tensor | None = None  # (B, F) pooled features of target-domain images, when a term asks


class LossTerm(nn.Module):
    """A loss the trainer adds to the (scaled) label loss at every step.

    Subclasses implement `loss`, and set `target_images` to have every batch carry as many
    target-domain images (drawn from the train loop's generator) through the same forward pass.
    """

    name = "loss term"  # in the resumable snapshot and in error messages
    label_weight = 1.0  # the label loss is multiplied by this (distillation: 1 - alpha)
    target_images: np.ndarray | None = None  # uint8 (N, S, S, 3)

    def prepare(self, cached: bool) -> None:
        """Called once before training; `cached`: the student's train inputs are fixed (no augmentation)."""

    def loss(self, batch: TrainBatch, logits: torch.Tensor, features: torch.Tensor, progress: float) -> torch.Tensor:
        """The term's loss for `batch`: `logits` (B, classes) and pooled `features` (B, F) are the student's;
        `progress` runs from 0 (first step) towards 1 (last step)."""
        raise NotImplementedError
