"""Train stage: linear probe, partial or full fine-tuning of a TransferModel.

- `run` / `Trainer` (trainer.py): the training run; `BestEpoch` and its notes (best.py).
- device.py / distributed.py: the device and precision it runs in, and torchrun's processes (DDP).
- inputs.py: what makes it fast on a laptop CPU, the frozen prefix run once per image.
- `LossTerm` / `TrainBatch` (terms.py): what distillation and DANN add to the label loss.
- `TrainedModel` (trained.py): the stage folder's files (checkpoint.pt, train.json, logits).
"""

from edgetl.train.best import SMALL_VAL_SPLIT, BestEpoch, ranking_notes
from edgetl.train.inputs import augments_images, caches_inputs
from edgetl.train.terms import LossTerm, TrainBatch
from edgetl.train.trained import CHECKPOINT, TrainedModel, save_result
from edgetl.train.trainer import Trainer, TrainJob, TrainResult, run

__all__ = [
    "CHECKPOINT",
    "SMALL_VAL_SPLIT",
    "BestEpoch",
    "LossTerm",
    "TrainBatch",
    "TrainJob",
    "TrainResult",
    "TrainedModel",
    "Trainer",
    "augments_images",
    "caches_inputs",
    "ranking_notes",
    "run",
    "save_result",
]
