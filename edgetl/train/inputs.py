"""What the trainable part of the model eats: uint8 images, or the frozen prefix's outputs computed once.

Whatever is frozen runs once per image, not once per epoch: `linear_probe` caches the pooled
features and trains the head in seconds; `partial` without augmentation caches the frozen
prefix's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edgetl.data import Dataset
from edgetl.errors import RecipeError
from edgetl.infer import in_batches
from edgetl.models import TransferModel
from edgetl.recipe import TrainConfig
from edgetl.runtime.preprocess import Preprocessing, normalize


@dataclass(frozen=True)
class Inputs:
    """The three splits as the trainable stages take them, and how to turn a slice into a model input."""

    train: torch.Tensor  # uint8 (N, S, S, 3) images, or float32 cached activations
    val: torch.Tensor
    test: torch.Tensor
    start: int  # the first stage to run on them
    cached: bool
    pre: Preprocessing

    def model_input(self, batch: torch.Tensor, augmenter=None) -> torch.Tensor:
        """A slice of one split (or of target images prepared alike) as the model input, in channels_last."""
        if self.cached:
            return batch.contiguous(memory_format=torch.channels_last) if batch.dim() == 4 else batch
        images = batch.permute(0, 3, 1, 2)  # (N, 3, S, S) uint8
        if augmenter is not None:
            images = torch.stack([augmenter(image) for image in images])
        normalized = normalize(images.permute(0, 2, 3, 1).numpy(), self.pre)
        return torch.from_numpy(normalized).contiguous(memory_format=torch.channels_last)

    def prepare(self, model: TransferModel, images: np.ndarray, name: str) -> torch.Tensor:
        """More images (DANN's target domain) in the form of the splits: cached like them, or as they are."""
        return prepare_split(model, images, self.pre, self.start, name) if self.cached else torch.from_numpy(images)


def caches_inputs(config: TrainConfig, augment: str) -> bool:
    """Whether training runs on cached frozen-prefix outputs (fixed inputs: teacher logits can be cached too)."""
    return config.strategy == "linear_probe" or (config.strategy == "partial" and augment == "none")


def frozen_stage_count(model: TransferModel, config: TrainConfig) -> int:
    """How many leading stages (stem, blocks, neck) the strategy freezes. Raises RecipeError for a too-large
    `train.unfreeze`."""
    stage_count = len(model.stages)  # stem + blocks + neck
    if config.strategy == "linear_probe":
        return stage_count
    if config.strategy == "finetune":
        return 0
    if config.unfreeze > model.num_blocks:
        raise RecipeError(
            f"`train.unfreeze` is {config.unfreeze}, but this backbone has {model.num_blocks} stages; "
            f"use 1..{model.num_blocks}, or strategy finetune to train everything."
        )
    return 1 + model.num_blocks - config.unfreeze


def prepare_inputs(
    model: TransferModel, dataset: Dataset, pre: Preprocessing, stop: int, cache: bool, gather=None
) -> Inputs:
    """The splits as images, or (with `cache`) as the outputs of the model's first `stop` stages.

    `gather(compute, images)` spreads the frozen prefix's work: under torchrun each rank computes a share
    of the images and every rank gets all the outputs (`edgetl.train.distributed.gather_rows`).
    """
    splits = ("train", "val", "test")
    if not cache:
        return Inputs(*(torch.from_numpy(dataset.split(s).images) for s in splits), start=0, cached=False, pre=pre)
    gather = gather or (lambda compute, images: compute(images))
    cached = [
        gather(lambda part, name=name: prepare_split(model, part, pre, stop, name), dataset.split(name).images)
        for name in splits
    ]
    return Inputs(*cached, start=stop, cached=True, pre=pre)


def prepare_split(model: TransferModel, images: np.ndarray, pre: Preprocessing, stop: int, name: str) -> torch.Tensor:
    """The frozen prefix's outputs for uint8 images, computed once on the model's device, kept in host memory."""
    model.eval()
    device = next(model.parameters()).device

    def prefix(batch: np.ndarray) -> torch.Tensor:
        return model.features(torch.from_numpy(normalize(batch, pre)).to(device), 0, stop).cpu()

    outputs = in_batches(prefix, images, description=f"frozen features {name}")
    return torch.cat(outputs).clone()  # clone: leave inference mode so autograd can use them


def augmenter(augment: str, size: int):
    """The train-time augmentation of `data.augment` for `size`-pixel crops; None for `none`."""
    if augment == "none":
        return None
    from torchvision.transforms import v2

    steps = [v2.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    if augment == "strong":
        steps.append(v2.TrivialAugmentWide())
    return v2.Compose(steps)
