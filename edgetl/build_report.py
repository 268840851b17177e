"""report.json as typed records: what a build writes, and what `edgetl report` and the reports read.

`BuildReport.to_json` writes the keys in the order report.json has always had them;
`BuildReport.from_json` reads that, and reports written before later fields were added
(`transfer`, `selected.runtime`, `selected.install`, `selected.bundle_sha256`, a variant's
`note_records`): a missing optional field is None here and stays missing when written back. The
sections that only the reports display (recipe, dataset, training, transfer, quantize,
environment) stay plain JSON mappings: their stages own their shape. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from edgetl.gates import GateOutcome, Selection
from edgetl.runtime.metrics import VariantMetrics, known_fields

REPORT_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ParityOutcome:
    """One FP32 artifact against PyTorch on every validation image; a row of report.json's `export.parity`."""

    name: str
    runtime: str
    images: int
    agreement: float  # share of images whose top-1 matches PyTorch's
    max_abs_logit_delta: float  # NaN when a logit is not finite
    tolerance: float
    passed: bool
    tasks: dict[str, dict[str, Any]] | None = None  # a multi-task model's: each output's agreement, delta, passed

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k != "tasks"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParityOutcome:
        """Raises KeyError naming a missing field, TypeError when `data` is not a mapping."""
        return cls(**known_fields(cls, data))


@dataclass(frozen=True)
class ExportSummary:
    """report.json's `export`: the FP32 files and their parity with PyTorch."""

    opset: int
    onnx_nodes: int
    files: list[str]
    parity: list[ParityOutcome]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportSummary:
        """Raises KeyError naming a missing field, TypeError when a part is not a mapping."""
        summary = known_fields(cls, data)
        return cls(**summary | {"parity": [ParityOutcome.from_dict(p) for p in summary["parity"]]})


@dataclass(frozen=True, kw_only=True)
class BuildReport:
    """The whole report.json; fields in its key order.

    >>> report = BuildReport.from_json(Path("runs/quickstart/report.json").read_text())
    >>> report.selected_variant().latency_ms.p50
    0.51
    """

    schema_version: int = REPORT_SCHEMA_VERSION
    edgetl_version: str
    name: str
    passed: bool
    recipe_hash: str
    recipe: dict[str, Any]  # the recipe as run, every default filled in
    dataset: dict[str, Any]  # origin, classes, counts per split, skipped files
    training: dict[str, Any]  # strategy, history, best epoch, accuracies, notes
    transfer: dict[str, Any] | None = None  # distillation and adaptation; {} when neither ran
    export: ExportSummary
    quantize: list[dict[str, Any]]  # one entry per quantized variant, as the quantize stage records it
    variants: list[VariantMetrics]  # the PyTorch baseline first
    gates: list[GateOutcome]
    selected: Selection | None  # None when no variant passes every gate
    skipped: list[str]
    stages: dict[str, str]  # stage → built | reused
    timings: dict[str, float]
    environment: dict[str, Any]
    build_seconds: float | None = None  # None until the build is done

    def selected_variant(self) -> VariantMetrics | None:
        """The selected variant's row, or None when none was selected."""
        return self.variant(self.selected.name) if self.selected else None

    def variant(self, name: str) -> VariantMetrics | None:
        """The row of the variant called `name`, or None."""
        return next((v for v in self.variants if v.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """report.json's content. Raises nothing."""
        content = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.transfer is None:  # older reports had no `transfer`; keep it absent
            del content["transfer"]
        return content | {
            "export": self.export.to_dict(),
            "variants": [v.to_dict() for v in self.variants],
            "gates": [g.to_dict() for g in self.gates],
            "selected": self.selected.to_dict() if self.selected else None,
        }

    def to_json(self) -> str:
        """The text of report.json, indented as the build writes it."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildReport:
        """Raises KeyError naming a missing field; TypeError (or AttributeError, IndexError) when a
        section has the wrong shape."""
        content = known_fields(cls, data)
        return cls(
            **content
            | {
                "export": ExportSummary.from_dict(content["export"]),
                "variants": [VariantMetrics.from_dict(v) for v in content["variants"]],
                "gates": [GateOutcome.from_dict(g) for g in content["gates"]],
                "selected": Selection.from_dict(content["selected"]) if content["selected"] is not None else None,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> BuildReport:
        """Read report.json's text. Raises ValueError (json.JSONDecodeError) when it is not JSON, and
        what `from_dict` raises when it is not a build report."""
        return cls.from_dict(json.loads(text))
