"""The build, stage by stage: data → models → train → (export, quantize, validate, report, bundle).

Each stage is a function with typed inputs and outputs; this module only wires them
together and writes the run folder.
"""

from __future__ import annotations

import logging
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgetl import __version__, data, models, train

from edgetl.fileio import write_json
from edgetl.recipe import Recipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildResult:
    run_dir: Path
    metrics: dict


def build(recipe: Recipe, run_dir: Path, resume: bool = False) -> BuildResult:
    """Run every stage of `recipe` into `run_dir`.

    >>> build(load_recipe(Path("recipes/quickstart.yaml")), Path("runs/quickstart")).metrics["test_accuracy"]
    """
    started = time.monotonic()
    run_dir.mkdir(parents=True, exist_ok=True)
    _seed_everything(recipe.seed)
    spec = models.REGISTRY.get(recipe.model.backbone)
    pre = spec.preprocessing(recipe.data.image_size)
    log.info("backbone %s (%s), input %d px, weights %s", spec.name, spec.arch, pre.input_size, recipe.model.weights)

    dataset = data.run(recipe.data, pre, recipe.seed)
    log.info("data %s: %s images (train/val/test), %d classes, %d skipped", dataset.origin, "/".join(str(len(dataset.split(s).labels)) for s in data.SPLITS), len(dataset.classes), len(dataset.skipped))

    _seed_everything(recipe.seed)  # the head's init must not depend on how much data loading drew
    model = models.build(spec, recipe.model.weights, len(dataset.classes), recipe.model.dropout)
    state_path = run_dir / "state" / f"train-{recipe.section_hash('seed', 'model', 'train')}-{dataset.content_hash}.pt"
    if resume and not state_path.is_file():
        log.warning("--resume: no interrupted training of this recipe and data in %s; starting from epoch 1", run_dir)
    result = train.run(model, dataset, recipe.train, pre, recipe.data.augment, recipe.seed, state_path, resume)
    log.info("best epoch %d: val accuracy %.4f, test accuracy %.4f (%.1fs)", result.best_epoch, result.val_accuracy, result.test_accuracy, result.seconds)

    models.save_checkpoint(run_dir / "checkpoint.pt", result.model, spec, pre, dataset.classes, recipe)
    metrics = {
        "edgetl_version": __version__,
        "recipe": recipe.model_dump(mode="json"),
        "backbone": {"name": spec.name, "arch": spec.arch, "weights": recipe.model.weights, "weights_source": spec.weights},
        "preprocessing": pre.to_dict(),
        "dataset": dataset.summary(),
        "strategy": recipe.train.strategy,
        "history": result.history,
        "best_epoch": result.best_epoch,
        "val_accuracy": result.val_accuracy,
        "test_accuracy": result.test_accuracy,
        "train_seconds": round(result.seconds, 2),
        "build_seconds": round(time.monotonic() - started, 2),
        "notes": result.notes,
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads()},
    }
    write_json(run_dir / "metrics.json", metrics)
    state_path.unlink(missing_ok=True)  # the finished run supersedes the resumable snapshot
    return BuildResult(run_dir, metrics)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)



