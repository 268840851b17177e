"""The build context: what every stage of one build shares, made once and passed once.

Before it, each stage function took the cache, the run folder, the seed, the preprocessing,
the dataset, the threads and the timings as separate arguments (8–9 of them); now a stage
takes the context and what is its own (the model it exports, the variant it quantizes).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgetl.cache import StageCache
from edgetl.data import Dataset
from edgetl.models import BackboneSpec
from edgetl.multitask import readout_for
from edgetl.recipe import Recipe
from edgetl.runtime.preprocess import Preprocessing
from edgetl.runtime.readout import Readout
from edgetl.train.distributed import Dist


@dataclass(frozen=True)
class BuildContext:
    """One build's recipe, run folder, stage cache, backbone, preprocessing contract and data.

    `timings` is the one mutable part: each stage adds the seconds it took in this build.
    """

    recipe: Recipe
    run_dir: Path
    cache: StageCache
    spec: BackboneSpec
    pre: Preprocessing
    dataset: Dataset
    resume: bool = False
    dist: Dist = Dist()  # this process's place in a torchrun launch (rank 0 of 1 for a plain build)
    timings: dict[str, float] = field(default_factory=dict)
    on_epoch: Callable[[dict], None] | None = None  # the train stage's per-epoch history rows, as made (sweeps)

    def snapshot_path(self, stage: str, stage_key: str) -> Path:
        """Where an unfinished training of this stage keeps its resumable snapshot."""
        return self.run_dir / "state" / f"{stage}-{stage_key}.pt"

    def readout(self, val_logits: np.ndarray | None) -> Readout:
        """How the trained model's answers are read (its task's), multi-label thresholds tuned on the val split
        from the model's `val_logits`: cheap enough to recompute in each stage that needs it."""
        return readout_for(val_logits, self.dataset.val.labels, self.dataset.val.tasks)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Record the block's seconds as `timings[name]` (0.0-ish when its stage was reused)."""
        started = time.monotonic()
        yield
        self.timings[name] = round(time.monotonic() - started, 2)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
