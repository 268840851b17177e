"""Knowledge distillation: the student learns from a bigger teacher's softened logits.

Teacher logits are computed once per training image (at the teacher's own resolution and
preprocessing) when the student sees no augmentation, and online when it does: then the
teacher sees the student's augmented view, resized to its input size, because distillation
works when teacher and student look at the same view ("a good teacher is patient and
consistent", Beyer et al. 2022).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgetl.cache import key
from edgetl.data import images_fingerprint
from edgetl.datacache import DiskArray
from edgetl.models import TransferModel
from edgetl.runtime.preprocess import Preprocessing, normalize
from edgetl.train.inputs import cached_outputs, module_digest
from edgetl.train.terms import LossTerm, TrainBatch


@dataclass(frozen=True)
class Teacher:
    model: TransferModel  # trained, eval mode
    pre: Preprocessing
    train_images: np.ndarray | DiskArray  # uint8 (N, S_t, S_t, 3), aligned with the student's train split
    cache_dir: Path  # where its logits over them are cached (data.cache_dir)


class Distiller(LossTerm):
    """Distillation as a loss term: alpha · kd_loss(student, teacher) on top of (1 − alpha) · the label loss."""

    name = "distillation"

    def __init__(self, teacher: Teacher, student_pre: Preprocessing, temperature: float, alpha: float) -> None:
        super().__init__()
        self.teacher = teacher
        self.student_pre = student_pre
        self.temperature = temperature
        self.alpha = alpha
        self.label_weight = 1 - alpha
        self._table: torch.Tensor | None = None  # the teacher's logits per training image, when they are fixed

    def prepare(self, cached: bool) -> None:
        """With fixed student inputs, run the teacher once over every training image (or reuse its logits
        from the disk cache, keyed by the images and the teacher's weights)."""
        if cached:
            teacher = self.teacher
            teacher.model.eval()

            def logits(batch: np.ndarray) -> torch.Tensor:
                x = torch.from_numpy(normalize(batch, teacher.pre))
                return teacher.model(x.contiguous(memory_format=torch.channels_last))

            weights = module_digest(teacher.model)
            folder = teacher.cache_dir / "logits" / key(images_fingerprint(teacher.train_images), weights)
            table = cached_outputs(logits, teacher.train_images, folder, "teacher logits")
            self._table = torch.from_numpy(np.asarray(table))  # (N, classes): small, indexed every step

    def loss(self, batch: TrainBatch, logits: torch.Tensor, features: torch.Tensor, progress: float) -> torch.Tensor:
        targets = self._table[batch.index].to(logits.device) if self._table is not None else self._online(batch.inputs)
        return self.alpha * kd_loss(logits, targets, self.temperature)

    def _online(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits for the student's (augmented, normalized) batch."""
        s, t = self.student_pre, self.teacher.pre
        raw = x * _channels(s.std, x.device) + _channels(s.mean, x.device)
        if t.input_size != s.input_size:
            raw = F.interpolate(
                raw,
                size=(t.input_size, t.input_size),
                mode="bilinear",
                align_corners=False,
                antialias=t.input_size < s.input_size,
            )
        self.teacher.model.to(x.device).eval()  # the student's device (a no-op after the first batch)
        with torch.no_grad():
            return self.teacher.model((raw - _channels(t.mean, x.device)) / _channels(t.std, x.device))


def kd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(teacher_T ‖ student_T) over the batch (T² keeps its gradient's scale independent of T).

    >>> kd_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([[2.0, 0.0]]), 4.0)
    tensor(0.)
    """
    t = temperature
    return F.kl_div(
        F.log_softmax(logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)


def _channels(values: tuple[float, float, float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)
