"""The optimizer, learning-rate schedule, loss weighting and epoch order of a training run."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from edgetl.models import TransferModel
from edgetl.multitask import TaskSetLoss
from edgetl.recipe import TrainConfig


def optimizer(model: TransferModel, config: TrainConfig, extra: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW: the head and `extra` (loss terms' parameters) at `train.lr`, the trainable backbone at
    `train.lr × train.backbone_lr_mult`."""
    backbone = [p for p in model.stages.parameters() if p.requires_grad]
    groups = [{"params": list(model.head.parameters()) + list(extra), "lr": config.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": config.lr * config.backbone_lr_mult})
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def schedule(optim: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int) -> LambdaLR:
    """Linear warm-up over `train.warmup_epochs`, then cosine decay to 0 at the last step."""
    factor = warmup_cosine(config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch)
    return LambdaLR(optim, factor)


def warmup_cosine(warmup_steps: float, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def criterion(config: TrainConfig, labels: torch.Tensor, num_classes: int, tasks: tuple = ()) -> nn.Module:
    """The label loss: cross-entropy with `train.label_smoothing`, class-weighted for `weighted_loss`; for (N, C)
    label sets, binary cross-entropy per label (`LabelSetLoss`); for a multi-task split's `tasks`, Σ weight × each
    task's loss (`edgetl.multitask.TaskSetLoss`)."""
    if tasks:
        return TaskSetLoss(tasks)
    if labels.dim() == 2:
        return LabelSetLoss(pos_weight=positive_weights(labels) if config.pos_weight == "balanced" else None)
    weight = class_weights(labels, num_classes) if config.class_balance == "weighted_loss" else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)


class LabelSetLoss(nn.BCEWithLogitsLoss):
    """`torch.nn.BCEWithLogitsLoss` (the mean over images and labels) of (B, C) logits against (B, C) 0/1 label
    sets of any integer dtype."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return super().forward(logits, labels.to(logits.dtype))


def positive_weights(labels: torch.Tensor) -> torch.Tensor:
    """`train.pos_weight: balanced`: each label's negatives / positives in the (N, C) train label sets, as the
    `pos_weight` of `torch.nn.BCEWithLogitsLoss` ("if a dataset contains 100 positive and 300 negative examples
    of a single class, then pos_weight for the class should be equal to 300/100=3", its documentation)."""
    positives = labels.sum(dim=0).float()
    return (len(labels) - positives) / positives.clamp(min=1)


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=num_classes).float()
    return counts.sum() / (num_classes * counts.clamp(min=1))


def epoch_order(labels: torch.Tensor, balance: str, generator: torch.Generator, num_classes: int) -> torch.Tensor:
    """The train split's indices for one epoch, drawn from `generator`."""
    if balance == "balanced_sampler":  # draw with replacement, each class equally likely
        weights = class_weights(labels, num_classes)[labels]
        return torch.multinomial(weights, len(labels), replacement=True, generator=generator)
    return torch.randperm(len(labels), generator=generator)
