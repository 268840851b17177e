"""What a build report says, as plain values shared by the Markdown summary and the HTML page.

Both renderings read the same column specs, so a column added here shows up in both, and the
pure pieces (the Pareto front, per-class scores, which variant to inspect) are testable
without matplotlib or HTML.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

DASH = "–"


@dataclass(frozen=True)
class Run:
    """One build's report.json, with the label that tells it apart in a comparison."""

    label: str
    directory: Path
    report: dict


@dataclass(frozen=True)
class Column:
    """A table column: its header and how to turn a variant dict into the cell text."""

    header: str
    cell: Callable[[dict], str]
    numeric: bool = True  # right-aligned


@dataclass(frozen=True)
class ClassScores:
    """Precision, recall and F1 of one class; None where the ratio has no denominator."""

    name: str
    support: int
    precision: float | None
    recall: float | None
    f1: float | None


def number(value: float | None, spec: str, unit: str = "") -> str:
    """`value` formatted with `spec`, or a dash when the build did not measure it."""
    return DASH if value is None else f"{value:{spec}}{unit}"


def pct(value: float | None) -> str:
    return DASH if value is None else f"{value * 100:.2f}%"


def pct_points(value: float | None) -> str:
    """Accuracy differences in percentage points: 0.0074 → "0.74 pt"."""
    return DASH if value is None else f"{value * 100:.2f} pt"


def accuracy_with_ci(variant: dict) -> str:
    ci = variant.get("accuracy_ci95")
    interval = f" [{ci[0] * 100:.2f}, {ci[1] * 100:.2f}]" if ci else ""
    return pct(variant.get("accuracy")) + interval


def _latency(variant: dict) -> str:
    latency = variant.get("latency_ms") or {}
    return f"{number(latency.get('p50'), '.2f')} / {number(latency.get('p90'), '.2f')}"


VARIANT_COLUMNS: tuple[Column, ...] = (
    Column("variant", lambda v: v["name"], numeric=False),
    Column("runtime", lambda v: v.get("runtime", DASH), numeric=False),
    Column("precision", lambda v: v.get("precision", DASH), numeric=False),
    Column("accuracy [95% CI]", accuracy_with_ci),
    Column("drop", lambda v: pct_points(v.get("accuracy_drop"))),
    Column("agreement", lambda v: pct(v.get("agreement"))),
    Column("p50 / p90 ms", _latency),
    Column("img/s", lambda v: number(v.get("throughput_ips"), ",.0f")),
    Column("size MB", lambda v: number(v.get("size_mb"), ".2f")),
)

DETAIL_COLUMNS: tuple[Column, ...] = VARIANT_COLUMNS + (
    Column("load s", lambda v: number(v.get("load_seconds"), ".2f")),
    Column("peak RSS MB", lambda v: number(v.get("peak_rss_mb"), ",.0f")),
    Column("float layers", lambda v: str(len(v.get("float_layers") or []))),
    Column("notes", lambda v: "; ".join(v.get("notes") or []), numeric=False),
)

# Gate thresholds and measurements share their variant field's unit.
_GATE_FORMATS: dict[str, Callable[[float | None], str]] = {
    "min_accuracy": pct,
    "min_agreement": pct,
    "max_accuracy_drop": pct_points,
    "max_latency_ms": lambda x: number(x, ".2f", " ms"),
    "max_size_mb": lambda x: number(x, ".2f", " MB"),
}


def gate_value(gate: str, value: float | None) -> str:
    """A gate's threshold or measurement in the unit people read it in: 0.98 → "98.00%"."""
    return _GATE_FORMATS.get(gate, lambda x: number(x, ".4g"))(value)


def gate_rule(gate: dict) -> str:
    """The gate as a sentence fragment: "min_accuracy ≥ 98.00%"."""
    sign = "≥" if gate["gate"].startswith("min_") else "≤"
    return f"{gate['gate']} {sign} {gate_value(gate['gate'], gate['threshold'])}"


def failed_gates(report: dict) -> list[dict]:
    return [gate for gate in report.get("gates") or [] if not gate["passed"]]


def gate_threshold(report: dict, gate: str) -> float | None:
    """The recipe's threshold for `gate`, or None when the recipe sets no such gate."""
    return next((g["threshold"] for g in report.get("gates") or [] if g["gate"] == gate), None)


def stage_summary(report: dict) -> str:
    """ "built: data, validate · reused: train, export" from the stage → status map."""
    stages = report.get("stages") or {}
    parts = []
    for status in ("built", "reused"):
        names = [stage for stage, done in stages.items() if done == status]
        if names:
            parts.append(f"{status}: {', '.join(names)}")
    return " · ".join(parts) or DASH


def latency_p50(variant: dict) -> float | None:
    return (variant.get("latency_ms") or {}).get("p50")


def is_measured(variant: dict) -> bool:
    """Whether the variant can go on the accuracy-vs-latency chart."""
    return latency_p50(variant) is not None and variant.get("accuracy") is not None


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (latency, accuracy) points no other point beats, fastest first.

    A point is beaten when another is at least as fast and at least as accurate, and
    strictly better in one of the two; equal points do not beat each other.

    >>> pareto_front([(12.0, 0.95), (3.0, 0.95), (1.5, 0.93), (4.0, 0.90)])
    [2, 1]
    """

    def beaten(i: int) -> bool:
        lat, acc = points[i]
        return any(
            other_lat <= lat and other_acc >= acc and (other_lat, other_acc) != (lat, acc)
            for other_lat, other_acc in points
        )

    return sorted((i for i in range(len(points)) if not beaten(i)), key=lambda i: points[i])


def class_scores(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> list[ClassScores]:
    """Per-class precision, recall and F1 from a confusion matrix (rows true, columns predicted).

    F1 is 2·TP / (2·TP + FP + FN), so a class the model never predicts scores 0, not None;
    only a class absent from both truth and predictions has no F1.

    >>> class_scores([[5, 1], [2, 3]], ["cat", "dog"])[0].precision  # 5 / (5 + 2)
    0.7142857142857143
    """
    scores = []
    for k, name in enumerate(classes):
        tp = confusion[k][k]
        support = sum(confusion[k])
        predicted = sum(row[k] for row in confusion)
        fp, fn = predicted - tp, support - tp
        scores.append(
            ClassScores(
                name=name,
                support=support,
                precision=tp / predicted if predicted else None,
                recall=tp / support if support else None,
                f1=2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else None,
            )
        )
    return scores


def focus_variant(report: dict) -> dict | None:
    """The variant whose errors the report details: the selected one, else the fastest."""
    variants = report.get("variants") or []
    selected = report.get("selected")
    if selected:
        chosen = next((v for v in variants if v["name"] == selected["name"]), None)
        if chosen is not None:
            return chosen
    timed = [v for v in variants if latency_p50(v) is not None]
    return min(timed, key=latency_p50) if timed else None


def run_summary(run: Run) -> dict[str, str]:
    """The comparison table's row for one run."""
    report = run.report
    training = report.get("training") or {}
    backbone = ((report.get("recipe") or {}).get("model") or {}).get("backbone", DASH)
    selected = report.get("selected")
    return {
        "run": run.label,
        "strategy": training.get("strategy", DASH),
        "backbone": backbone,
        "test accuracy": pct(training.get("test_accuracy")),
        "selected": selected["name"] if selected else "none",
        "passed": "PASS" if report.get("passed") else "FAIL",
    }


def run_variants(runs: Sequence[Run]) -> list[tuple[str, dict]]:
    """Every variant of every run, with its run's label, in run order."""
    return [(run.label, variant) for run in runs for variant in run.report.get("variants") or []]


@dataclass(frozen=True)
class TransferTable:
    """A side-by-side comparison from report["transfer"]: distillation or domain adaptation."""

    title: str
    headers: tuple[str, ...]  # the first column names the model, the others are accuracies
    rows: tuple[tuple[str, ...], ...]


def transfer_tables(report: dict) -> list[TransferTable]:
    """Teacher vs student alone vs distilled student; source-only vs adapted on both domains."""
    transfer = report.get("transfer") or {}
    tables = []
    distill = transfer.get("distillation")
    if distill:
        teacher, alone, distilled = distill["teacher"], distill.get("student_alone") or {}, distill["student_distilled"]
        student = f"{distill['student']} @ {distill['input_size']} px"
        rows = [
            (f"teacher {teacher['backbone']} @ {teacher['input_size']} px", pct(teacher["val_accuracy"]), pct(teacher["test_accuracy"])),
            (f"student alone {student}", pct(alone.get("val_accuracy")), pct(alone.get("test_accuracy"))),
            (f"student distilled {student}", pct(distilled["val_accuracy"]), pct(distilled["test_accuracy"])),
        ]
        title = f"Distillation (T = {distill['temperature']}, alpha = {distill['alpha']}, teacher logits {distill['teacher_logits']})"
        tables.append(TransferTable(title, ("model", "val accuracy", "test accuracy"), tuple(rows)))
    adapt = transfer.get("adaptation")
    if adapt:
        target = adapt.get("target_accuracy") or {}
        source = adapt["source_test_accuracy"]
        rows = [(name, pct(target.get(field)), pct(source.get(field))) for name, field in (("source only", "source_only"), (f"adapted ({adapt['method']})", "adapted"))]
        title = f"Domain adaptation ({adapt['method']}, {adapt['target_images']} unlabeled target images, {target.get('images', 0)} labeled)"
        tables.append(TransferTable(title, ("model", "target accuracy", "source test accuracy"), tuple(rows)))
    return tables
