"""Unsupervised domain adaptation to unlabeled images from the deployment domain.

- AdaBN (Li et al. 2016): BatchNorm statistics carry much of a domain's look (contrast,
  colour, sensor noise); recomputing them on target images adapts the model with no training.
- DANN (Ganin et al. 2016): a domain classifier learns to tell source from target features
  while a gradient-reversal layer trains the backbone to make them indistinguishable. The
  reversal weight ramps up as 2/(1 + exp(−10 p)) − 1 over training progress p, so the
  domain signal does not swamp the label signal before the features mean anything.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgetl import models
from edgetl.data import Dataset
from edgetl.infer import accuracy, in_batches, model_logits
from edgetl.recipe import Recipe
from edgetl.runtime.preprocess import Preprocessing, normalize
from edgetl.train import CHECKPOINT, LossTerm, TrainBatch, TrainedModel


def adabn(model: models.TransferModel, target_images: np.ndarray, pre: Preprocessing) -> models.TransferModel:
    """A copy of `model` whose BatchNorm statistics are the target images' (cumulative average over all of them)."""
    adapted = copy.deepcopy(model)
    norms = [m for m in adapted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]  # not all backbones use 0.1 (torchvision's MobileNetV3: 0.01)
    adapted.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average: every target batch counts equally
        norm.train()
    in_batches(lambda batch: adapted(torch.from_numpy(normalize(batch, pre))), target_images)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return adapted.eval()


def adabn_stage(
    folder: Path, source: TrainedModel, target_images: np.ndarray, dataset: Dataset, recipe: Recipe
) -> TrainedModel:
    """The AdaBN stage into `folder`: `source`'s model with the target images' BatchNorm statistics, saved
    like a train stage (its checkpoint, its val/test logits and accuracies, the rest of `source`'s train.json).

    Raises OutputError when the disk refuses a write.
    """
    loaded = source.loaded
    adapted = adabn(loaded.model, target_images, loaded.preprocessing)
    models.save_checkpoint(folder / CHECKPOINT, adapted, loaded.spec, loaded.preprocessing, loaded.labels, recipe)
    val = model_logits(adapted, dataset.val.images, loaded.preprocessing)
    test = model_logits(adapted, dataset.test.images, loaded.preprocessing)
    result = replace(
        source,
        checkpoint=folder / CHECKPOINT,
        val_logits=val,
        test_logits=test,
        val_accuracy=accuracy(val, dataset.val.labels),
        test_accuracy=accuracy(test, dataset.test.labels),
    )
    result.save(folder)
    return result


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.weight * grad, None


class DomainAdversary(LossTerm):
    """DANN as a loss term: a domain classifier on pooled features, behind a gradient-reversal layer.

    Every batch carries as many target images (`target_images`) through the same forward pass.
    """

    name = "domain classifier"

    def __init__(self, num_features: int, hidden: int, weight: float, target_images: np.ndarray) -> None:
        super().__init__()
        self.classifier = nn.Sequential(
            nn.Linear(num_features, hidden), nn.ReLU(), nn.Dropout(0.5), nn.Linear(hidden, 1)
        )
        self.weight = weight
        self.target_images = target_images  # uint8 (N, S, S, 3): the trainer prepares them like its own inputs

    def reversal_weight(self, progress: float) -> float:
        return self.weight * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0)

    def loss(self, batch: TrainBatch, logits: torch.Tensor, features: torch.Tensor, progress: float) -> torch.Tensor:
        return self.domain_loss(features, batch.target_features, progress)

    def domain_loss(
        self, source_features: torch.Tensor, target_features: torch.Tensor, progress: float
    ) -> torch.Tensor:
        """Binary domain loss (source 0, target 1); its gradient reaches the backbone reversed."""
        features = _ReverseGradient.apply(torch.cat([source_features, target_features]), self.reversal_weight(progress))
        device = source_features.device
        domains = torch.cat(
            [torch.zeros(len(source_features), device=device), torch.ones(len(target_features), device=device)]
        )
        return nn.functional.binary_cross_entropy_with_logits(self.classifier(features).squeeze(1), domains)
