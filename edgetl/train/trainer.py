"""Train stage: linear probe, partial or full fine-tuning of a TransferModel.

A `Trainer` sets a run up (threads, frozen stages, cached inputs, optimizer, schedule, label
loss, augmentation), restores the resumable snapshot, trains one epoch at a time and evaluates
each on the val split, keeping the best one (`BestEpoch`). Distillation and domain adaptation
are loss terms (`edgetl.train.terms`) that the loop adds up without knowing which they are.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgetl.data import Dataset
from edgetl.datacache import default_root
from edgetl.errors import RecipeError
from edgetl.fileio import save_torch
from edgetl.infer import accuracy, in_batches, model_logits
from edgetl.models import TransferModel
from edgetl.notes import Note, render
from edgetl.progress import track
from edgetl.recipe import TrainConfig
from edgetl.runtime.preprocess import Preprocessing
from edgetl.train import distributed
from edgetl.train.best import BestEpoch, ranking_notes, val_loss
from edgetl.train.device import Placement, cpu_state, get_rng, resolve_device, resolve_precision, set_rng
from edgetl.train.distributed import Dist, TrainStep, gather_rows, shard
from edgetl.train.inputs import (
    ArrayLike,
    augmenter,
    augments_images,
    caches_inputs,
    default_workers,
    frozen_stage_count,
    prepare_inputs,
    train_loader,
)
from edgetl.train.optim import criterion, epoch_order, optimizer, schedule
from edgetl.train.terms import LossTerm, TrainBatch

log = logging.getLogger(__package__)  # "edgetl.train": the stage's name in build.log


@dataclass(frozen=True)
class TrainJob:
    """What to train on and how."""

    dataset: Dataset
    pre: Preprocessing
    config: TrainConfig
    augment: str  # data.augment
    seed: int  # seeds the epoch order and DANN's target picks
    dist: Dist = Dist()  # this process's place in a torchrun launch
    cache_dir: Path | None = None  # data.cache_dir: where frozen features are cached (None: the default)
    workers: int | None = None  # data.workers: DataLoader worker processes (None: `inputs.default_workers()`)
    on_epoch: Callable[[dict], None] | None = None  # called with each epoch's history row (a sweep's early stopping)


@dataclass(frozen=True)
class TrainResult:
    model: TransferModel  # the best epoch's weights, in eval mode
    history: list[dict]  # per epoch: epoch, train_loss, val_accuracy, val_loss, lr, seconds
    best_epoch: int
    val_accuracy: float
    test_accuracy: float
    seconds: float
    notes: list[Note] = field(default_factory=list)
    test_logits: np.ndarray | None = None  # the best model's, reused as validation's PyTorch reference
    val_logits: np.ndarray | None = None  # the best epoch's, reused as the export parity check's reference
    device: str = "cpu"  # where it trained (rank 0's device under torchrun)
    precision: str = "fp32"
    world_size: int = 1  # training processes


def run(
    model: TransferModel,
    job: TrainJob,
    terms: Sequence[LossTerm] = (),
    snapshot: Path | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train `model` on `job.dataset` with the recipe's strategy; keep the best epoch by val accuracy,
    ties broken by the lower val loss.

    `snapshot` gets a resumable snapshot after every epoch; with `resume`, training continues
    from it and ends where an uninterrupted run would have. `terms` add their losses to the
    label loss (distillation's soft targets, DANN's domain loss).
    Raises RecipeError when the loss or the weights become non-finite (the recipe's values diverge),
    or when `train.unfreeze` exceeds the backbone's stages.

    >>> run(model, TrainJob(dataset, pre, recipe.train, "none", seed=0)).test_accuracy
    """
    with distributed.peer_errors(job.dist):  # a rank that died ends the others with one clear error
        trainer = Trainer(model, job, terms, snapshot)
        if resume:
            trainer.restore()
        trainer.fit()
        return trainer.finish()


class Trainer:
    """One training run, step by step: `restore`, `fit` (epochs of `train_epoch` and `evaluate`), `finish`."""

    def __init__(
        self, model: TransferModel, job: TrainJob, terms: Sequence[LossTerm] = (), snapshot: Path | None = None
    ) -> None:
        self.started = time.monotonic()
        self.model, self.job, self.config, self.terms, self.snapshot = model, job, job.config, list(terms), snapshot
        self.notes: list[Note] = []
        self.dist = dist = job.dist
        torch.set_num_threads(distributed.threads_per_process(dist, self.config.threads))
        frozen = frozen_stage_count(model, self.config)
        model.freeze_prefix(frozen)
        device = resolve_device(self.config.device, dist.local_rank, dist.enabled)
        self.place = Placement(device, resolve_precision(self.config.precision, device))
        # channels_last: 1.5× faster conv backward on CPU (3.2 → 2.1 s per lite0 batch of 32), and the layout
        # tensor cores take on CUDA
        model.to(device, memory_format=torch.channels_last)
        if self.config.strategy == "linear_probe" and job.augment != "none":
            self._note(Note("augment_not_applied", {"augment": job.augment}), logging.WARNING)
        cache = caches_inputs(self.config, job.augment)
        root, frames = job.cache_dir or default_root(), augments_images(self.config, job.augment)
        gather = self._gather if dist.enabled else None
        self.inputs = prepare_inputs(model, job.dataset, job.pre, frozen if cache else None, root, frames, gather)
        for term in self.terms:
            term.prepare(self.inputs.cached)
            term.to(device)
        self.target = self._target()
        self.train_labels = torch.from_numpy(job.dataset.train.labels)
        self.num_classes = len(job.dataset.classes)
        self.generator = torch.Generator().manual_seed(job.seed)  # the same global epoch order on every rank
        # DDP broadcasts rank 0's weights, so every rank starts alike; dropout and augmentation draw per rank
        self.step = distributed.wrap(TrainStep(model, self.terms, self.inputs.start), dist, device)
        if dist.rank:
            torch.manual_seed(job.seed + 1_000_003 * dist.rank)
        self.optimizer = optimizer(model, self.config, [p for term in self.terms for p in term.parameters()])
        self.scaler = self.place.scaler()
        # train.batch_size is the global batch: each of N processes takes its 1/N
        self.batch_size = math.ceil(self.config.batch_size / dist.world_size)
        steps_per_epoch = math.ceil(len(shard(torch.arange(len(self.train_labels)), dist)) / self.batch_size)
        self.schedule = schedule(self.optimizer, self.config, steps_per_epoch)
        self.tasks = job.dataset.train.tasks  # a multi-task build's: their summed loss and mean primary metric
        self.criterion = criterion(self.config, self.train_labels, self.num_classes, self.tasks).to(device)
        self.label_weight = math.prod(term.label_weight for term in self.terms)
        self.augmenter = augmenter(job.augment, job.pre.input_size) if not self.inputs.cached else None
        self.history: list[dict] = []
        self.best = BestEpoch(0, -1.0, math.inf, cpu_state(model))
        self.first_epoch = 1

    def restore(self) -> None:
        """Continue from the snapshot when there is one: the next epoch runs as in an uninterrupted run."""
        found = self.dist.is_main and self.snapshot is not None and self.snapshot.is_file()
        # rank 0's snapshot, read by every rank (other nodes need not see rank 0's disk)
        snapshot = distributed.from_main(
            torch.load(self.snapshot, map_location="cpu", weights_only=False) if found else None, self.dist
        )
        if snapshot is None:
            return
        self.model.load_state_dict(snapshot["model"])
        # Snapshots written before loss terms kept the DANN classifier's state as "adversary".
        states = snapshot.get("terms") or {"domain classifier": snapshot.get("adversary")}
        for term in self.terms:
            term.load_state_dict(states.get(term.name) or {})
        self.optimizer.load_state_dict(snapshot["optimizer"])
        self.schedule.load_state_dict(snapshot["schedule"])
        self.generator.set_state(snapshot["generator"])
        ranks = snapshot.get("rng_by_rank") or []  # each rank's dropout and augmentation streams
        if len(ranks) == self.dist.world_size:
            set_rng(ranks[self.dist.rank])
        else:  # a single-process snapshot, or another world size: rank 0's stream
            torch.set_rng_state(snapshot["torch_rng"])
        self.history, self.best = snapshot["history"], BestEpoch.from_dict(snapshot["best"])
        self.first_epoch = snapshot["epoch"] + 1
        log.info("resuming from epoch %d of %d", snapshot["epoch"], self.config.epochs)

    def fit(self) -> None:
        """Epochs up to `train.epochs`, or until `train.patience` epochs in a row were no better."""
        config = self.config
        for epoch in range(self.first_epoch, config.epochs + 1):
            if config.patience and epoch - self.best.epoch > config.patience:
                self._note(Note("early_stop", {"epoch": epoch - 1, "patience": config.patience}))
                break
            started = time.monotonic()
            train_loss = self.train_epoch(epoch)
            val_logits, val_accuracy, val_loss = self.evaluate()
            improved = self.best.beaten_by(val_accuracy, val_loss)
            if improved:
                self.best = BestEpoch(epoch, val_accuracy, val_loss, cpu_state(self.model), val_logits)
            self.history.append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "val_accuracy": val_accuracy,
                    "val_loss": val_loss,
                    "lr": self.schedule.get_last_lr()[0],
                    "seconds": round(time.monotonic() - started, 3),
                }
            )
            log.info(
                "epoch %d/%d  loss %.4f  val_acc %.4f  val_loss %.4f%s  (%.1fs)",
                epoch,
                config.epochs,
                train_loss,
                val_accuracy,
                val_loss,
                "  best" if improved else "",
                self.history[-1]["seconds"],
            )
            if self.snapshot is not None:
                self.save_snapshot(epoch)
            if self.job.on_epoch is not None:
                self.job.on_epoch(self.history[-1])

    def train_epoch(self, epoch: int) -> float:
        """One pass over the train split; returns the mean train loss.

        Raises RecipeError when the loss or a weight becomes non-finite.
        """
        self.step.train()  # the model and the loss terms
        order = epoch_order(self.train_labels, self.config.class_balance, self.generator, self.num_classes)
        order = shard(order, self.dist)  # this rank's share of the global order (all of it in one process)
        size = self.batch_size
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        # pin_memory: page-locked batches copy to a CUDA device asynchronously
        # workers' seeds: a function of the run's seed, the epoch and the rank only (each rank augments its own way)
        seed = (self.job.seed * 1_000_003 + epoch) * 4099 + self.dist.rank
        pin = self.place.device.type == "cuda"
        workers = default_workers(self.dist.local_world_size) if self.job.workers is None else self.job.workers
        loader = train_loader(self.inputs, self.augmenter, batches, workers, pin, seed)
        total = 0.0
        description = f"epoch {epoch}/{self.config.epochs}"
        for step, (x, index) in enumerate(track(loader, total=len(batches), description=description)):
            progress = ((epoch - 1) * len(batches) + step) / (self.config.epochs * len(batches))
            with self.place.autocast():
                loss = self._loss(x, index, progress)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()  # DDP all-reduces the gradients here
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.schedule.step()
            step_loss = loss.item()
            if not math.isfinite(step_loss):
                raise _diverged(
                    self.config, epoch, f"the training loss became {step_loss} at step {step + 1} of {len(batches)}"
                )
            total += step_loss * len(index)
        distributed.broadcast_buffers(self.model, self.dist)  # evaluate (and keep) rank 0's BatchNorm statistics
        self._check_finite_weights(epoch)
        total, count = distributed.sum_across([total, len(order)], self.dist)
        return total / count

    def evaluate(self) -> tuple[np.ndarray, float, float]:
        """The val split's logits (all of them on every rank), accuracy (mAP for label sets) and loss."""
        logits = self._logits(self.inputs.val)
        labels = self.job.dataset.val.labels
        return logits, accuracy(logits, labels, self.tasks), val_loss(logits, labels, self.tasks)

    def finish(self) -> TrainResult:
        """The best epoch's model (eval mode, contiguous weights, on the CPU in fp32: export, quantization and
        validation run there), measured on the test split."""
        for note in ranking_notes(self.history, self.best.epoch, len(self.job.dataset.val.labels)):
            self._note(note)
        self.model.load_state_dict(self.best.state)
        self.model.eval()
        val_logits = self.best.val_logits
        if self.place.exact:
            self.model.to(memory_format=torch.contiguous_format)
            test_logits = self._logits(self.inputs.test)
        else:  # the references parity and validation compare with are the CPU FP32 model's, not autocast's
            self.model.to("cpu", memory_format=torch.contiguous_format)
            dataset, pre = self.job.dataset, self.job.pre
            val_logits, test_logits = (self._cpu_logits(split.images, pre) for split in (dataset.val, dataset.test))
        test_accuracy = accuracy(test_logits, self.job.dataset.test.labels, self.tasks)
        return TrainResult(
            self.model,
            self.history,
            self.best.epoch,
            self.best.accuracy,
            test_accuracy,
            time.monotonic() - self.started,
            self.notes,
            test_logits,
            val_logits,
            str(self.place.device),
            self.place.precision,
            self.dist.world_size,
        )

    def save_snapshot(self, epoch: int) -> None:
        """Everything `restore` needs to continue after `epoch` as if never interrupted (rank 0 writes it)."""
        rng_by_rank = distributed.all_objects(get_rng(self.place.device), self.dist)
        if not self.dist.is_main:
            return
        state = {
            "model": self.model.state_dict(),
            "terms": {term.name: term.state_dict() for term in self.terms},
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "rng_by_rank": rng_by_rank,
            "history": self.history,
            "best": self.best.to_dict(),
            "epoch": epoch,
        }
        save_torch(state, self.snapshot)

    def _loss(self, x: torch.Tensor, index: torch.Tensor, progress: float) -> torch.Tensor:
        """The step's loss for model inputs `x` of the train split's rows `index`: the label loss times the
        terms' label weights, plus each term's loss."""
        x = stacked = self.inputs.on_device(self.place.put(x))
        if self.target is not None:  # one pass over both domains: BatchNorm sees (and keeps) the statistics of both
            pick = distributed.rank_draw(len(self.target), len(index), self.generator, self.dist)
            target = self.inputs.model_input(self.target[pick.numpy()], self.augmenter)
            stacked = torch.cat([x, self.place.put(target)])
        features, logits = self.step(stacked, len(index))
        features, target_features = features.split(len(index)) if self.target is not None else (features, None)
        batch = TrainBatch(index, x, self.place.put(self.train_labels[index]), target_features)
        loss = self.criterion(logits, batch.labels)
        if self.label_weight != 1.0:
            loss = self.label_weight * loss
        for term in self.terms:
            loss = loss + term.loss(batch, logits, features, progress)
        return loss

    def _logits(self, data: ArrayLike) -> np.ndarray:
        """(N, classes) float32 logits of a split's inputs, every rank computing its share."""
        self.model.eval()

        def forward(batch: torch.Tensor) -> torch.Tensor:
            x = self.place.put(self.inputs.model_input(batch))
            with self.place.autocast():
                return self.model.head(self.model.features(x, self.inputs.start)).float().cpu()

        def share(part: torch.Tensor) -> torch.Tensor:
            outputs = in_batches(forward, part)
            return torch.cat(outputs) if outputs else torch.zeros((0, self.model.head.out_features))

        return self._gather(share, data).numpy()

    def _cpu_logits(self, images: np.ndarray, pre: Preprocessing) -> np.ndarray:
        """The CPU FP32 model's logits of uint8 images, every rank computing its share."""
        return self._gather(lambda part: torch.from_numpy(model_logits(self.model, part, pre)), images).numpy()

    def _gather(self, compute, items) -> torch.Tensor:
        return gather_rows(compute, items, self.dist)

    def _target(self) -> ArrayLike | None:
        """The target-domain images a loss term asks for, prepared like the train split."""
        wanted = [term for term in self.terms if term.target_images is not None]
        if len(wanted) > 1:
            names = [term.name for term in wanted]
            raise ValueError(f"loss terms {names} each bring target images; a training run supports one set")
        return self.inputs.prepare(self.model, wanted[0].target_images, "target") if wanted else None

    def _check_finite_weights(self, epoch: int) -> None:
        """Raises RecipeError when an update left a weight NaN or infinite (the last step's loss can still look
        finite)."""
        named = list(self.model.named_parameters())
        for term in self.terms:
            named += [(f"{term.name} {name}", p) for name, p in term.named_parameters()]
        bad = [name for name, p in named if not torch.isfinite(p).all()]
        if bad:
            listing = ", ".join(bad[:3]) + (" …" if len(bad) > 3 else "")
            raise _diverged(self.config, epoch, f"weights became NaN or infinite ({listing})")

    def _note(self, note: Note, level: int = logging.INFO) -> None:
        self.notes.append(note)
        log.log(level, render(note))


def _diverged(config: TrainConfig, epoch: int, what: str) -> RecipeError:
    return RecipeError(
        f"training diverged in epoch {epoch}: {what}. The recipe's values make the updates blow up (`train.lr` "
        f"{config.lr:g}, `train.weight_decay` {config.weight_decay:g}, `train.batch_size` {config.batch_size}); "
        f"lower `train.lr` (e.g. {config.lr / 10:g}) or `train.weight_decay`, and rerun."
    )
