"""What a build report says, as plain values shared by the Markdown summary and the HTML page.

Both renderings read the same column specs, so a column added here shows up in both, and the
pure pieces (the Pareto front, per-class scores, which variant to inspect) are testable
without matplotlib or HTML.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgetl.build_report import BuildReport
from edgetl.gates import GATES, GateOutcome
from edgetl.runtime.metrics import VariantMetrics

DASH = "–"


@dataclass(frozen=True)
class Run:
    """One build's report.json, with the label that tells it apart in a comparison."""

    label: str
    directory: Path
    report: BuildReport


@dataclass(frozen=True)
class Column:
    """A table column: its header and how to turn a variant's row into the cell text."""

    header: str
    cell: Callable[[VariantMetrics], str]
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


def accuracy_with_ci(variant: VariantMetrics) -> str:
    ci = variant.accuracy_ci95
    interval = f" [{ci[0] * 100:.2f}, {ci[1] * 100:.2f}]" if ci else ""
    return pct(variant.accuracy) + interval


def _latency(variant: VariantMetrics) -> str:
    return f"{number(variant.latency_ms.p50, '.2f')} / {number(variant.latency_ms.p90, '.2f')}"


VARIANT_COLUMNS: tuple[Column, ...] = (
    Column("variant", lambda v: v.name, numeric=False),
    Column("runtime", lambda v: v.runtime or DASH, numeric=False),
    Column("precision", lambda v: v.precision or DASH, numeric=False),
    Column("accuracy [95% CI]", accuracy_with_ci),
    Column("drop", lambda v: pct_points(v.accuracy_drop)),
    Column("agreement", lambda v: pct(v.agreement)),
    Column("p50 / p90 ms", _latency),
    Column("img/s", lambda v: number(v.throughput_ips, ",.0f")),
    Column("size MB", lambda v: number(v.size_mb, ".2f")),
)

DETAIL_COLUMNS: tuple[Column, ...] = VARIANT_COLUMNS + (
    Column("load s", lambda v: number(v.load_seconds, ".2f")),
    Column("peak RSS MB", lambda v: number(v.peak_rss_mb, ",.0f")),
    Column("float layers", lambda v: str(len(v.float_layers or []))),
    Column("notes", lambda v: "; ".join(v.notes or []), numeric=False),
)

# Gate thresholds and measurements are shown in their gate's unit (gates.GATES).
_UNIT_FORMATS: dict[str, Callable[[float | None], str]] = {
    "fraction": pct,
    "points": pct_points,
    "ms": lambda x: number(x, ".2f", " ms"),
    "MB": lambda x: number(x, ".2f", " MB"),
}


def gate_value(gate: str, value: float | None) -> str:
    """A gate's threshold or measurement in the unit people read it in: 0.98 → "98.00%"."""
    return _UNIT_FORMATS[GATES[gate].unit](value)


def gate_rule(outcome: GateOutcome) -> str:
    """The gate as a sentence fragment: "min_accuracy ≥ 98.00%"."""
    return f"{outcome.gate} {GATES[outcome.gate].relation} {gate_value(outcome.gate, outcome.threshold)}"


def failed_gates(report: BuildReport) -> list[GateOutcome]:
    return [gate for gate in report.gates if not gate.passed]


def gate_threshold(report: BuildReport, gate: str) -> float | None:
    """The recipe's threshold for `gate`, or None when the recipe sets no such gate."""
    return next((g.threshold for g in report.gates if g.gate == gate), None)


def stage_summary(report: BuildReport) -> str:
    """ "built: data, validate · reused: train, export" from the stage → status map."""
    stages = report.stages
    parts = []
    for status in ("built", "reused"):
        names = [stage for stage, done in stages.items() if done == status]
        if names:
            parts.append(f"{status}: {', '.join(names)}")
    return " · ".join(parts) or DASH


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


def focus_variant(report: BuildReport) -> VariantMetrics | None:
    """The variant whose errors the report details: the selected one, else the fastest."""
    chosen = report.selected_variant()
    if chosen is not None or not report.variants:
        return chosen
    return min(report.variants, key=lambda v: v.latency_ms.p50)


def run_summary(run: Run) -> dict[str, str]:
    """The comparison table's row for one run."""
    report = run.report
    backbone = (report.recipe.get("model") or {}).get("backbone", DASH)
    return {
        "run": run.label,
        "strategy": report.training.get("strategy", DASH),
        "backbone": backbone,
        "test accuracy": pct(report.training.get("test_accuracy")),
        "selected": report.selected.name if report.selected else "none",
        "passed": "PASS" if report.passed else "FAIL",
    }


def run_variants(runs: Sequence[Run]) -> list[tuple[str, VariantMetrics]]:
    """Every variant of every run, with its run's label, in run order."""
    return [(run.label, variant) for run in runs for variant in run.report.variants]


@dataclass(frozen=True)
class TransferTable:
    """A side-by-side comparison from the report's `transfer`: distillation or domain adaptation."""

    title: str
    headers: tuple[str, ...]  # the first column names the model, the others are accuracies
    rows: tuple[tuple[str, ...], ...]


def transfer_tables(report: BuildReport) -> list[TransferTable]:
    """Teacher vs student alone vs distilled student; source-only vs adapted on both domains."""
    transfer = report.transfer or {}
    tables = []
    distill = transfer.get("distillation")
    if distill:
        teacher, alone, distilled = distill["teacher"], distill.get("student_alone") or {}, distill["student_distilled"]
        student = f"{distill['student']} @ {distill['input_size']} px"
        rows = [
            (
                f"teacher {teacher['backbone']} @ {teacher['input_size']} px",
                pct(teacher["val_accuracy"]),
                pct(teacher["test_accuracy"]),
            ),
            (f"student alone {student}", pct(alone.get("val_accuracy")), pct(alone.get("test_accuracy"))),
            (f"student distilled {student}", pct(distilled["val_accuracy"]), pct(distilled["test_accuracy"])),
        ]
        title = (
            f"Distillation (T = {distill['temperature']}, alpha = {distill['alpha']}, "
            f"teacher logits {distill['teacher_logits']})"
        )
        tables.append(TransferTable(title, ("model", "val accuracy", "test accuracy"), tuple(rows)))
    adapt = transfer.get("adaptation")
    if adapt:
        target = adapt.get("target_accuracy") or {}
        source = adapt["source_test_accuracy"]
        rows = [
            (name, pct(target.get(field)), pct(source.get(field)))
            for name, field in (("source only", "source_only"), (f"adapted ({adapt['method']})", "adapted"))
        ]
        title = (
            f"Domain adaptation ({adapt['method']}, {adapt['target_images']} unlabeled target images, "
            f"{target.get('images', 0)} labeled)"
        )
        tables.append(TransferTable(title, ("model", "target accuracy", "source test accuracy"), tuple(rows)))
    return tables


def agreement_table(report: BuildReport) -> TransferTable | None:
    """Per quantized variant with a `min_agreement`: the bound, the layers the agreement control kept in
    float, agreement with FP32 fully quantized and reached (val, calibration images, test), and the latency
    the float layers cost. None when no variant has a bound."""
    bounds = {g.variant: g for g in report.gates if g.gate == "quantize.min_agreement"}
    if not bounds:
        return None
    controls = {q["name"]: q.get("agreement_control") or {} for q in report.quantize}
    rows = []
    for name, outcome in bounds.items():
        control = controls.get(name, {})
        reached, latency = control.get("reached", {}), control.get("latency_ms") or {}
        added = control.get("float_layers_added")
        cost = f"{latency['quantized']:.2f} → {latency['with_float_layers']:.2f}" if latency else DASH
        test = pct(outcome.value) + ("" if outcome.passed else " ✗ below" + ("" if outcome.enforced else " (allowed)"))
        rows.append((
            name, pct(outcome.threshold), DASH if added is None else f"{len(added)}: {', '.join(added[:4])}"
            + (" …" if len(added) > 4 else ""), pct(control.get("start", {}).get("agreement")),
            pct(reached.get("val", {}).get("agreement")), pct(reached.get("calibration", {}).get("agreement")),
            test, cost,
        ))  # fmt: skip
    headers = ("variant", "min agreement", "layers kept in float", "fully quantized", "val", "calibration", "test",
               "latency ms (int8 → with float layers)")  # fmt: skip
    return TransferTable("Agreement with FP32 (agreement control)", headers, tuple(rows))


def multilabel_tables(report: BuildReport) -> list[TransferTable]:
    """A multi-label build's test metrics per variant (its `accuracy` column is the mAP), and the per-label AP and
    F1-tuned threshold of the selected (else fastest) variant; a multi-task build's `task_table`. [] for a
    single-label build."""
    if any(v.tasks for v in report.variants):
        return [task_table(report)]
    rows = [v for v in report.variants if v.multilabel]
    focus = focus_variant(report)
    if not rows or focus is None or not focus.multilabel:
        return []
    metrics = tuple(
        (v.name, pct(m["map"]), pct(m["micro_f1"]), pct(m["macro_f1"]), pct(m["exact_match"]), pct(v.agreement),
         number(m.get("max_abs_prob_delta"), ".4f"))
        for v in rows
        if (m := v.multilabel)
    )  # fmt: skip
    headers = ("variant", "mAP", "micro F1", "macro F1", "exact match", "label-set agreement", "max |Δp|")
    labels = report.dataset.get("classes") or []
    per_label = tuple(
        (label, DASH if ap is None else pct(ap), number(threshold, ".3f"))
        for label, ap, threshold in zip(labels, focus.multilabel["per_label_ap"], focus.multilabel["thresholds"])
    )
    return [
        TransferTable("Multi-label metrics (test split, thresholds tuned on val)", headers, metrics),
        TransferTable(f"Per-label AP and threshold: {focus.name}", ("label", "AP", "threshold"), per_label),
    ]


def task_table(report: BuildReport) -> TransferTable:
    """A multi-task build's test metrics: a row per variant and task (the variant's `accuracy` is their mean)."""
    rows = tuple(
        (v.name, name, t["kind"], pct(t["accuracy"]), pct(t["agreement"]), pct_points(t["accuracy_drop"]))
        for v in report.variants
        for name, t in (v.tasks or {}).items()
    )
    headers = ("variant", "task", "kind", "accuracy (mAP)", "agreement", "drop")
    return TransferTable("Per-task metrics (test split; a variant's accuracy is their mean)", headers, rows)
