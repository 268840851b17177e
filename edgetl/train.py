"""Train stage: linear probe, partial or full fine-tuning of a TransferModel.

What makes it fast on a laptop CPU: whatever is frozen runs once per image, not once per
epoch. `linear_probe` caches the pooled features and trains the head in seconds;
`partial` without augmentation caches the frozen prefix's output.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgetl.adapt import DomainAdversary
from edgetl.data import Dataset
from edgetl.distill import Distiller
from edgetl.errors import RecipeError
from edgetl.infer import EVAL_BATCH, accuracy
from edgetl.fileio import save_torch
from edgetl.models import TransferModel
from edgetl.progress import track
from edgetl.recipe import TrainConfig
from edgetl.runtime.preprocess import Preprocessing, normalize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    model: TransferModel  # the best epoch's weights, in eval mode
    history: list[dict]  # per epoch: epoch, train_loss, val_accuracy, val_loss, lr, seconds
    best_epoch: int
    val_accuracy: float
    test_accuracy: float
    seconds: float
    notes: list[str] = field(default_factory=list)
    test_logits: np.ndarray | None = None  # the best model's, reused as validation's PyTorch reference
    val_logits: np.ndarray | None = None  # the best epoch's, reused as the export parity check's reference


@dataclass(frozen=True)
class _Inputs:
    """What the trainable part of the model eats: images, or cached frozen-prefix outputs."""

    train: torch.Tensor  # uint8 (N, S, S, 3) images, or float32 cached activations
    val: torch.Tensor
    test: torch.Tensor
    start: int  # the first stage to run on them
    cached: bool


def run(model: TransferModel, dataset: Dataset, config: TrainConfig, pre: Preprocessing, augment: str, seed: int, state_path: Path | None = None, resume: bool = False,
        distiller: Distiller | None = None, adversary: DomainAdversary | None = None) -> TrainResult:
    """Train `model` on `dataset` with the recipe's strategy; keep the best epoch by val accuracy,
    ties broken by the lower val loss.

    `state_path` gets a resumable snapshot after every epoch; with `resume`, training
    continues from it and ends where an uninterrupted run would have. `distiller` mixes a
    teacher's soft targets into the loss; `adversary` adds DANN's domain loss on its target images.
    Raises RecipeError when the loss or the weights become non-finite (the recipe's values diverge).
    """
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    started = time.monotonic()
    notes: list[str] = []
    frozen = _frozen_stage_count(model, config)
    model.freeze_prefix(frozen)
    model.to(memory_format=torch.channels_last)  # 1.5× faster conv backward on CPU (3.2 → 2.1 s per lite0 batch of 32)
    if config.strategy == "linear_probe" and augment != "none":
        notes.append(f"data.augment={augment} was not applied: linear_probe computes features once per image. Use strategy partial or finetune to train with augmentation.")
        log.warning(notes[-1])
    cache = caches_inputs(config, augment)
    inputs = _prepare_inputs(model, dataset, pre, frozen if cache else 0, cache)
    if distiller is not None and inputs.cached:
        distiller.cache_logits()
    target = _prepare_split(model, adversary.target_images, pre, inputs.start, "target") if adversary is not None and inputs.cached else None
    train_labels = torch.from_numpy(dataset.train.labels)
    num_classes = len(dataset.classes)

    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(train_labels) / config.batch_size)
    optimizer = _optimizer(model, config, adversary)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch))
    criterion = nn.CrossEntropyLoss(weight=_class_weights(train_labels, num_classes) if config.class_balance == "weighted_loss" else None, label_smoothing=config.label_smoothing)
    augmenter = _augmenter(augment, pre.input_size) if not inputs.cached else None

    history: list[dict] = []
    best = {"epoch": 0, "accuracy": -1.0, "loss": math.inf, "state": copy.deepcopy(model.state_dict())}
    first_epoch = 1
    if resume and state_path is not None and state_path.is_file():
        snapshot = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(snapshot["model"])
        if adversary is not None:
            adversary.load_state_dict(snapshot["adversary"])
        optimizer.load_state_dict(snapshot["optimizer"])
        schedule.load_state_dict(snapshot["schedule"])
        generator.set_state(snapshot["generator"])
        torch.set_rng_state(snapshot["torch_rng"])
        history, best, first_epoch = snapshot["history"], snapshot["best"], snapshot["epoch"] + 1
        log.info("resuming from epoch %d of %d", snapshot["epoch"], config.epochs)

    for epoch in range(first_epoch, config.epochs + 1):
        if config.patience and epoch - best["epoch"] > config.patience:
            notes.append(f"early stop after epoch {epoch - 1}: val accuracy (ties: val loss) had not improved "
                         f"for {config.patience} epochs")
            log.info(notes[-1])
            break
        epoch_start = time.monotonic()
        model.train()
        if adversary is not None:
            adversary.train()
        order = _epoch_order(train_labels, config.class_balance, generator, num_classes)
        total_loss = 0.0
        batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        for step, index in enumerate(track(batches, total=len(batches), description=f"epoch {epoch}/{config.epochs}")):
            x = _model_input(inputs.train[index], inputs, pre, augmenter)
            if adversary is None:
                features = model.features(x, inputs.start)
            else:  # one pass over source and target: BatchNorm sees (and keeps) the statistics of both domains at once
                pick = torch.randint(len(adversary.target_images), (len(index),), generator=generator)
                raw_target = target[pick] if target is not None else torch.from_numpy(adversary.target_images[pick.numpy()])
                features, target_features = model.features(torch.cat([x, _model_input(raw_target, inputs, pre, augmenter)]), inputs.start).split(len(index))
            logits = model.head(model.dropout(features))
            loss = criterion(logits, train_labels[index])
            if distiller is not None:
                loss = distiller.loss(loss, logits, index, None if inputs.cached else x)
            if adversary is not None:
                progress = ((epoch - 1) * len(batches) + step) / (config.epochs * len(batches))
                loss = loss + adversary.loss(features, target_features, progress)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step_loss = loss.item()
            if not math.isfinite(step_loss):
                raise _diverged(config, epoch, f"the training loss became {step_loss} at step {step + 1} of "
                                               f"{len(batches)}")
            total_loss += step_loss * len(index)
        _check_finite_weights(model, adversary, config, epoch)
        val_logits = _logits(model, inputs.val, inputs, pre)
        val_accuracy = accuracy(val_logits, dataset.val.labels)
        # Plain cross-entropy (no smoothing, no class weights): it ranks epochs the val accuracy ties.
        val_labels = torch.from_numpy(dataset.val.labels).long()
        val_loss = float(nn.functional.cross_entropy(torch.from_numpy(val_logits), val_labels))
        # Snapshots written before val loss was kept have no "loss".
        improved = (val_accuracy, -val_loss) > (best["accuracy"], -best.get("loss", math.inf))
        if improved:
            best = {"epoch": epoch, "accuracy": val_accuracy, "loss": val_loss,
                    "state": copy.deepcopy(model.state_dict()), "val_logits": val_logits}
        history.append({"epoch": epoch, "train_loss": total_loss / len(order), "val_accuracy": val_accuracy,
                        "val_loss": val_loss, "lr": schedule.get_last_lr()[0],
                        "seconds": round(time.monotonic() - epoch_start, 3)})
        log.info("epoch %d/%d  loss %.4f  val_acc %.4f  val_loss %.4f%s  (%.1fs)", epoch, config.epochs,
                 history[-1]["train_loss"], val_accuracy, val_loss, "  best" if improved else "",
                 history[-1]["seconds"])
        if state_path is not None:
            _snapshot(state_path, model, optimizer, schedule, generator, history, best, epoch, adversary)

    for note in _ranking_notes(history, best["epoch"], len(dataset.val.labels)):
        notes.append(note)
        log.info(note)
    model.load_state_dict(best["state"])
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    test_logits = _logits(model, inputs.test, inputs, pre)
    test_accuracy = accuracy(test_logits, dataset.test.labels)
    return TrainResult(model, history, best["epoch"], best["accuracy"], test_accuracy, time.monotonic() - started, notes, test_logits, best.get("val_logits"))


# Below this many val images one image moves val accuracy by over 2 points, more than late
# epochs usually differ by: their ranking is then mostly noise, and the report says so.
SMALL_VAL_SPLIT = 50


def _ranking_notes(history: list[dict], best_epoch: int, val_images: int) -> list[str]:
    """The report's notes when the val split cannot rank epochs: too small, or tied (saturated) at the top."""
    notes = []
    if val_images < SMALL_VAL_SPLIT:
        notes.append(f"the val split has {val_images} images (one image = {100 / val_images:.1f} points of val "
                     f"accuracy), too few to rank epochs reliably (under {SMALL_VAL_SPLIT}); add images or raise "
                     "`data.val_split`")
    top = max((h["val_accuracy"] for h in history), default=None)
    tied = [h["epoch"] for h in history if h["val_accuracy"] == top]
    if len(tied) > 1:
        level = "1.0 (saturated)" if top == 1.0 else f"{top:.4f}"
        notes.append(f"val accuracy was {level} at {len(tied)} epochs ({', '.join(map(str, tied))}), so it cannot rank "
                     f"them: epoch {best_epoch} was kept for the lowest val loss among them")
    return notes


def _check_finite_weights(model: TransferModel, adversary: DomainAdversary | None, config: TrainConfig,
                          epoch: int) -> None:
    """Raises RecipeError when an update left a weight NaN or infinite (the last step's loss can still look finite)."""
    named = list(model.named_parameters())
    if adversary is not None:
        named += [(f"domain classifier {name}", p) for name, p in adversary.named_parameters()]
    bad = [name for name, p in named if not torch.isfinite(p).all()]
    if bad:
        listing = ", ".join(bad[:3]) + (" …" if len(bad) > 3 else "")
        raise _diverged(config, epoch, f"weights became NaN or infinite ({listing})")


def _diverged(config: TrainConfig, epoch: int, what: str) -> RecipeError:
    return RecipeError(
        f"training diverged in epoch {epoch}: {what}. The recipe's values make the updates blow up (`train.lr` "
        f"{config.lr:g}, `train.weight_decay` {config.weight_decay:g}, `train.batch_size` {config.batch_size}); "
        f"lower `train.lr` (e.g. {config.lr / 10:g}) or `train.weight_decay`, and rerun."
    )


def caches_inputs(config: TrainConfig, augment: str) -> bool:
    """Whether training runs on cached frozen-prefix outputs (fixed inputs: teacher logits can be cached too)."""
    return config.strategy == "linear_probe" or (config.strategy == "partial" and augment == "none")


def _frozen_stage_count(model: TransferModel, config: TrainConfig) -> int:
    stage_count = len(model.stages)  # stem + blocks + neck
    if config.strategy == "linear_probe":
        return stage_count
    if config.strategy == "finetune":
        return 0
    if config.unfreeze > model.num_blocks:
        raise RecipeError(f"`train.unfreeze` is {config.unfreeze}, but this backbone has {model.num_blocks} stages; use 1..{model.num_blocks}, or strategy finetune to train everything.")
    return 1 + model.num_blocks - config.unfreeze


def _prepare_inputs(model: TransferModel, dataset: Dataset, pre: Preprocessing, stop: int, cache: bool) -> _Inputs:
    if not cache:
        return _Inputs(*(torch.from_numpy(dataset.split(s).images) for s in ("train", "val", "test")), start=0, cached=False)
    cached = [_prepare_split(model, dataset.split(split).images, pre, stop, split) for split in ("train", "val", "test")]
    return _Inputs(*cached, start=stop, cached=True)


def _prepare_split(model: TransferModel, images: np.ndarray, pre: Preprocessing, stop: int, name: str) -> torch.Tensor:
    """The frozen prefix's outputs for uint8 images, computed once."""
    model.eval()
    outputs = []
    with torch.inference_mode():
        for i in track(range(0, len(images), EVAL_BATCH), total=math.ceil(len(images) / EVAL_BATCH), description=f"frozen features {name}"):
            outputs.append(model.features(torch.from_numpy(normalize(images[i : i + EVAL_BATCH], pre)), 0, stop))
    return torch.cat(outputs).clone()  # clone: leave inference mode so autograd can use them


def _augmenter(augment: str, size: int):
    if augment == "none":
        return None
    from torchvision.transforms import v2

    steps = [v2.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    if augment == "strong":
        steps.append(v2.TrivialAugmentWide())
    return v2.Compose(steps)


def _model_input(batch: torch.Tensor, inputs: _Inputs, pre: Preprocessing, augmenter) -> torch.Tensor:
    if inputs.cached:
        return batch.contiguous(memory_format=torch.channels_last) if batch.dim() == 4 else batch
    images = batch.permute(0, 3, 1, 2)  # (N, 3, S, S) uint8
    if augmenter is not None:
        images = torch.stack([augmenter(image) for image in images])
    return torch.from_numpy(normalize(images.permute(0, 2, 3, 1).numpy(), pre)).contiguous(memory_format=torch.channels_last)


def _logits(model: TransferModel, data: torch.Tensor, inputs: _Inputs, pre: Preprocessing) -> np.ndarray:
    model.eval()
    outputs = []
    with torch.inference_mode():
        for i in range(0, len(data), EVAL_BATCH):
            outputs.append(model.head(model.features(_model_input(data[i : i + EVAL_BATCH], inputs, pre, None), inputs.start)))
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, model.head.out_features), np.float32)


def _optimizer(model: TransferModel, config: TrainConfig, adversary: DomainAdversary | None) -> torch.optim.Optimizer:
    backbone = [p for p in model.stages.parameters() if p.requires_grad]
    groups = [{"params": list(model.head.parameters()) + (list(adversary.parameters()) if adversary is not None else []), "lr": config.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": config.lr * config.backbone_lr_mult})
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def _warmup_cosine(warmup_steps: float, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=num_classes).float()
    return counts.sum() / (num_classes * counts.clamp(min=1))


def _epoch_order(labels: torch.Tensor, balance: str, generator: torch.Generator, num_classes: int) -> torch.Tensor:
    if balance == "balanced_sampler":  # draw with replacement, each class equally likely
        weights = _class_weights(labels, num_classes)[labels]
        return torch.multinomial(weights, len(labels), replacement=True, generator=generator)
    return torch.randperm(len(labels), generator=generator)


def _snapshot(path: Path, model, optimizer, schedule, generator, history, best, epoch: int, adversary: DomainAdversary | None) -> None:
    state = {"model": model.state_dict(), "adversary": adversary.state_dict() if adversary is not None else None, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "history": history, "best": best, "epoch": epoch}
    save_torch(state, path)
