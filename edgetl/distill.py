"""Knowledge distillation: the student learns from a bigger teacher's softened logits.

Teacher logits are computed once per training image (at the teacher's own resolution and
preprocessing) when the student sees no augmentation, and online when it does: then the
teacher sees the student's augmented view, resized to its input size, because distillation
works when teacher and student look at the same view ("a good teacher is patient and
consistent", Beyer et al. 2022).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from edgetl.infer import model_logits
from edgetl.models import TransferModel
from edgetl.runtime.preprocess import Preprocessing


@dataclass(frozen=True)
class Teacher:
    model: TransferModel  # trained, eval mode
    pre: Preprocessing
    train_images: np.ndarray  # uint8 (N, S_t, S_t, 3), aligned with the student's train split


class Distiller:
    """Mixes the label loss with the KL term: alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · label loss."""

    def __init__(self, teacher: Teacher, student_pre: Preprocessing, temperature: float, alpha: float) -> None:
        self.teacher = teacher
        self.student_pre = student_pre
        self.temperature = temperature
        self.alpha = alpha
        self._table: torch.Tensor | None = None

    def cache_logits(self) -> None:
        """Run the teacher once over every training image (the student sees fixed inputs)."""
        self._table = torch.from_numpy(model_logits(self.teacher.model, self.teacher.train_images, self.teacher.pre))

    def loss(self, label_loss: torch.Tensor, logits: torch.Tensor, index: torch.Tensor, student_input: torch.Tensor | None) -> torch.Tensor:
        targets = self._table[index] if self._table is not None else self._online(student_input)
        t = self.temperature
        kd = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(targets / t, dim=1), reduction="batchmean", log_target=True) * (t * t)
        return self.alpha * kd + (1 - self.alpha) * label_loss

    def _online(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits for the student's (augmented, normalized) batch."""
        s, t = self.student_pre, self.teacher.pre
        raw = x * _channels(s.std) + _channels(s.mean)
        if t.input_size != s.input_size:
            raw = F.interpolate(raw, size=(t.input_size, t.input_size), mode="bilinear", align_corners=False, antialias=t.input_size < s.input_size)
        self.teacher.model.eval()
        with torch.no_grad():
            return self.teacher.model((raw - _channels(t.mean)) / _channels(t.std))


def _channels(values: tuple[float, float, float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1)
