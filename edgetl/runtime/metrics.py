"""What validation measured for one variant: one row of report.json's `variants`, and a bundle's `metrics`.

Torch- and numpy-free, so `edgetl info` on a device reads a bundle's metrics with the same record
the build wrote them from. A row the build writes has every field. A bundle's manifest needs only
the four numbers its schema checks (accuracy, agreement, size_mb, latency_ms.p50); any other field
may be missing there, and is then None here and left out again by `to_dict`.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any


def known_fields(cls: type, data: Any) -> dict[str, Any]:
    """The entries of `data` that are fields of the dataclass `cls` (others, from a newer edgetl, are ignored).

    Raises TypeError when `data` is not a mapping, KeyError naming the first required field it lacks.
    """
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__} must be a JSON object; got {type(data).__name__}")
    for f in fields(cls):
        if f.default is MISSING and f.name not in data:
            raise KeyError(f.name)
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def present_fields(record: Any) -> dict[str, Any]:
    """The record's fields in declaration order (report.json's key order), None ones left out."""
    return {f.name: getattr(record, f.name) for f in fields(record) if getattr(record, f.name) is not None}


@dataclass(frozen=True)
class Latency:
    """Batch-1 latency percentiles in milliseconds."""

    p50: float
    p90: float | None = None
    p99: float | None = None

    def to_dict(self) -> dict[str, float]:
        return present_fields(self)

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> Latency:
        """Raises KeyError without `p50`, TypeError when `data` is not a mapping."""
        return cls(**known_fields(cls, data))


@dataclass(frozen=True, kw_only=True)
class VariantMetrics:
    """One artifact on one runtime (or the PyTorch baseline), measured on the test split.

    Fractions are in [0, 1]; `accuracy_drop` is the baseline's accuracy minus this one's (paired
    per image), `agreement` the share of test images whose top-1 matches the baseline's.

    >>> row = VariantMetrics.from_dict(json.loads(Path("runs/quickstart/report.json").read_text())["variants"][2])
    >>> row.name, row.latency_ms.p50
    ('ort-int8', 0.51)
    """

    name: str | None = None
    runtime: str | None = None  # pytorch | onnxruntime | openvino
    precision: str | None = None  # fp32 | fp16 | int8
    file: str | None = None  # the model file's name (the checkpoint's for PyTorch)
    size_mb: float
    accuracy: float
    accuracy_ci95: list[float] | None = None  # [low, high], Wilson score interval
    agreement: float
    accuracy_drop: float | None = None
    accuracy_drop_ci95: list[float] | None = None  # [low, high]
    latency_ms: Latency
    throughput_ips: float | None = None  # images per second at `measure.throughput_batch`
    load_seconds: float | None = None  # in a fresh process
    peak_rss_mb: float | None = None  # of a fresh process that loads the file and predicts
    test_images: int | None = None
    float_layers: list[str] | None = None  # weighted layers a quantized variant keeps in float
    notes: list[str] | None = None  # sentences for the reports
    note_records: list[dict[str, Any]] | None = None  # the notes given as records, as `Note.to_dict` writes them
    confusion_matrix: list[list[int]] | None = None  # rows true class, columns predicted
    # label sets: map, micro_f1, macro_f1, exact_match, per_label_ap, thresholds, max_abs_prob_delta
    # (`accuracy` is then the test mAP, `agreement` the share of images with the baseline's label set)
    multilabel: dict[str, Any] | None = None
    tasks: dict[str, Any] | None = None  # a multi-task build's: each task's own row fields, by task name

    def to_dict(self) -> dict[str, Any]:
        """The row as report.json holds it; fields that are None are left out."""
        return present_fields(self) | {"latency_ms": self.latency_ms.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariantMetrics:
        """Read a row written by `to_dict` (or an older one); unknown keys are ignored.

        Raises KeyError naming a missing required field (size_mb, accuracy, agreement, latency_ms,
        p50), TypeError when `data` or `latency_ms` is not a mapping.
        """
        row = known_fields(cls, data)
        return cls(**row | {"latency_ms": Latency.from_dict(row["latency_ms"])})
