"""The HTML report: one self-contained page per build, and one per comparison of builds.

Everything the page needs is inside it (inline CSS, inline SVG charts, no scripts, fonts or
URLs), so it opens from a CI artifact, an e-mail or an air-gapped machine. Every piece of
text from the report goes through `html.escape`: names, notes and paths come from users.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from edgetl.build_report import BuildReport
from edgetl.report_charts import (
    ChartPoint,
    Series,
    accuracy_latency_svg,
    agreement_latency_svg,
    confusion_svg,
    metric_floor,
    training_svg,
)
from edgetl.report_content import (
    DASH,
    DETAIL_COLUMNS,
    Run,
    agreement_table,
    class_scores,
    focus_variant,
    gate_rule,
    gate_threshold,
    gate_value,
    multilabel_tables,
    pareto_front,
    pct,
    run_summary,
    run_variants,
    stage_summary,
    transfer_tables,
)
from edgetl.runtime.metrics import VariantMetrics

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328; margin: 0;
       background: #f6f8fa; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; }
h1 { margin: 0 0 8px; font-size: 26px; }
h2 { margin: 32px 0 10px; font-size: 18px; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
.banner { padding: 10px 14px; border-radius: 6px; font-weight: 600; margin: 8px 0 4px; }
.banner.pass { background: #dafbe1; color: #116329; border: 1px solid #4ac26b; }
.banner.fail { background: #ffebe9; color: #a40e26; border: 1px solid #ff8182; }
.meta { color: #59636e; margin: 4px 0; }
table { border-collapse: collapse; margin: 6px 0; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 4px 6px; vertical-align: top; }
th { background: #f6f8fa; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.selected td { font-weight: 600; background: #fff8c5; }
tr.total td { font-weight: 600; }
td.pass { background: #dafbe1; }
td.fail { background: #ffebe9; color: #a40e26; font-weight: 600; }
.chart svg { max-width: 100%; height: auto; }
.scroll { overflow-x: auto; }
table.variants td { white-space: nowrap; }
table.variants td:last-child { white-space: normal; min-width: 11em; }
.side { display: flex; gap: 24px; flex-wrap: wrap; align-items: flex-start; }
.side .chart svg { max-width: 460px; }
"""


def build_page(report: BuildReport) -> str:
    """The HTML page for one build's report."""
    name = report.name
    selected = report.selected
    verdict = "PASS" if report.passed else "FAIL"
    chosen = f"selected {selected.name}: {selected.reason}" if selected else "no variant passes every gate"
    meta = f"edgetl {report.edgetl_version} · stages {stage_summary(report)} · build {_seconds(report.build_seconds)}"
    variants = report.variants
    series = [Series("variants (bars: accuracy 95% CI)", tuple(_points(variants)))]
    sections = [
        _chart_section(
            series, metric_floor(lambda gate: gate_threshold(report, gate)), gate_threshold(report, "max_latency_ms")
        ),
        _agreement_section(report),
        _section("Variants", _variant_table([("", v) for v in variants], selected.name if selected else None)),
        _section("Gates", _gate_table(report)),
        _focus_section(report),
        _training_section(report.training),
        *(
            _section(
                t.title,
                _table(
                    t.headers,
                    [[(row[0], False)] + [(c, True) for c in row[1:]] for row in t.rows],
                    [None] * len(t.rows),
                ),
            )
            for t in filter(None, [agreement_table(report), *transfer_tables(report), *multilabel_tables(report)])
        ),
        _dataset_section(report.dataset),
        _build_section(report),
    ]
    return _page(f"edgetl · {name}", name, verdict == "PASS", f"{verdict} · {chosen}", meta, sections)


def compare_page(runs: Sequence[Run]) -> str:
    """One page comparing builds: all their variants on one chart and in one table."""
    passed = sum(run.report.passed for run in runs)
    series = [Series(run.label, tuple(_points(run.report.variants))) for run in runs]
    summaries = [run_summary(run) for run in runs]
    headers = list(summaries[0])
    summary = _table(
        headers, [[(s[h], h == "test accuracy") for h in headers] for s in summaries], [None] * len(summaries)
    )
    sections = [
        _section("Runs", summary),
        # Points carry the bare variant name; the colour and legend say which run it came from.
        _chart_section(series, None, None),
        _section("All variants", _variant_table(run_variants(runs), None)),
    ]
    title = f"{len(runs)} runs compared"
    return _page(
        f"edgetl · {title}",
        title,
        passed == len(runs),
        f"{passed} of {len(runs)} runs pass their gates",
        ", ".join(r.label for r in runs),
        sections,
    )


def _page(title: str, heading: str, good: bool, banner: str, meta: str, sections: Sequence[str]) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head>\n<body><main>\n"
        f"<h1>{escape(heading)}</h1>\n"
        f'<div class="banner {"pass" if good else "fail"}">{escape(banner)}</div>\n'
        f'<p class="meta">{escape(meta)}</p>\n' + "\n".join(sections) + "\n</main></body></html>\n"
    )


def _chart_section(series: Sequence[Series], floor: tuple[str, float] | None, max_latency_ms: float | None) -> str:
    """Accuracy vs latency with the Pareto front over every point of every series."""
    points = [p for s in series for p in s.points]
    if not points:
        return _section("Accuracy vs latency", "<p>No variant has both an accuracy and a latency.</p>")
    front = [points[i] for i in pareto_front([(p.latency_ms, p.accuracy) for p in points])]
    chart = accuracy_latency_svg(series, front, floor, max_latency_ms)
    return _section("Accuracy vs latency", f'<div class="chart">{chart}</div>')


def _agreement_section(report: BuildReport) -> str:
    """Agreement with FP32 vs latency of every deployable variant, with the lowest agreement bound."""
    points = [ChartPoint(v.name, v.latency_ms.p50, v.agreement) for v in report.variants if v.runtime != "pytorch"]
    bounds = [g.threshold for g in report.gates if g.gate in ("quantize.min_agreement", "min_agreement")]
    if not points:
        return ""
    chart = agreement_latency_svg(points, min(bounds) if bounds else None)
    return _section("Agreement with FP32 vs latency", f'<div class="chart">{chart}</div>')


def _section(heading: str, body: str) -> str:
    return f"<section><h2>{escape(heading)}</h2>\n{body}\n</section>"


def _table(
    headers: Sequence[str],
    rows: Sequence[Sequence[tuple[str, bool]]],
    row_classes: Sequence[str | None],
    table_class: str = "",
) -> str:
    """Rows of (text, numeric) cells, all escaped here, once; no header row when `headers` is empty."""
    head = "<thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in headers) + "</tr></thead>" if headers else ""
    body = []
    for cells, row_class in zip(rows, row_classes):
        tds = "".join(
            f'<td class="num">{escape(text)}</td>' if numeric else f"<td>{escape(text)}</td>" for text, numeric in cells
        )
        body.append(f'<tr class="{row_class}">{tds}</tr>' if row_class else f"<tr>{tds}</tr>")
    table = f'<table class="{table_class}">' if table_class else "<table>"
    return f"{table}{head}<tbody>{''.join(body)}</tbody></table>"


def _variant_table(rows: Sequence[tuple[str, VariantMetrics]], selected: str | None) -> str:
    """The detailed variants table; a non-empty run label adds a leading "run" column."""
    with_run = any(label for label, _ in rows)
    headers = ["run"] * with_run + [c.header for c in DETAIL_COLUMNS]
    cells = [[(label, False)] * with_run + [(c.cell(v), c.numeric) for c in DETAIL_COLUMNS] for label, v in rows]
    marked = ["selected" if v.name == selected else None for _, v in rows]
    # Cells stay on one line (notes excepted); a narrow window scrolls the table instead.
    return f'<div class="scroll">{_table(headers, cells, marked, "variants")}</div>'


def _gate_table(report: BuildReport) -> str:
    """Variants × gates, each cell the measured value, green when it passes, red when not."""
    gates = report.gates
    if not gates:
        return "<p>The recipe sets no gates.</p>"
    rules = list(dict.fromkeys(gate_rule(g) for g in gates))
    variants = list(dict.fromkeys(g.variant for g in gates))
    cells = {(g.variant, gate_rule(g)): g for g in gates}
    rows = []
    for variant in variants:
        row = f"<td>{escape(variant)}</td>"
        for rule in rules:
            gate = cells.get((variant, rule))
            if gate is None:
                row += f'<td class="num">{DASH}</td>'
            else:
                mark = "✓" if gate.passed else "✗"
                css = "pass" if gate.passed else "fail"
                row += f'<td class="num {css}">{escape(gate_value(gate.gate, gate.value))} {mark}</td>'
        rows.append(f"<tr>{row}</tr>")
    head = "<th>variant</th>" + "".join(f"<th>{escape(rule)}</th>" for rule in rules)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _focus_section(report: BuildReport) -> str:
    """Confusion matrix and per-class scores of the selected variant, else the fastest."""
    variant = focus_variant(report)
    classes = report.dataset.get("classes") or []
    if variant is not None and variant.multilabel:  # label sets: the per-label AP table stands for it
        return ""
    if variant is None or not variant.confusion_matrix:
        return _section("Errors per class", "<p>No variant has a confusion matrix.</p>")
    why = "selected variant" if report.selected else "fastest variant; none was selected"
    scores = class_scores(variant.confusion_matrix, classes)
    table = _table(
        ["class", "support", "precision", "recall", "F1"],
        [
            [
                (s.name, False),
                (str(s.support), True),
                (pct(s.precision), True),
                (pct(s.recall), True),
                (pct(s.f1), True),
            ]
            for s in scores
        ],
        [None] * len(scores),
    )
    chart = confusion_svg(variant.confusion_matrix, classes)
    body = (
        '<p class="meta">Test split, rows true class, columns predicted.</p>'
        f'<div class="side"><div class="chart">{chart}</div>{table}</div>'
    )
    return _section(f"Errors per class: {variant.name} ({why})", body)


def _training_section(training: dict) -> str:
    history = training.get("history") or []
    facts = (
        f"strategy {training.get('strategy', DASH)} · best epoch {training.get('best_epoch', DASH)} · "
        f"validation accuracy {pct(training.get('val_accuracy'))} · test accuracy {pct(training.get('test_accuracy'))}"
    )
    if history:
        chart = f'<div class="chart">{training_svg(history, training.get("best_epoch"))}</div>'
    else:
        chart = "<p>No training history recorded.</p>"
    return _section("Training", f'<p class="meta">{escape(facts)}</p>{chart}')


def _dataset_section(dataset: dict) -> str:
    classes = dataset.get("classes") or []
    counts = dataset.get("counts") or {}
    splits = [s for s in ("train", "val", "test") if s in counts]
    rows = [
        [(name, False)] + [(str(counts[s]["per_class"][k]), True) for s in splits] for k, name in enumerate(classes)
    ]
    rows.append([("total", False)] + [(str(counts[s]["total"]), True) for s in splits])
    table = _table(["class", *splits], rows, [None] * (len(rows) - 1) + ["total"])
    skipped = dataset.get("skipped") or []
    listed = "".join(
        f"<li><code>{escape(str(s['path']))}</code>: {escape(str(s['reason']))}</li>" for s in skipped[:50]
    )
    more = f"<li>… and {len(skipped) - 50} more</li>" if len(skipped) > 50 else ""
    skipped_html = (
        f"<p>{len(skipped)} file(s) skipped:</p><ul>{listed}{more}</ul>" if skipped else "<p>No files skipped.</p>"
    )
    return _section(
        "Dataset", f'<p class="meta">origin {escape(str(dataset.get("origin", DASH)))}</p>{table}{skipped_html}'
    )


def _build_section(report: BuildReport) -> str:
    env = report.environment
    packages = ", ".join(f"{k} {v}" for k, v in (env.get("packages") or {}).items())
    flags = ", ".join(flag for flag, on in (env.get("cpu_flags") or {}).items() if on) or "none of note"
    timings = ", ".join(f"{k.removesuffix('_seconds')} {_seconds(v)}" for k, v in report.timings.items())
    facts = [
        ("stages", stage_summary(report)),
        ("timings", timings or DASH),
        ("skipped", "; ".join(report.skipped) or "nothing"),
        ("CPU", f"{env.get('cpu_model', DASH)}, {env.get('cores', DASH)} cores, flags: {flags}"),
        ("packages", packages or DASH),
    ]
    return _section("Build", _table([], [[(k, False), (v, False)] for k, v in facts], [None] * len(facts)))


def _points(variants: Sequence[VariantMetrics]) -> list[ChartPoint]:
    return [
        ChartPoint(v.name, v.latency_ms.p50, v.accuracy, tuple(v.accuracy_ci95) if v.accuracy_ci95 else None)
        for v in variants
    ]


def _seconds(value: float | None) -> str:
    return DASH if value is None else f"{value:.1f} s"
