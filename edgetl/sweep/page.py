"""sweep.md and sweep.html from sweep.json's content, in the build report's house style.

The page is self-contained like report.html (inline CSS and SVG); its one addition is a few
lines of inline script that sort the trials table by the clicked column (the table reads
fine without it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgetl.report_charts import ChartPoint, Series, accuracy_latency_svg
from edgetl.report_content import DASH, number, pct
from edgetl.report_html import _page, _section, _table


@dataclass(frozen=True)
class Point:
    """One deployable variant of one trial: a point of the accuracy-vs-latency chart and of the Pareto front."""

    trial: str
    variant: str
    accuracy: float
    latency_ms: float
    size_mb: float
    within_budget: bool


_HEADERS = (
    "#",
    "trial",
    "overrides",
    "status",
    "variant",
    "accuracy",
    "p50 ms",
    "size MB",
    "epochs",
    "seconds",
    "note",
)
_NUMERIC = (True, False, False, False, False, True, True, True, True, True, False)
_SORT = """<script>
for (const th of document.querySelectorAll("table.sortable th")) {
  th.style.cursor = "pointer";
  th.title = "sort";
  th.addEventListener("click", () => {
    const table = th.closest("table"), body = table.tBodies[0], i = th.cellIndex;
    const down = th.dataset.order !== "down";
    th.dataset.order = down ? "down" : "up";
    const key = (row) => { const t = row.cells[i].textContent, n = parseFloat(t); return isNaN(n) ? t : n; };
    const rows = [...body.rows].sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (down ? 1 : -1));
    body.append(...rows);
  });
}
</script>"""


def trial_rows(data: dict) -> list[list[str]]:
    """One row per trial: its selected variant (or its most accurate one when none is within the budget)."""
    rows = []
    for index, trial in enumerate(data["trials"], start=1):
        variants = [v for v in trial["variants"] if v["runtime"] != "pytorch"]
        shown = next((v for v in variants if v["name"] == trial["selected"]), None)
        shown = shown or max(variants, key=lambda v: v["accuracy"], default=None)
        note = (trial["error"] or "").splitlines()[0][:160] if trial["error"] else ""
        note = "reused from an earlier run; " * trial["reused"] + note
        rows.append(
            [
                str(index),
                trial["name"],
                " ".join(trial["overrides"]),
                trial["status"],
                shown["name"] if shown else DASH,
                pct(shown["accuracy"]) if shown else DASH,
                number(shown["p50_ms"] if shown else None, ".2f"),
                number(shown["size_mb"] if shown else None, ".2f"),
                str(len(trial["history"])),
                f"{trial['seconds']:.0f}",
                note.rstrip("; "),
            ]
        )
    return rows


def sweep_markdown(data: dict) -> str:
    """The summary for a CI job page: the verdict, the best trial and the trials table."""
    best, counts = data["best"], data["counts"]
    lines = [f"# sweep {data['name']}", ""]
    if best:
        lines.append(
            f"**Best within budget:** {best['trial']} ({' '.join(best['overrides'])}): {best['variant']}, "
            f"accuracy {pct(best['accuracy'])}, p50 {best['p50_ms']:.2f} ms, {best['size_mb']:.2f} MB"
        )
    else:
        lines.append("**No trial is within the budget.**")
    lines += ["", _counts(counts, data["seconds"]), "", "| " + " | ".join(_HEADERS) + " |"]
    lines.append("|" + "|".join("---:" if n else "---" for n in _NUMERIC) + "|")
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in trial_rows(data)]
    return "\n".join(lines) + "\n"


def sweep_page(
    data: dict,
    points: Sequence[Point],
    front: Sequence[Point],
    floor: tuple[str, float] | None,
    max_latency_ms: float | None,
) -> str:
    """The self-contained HTML page: every variant of every trial on the accuracy-vs-latency chart with the Pareto
    front and the budget lines, and the sortable trials table."""
    best = data["best"]
    numbers = {name: i for i, name in enumerate((t["name"] for t in data["trials"]), start=1)}

    def chart_point(p: Point) -> ChartPoint:
        return ChartPoint(f"#{numbers[p.trial]} {p.variant}", p.latency_ms, p.accuracy)

    series = [
        Series(label, tuple(chart_point(p) for p in points if p.within_budget == within))
        for label, within in (("within budget", True), ("over budget", False))
        if any(p.within_budget == within for p in points)
    ]
    if points:
        chart = accuracy_latency_svg(series, [chart_point(p) for p in front], floor, max_latency_ms)
        chart = f'<div class="chart">{chart}</div>'
    else:
        chart = "<p>No trial measured a variant.</p>"
    rows = trial_rows(data)
    table = _table(_HEADERS, [list(zip(row, _NUMERIC)) for row in rows], [None] * len(rows), "variants sortable")
    banner = (
        f"best within budget: {best['trial']}: {best['variant']}, accuracy {pct(best['accuracy'])}, "
        f"p50 {best['p50_ms']:.2f} ms, {best['size_mb']:.2f} MB"
        if best
        else "no trial is within the budget"
    )
    sweep = data["sweep"]
    budget = ", ".join(f"{k} {v:g}" for k, v in sweep["budget"].items() if v is not None) or "none"
    meta = f"edgetl {data['edgetl_version']} · {sweep['search']} search · objective {sweep['objective']} · budget "
    sections = [
        _section("Accuracy vs latency (every variant of every trial)", chart),
        _section("Trials (click a column to sort)", f'<div class="scroll">{table}</div>'),
    ]
    page = _page(
        f"edgetl sweep · {data['name']}",
        f"sweep {data['name']}",
        best is not None,
        banner,
        meta + budget + " · " + _counts(data["counts"], data["seconds"]),
        sections,
    )
    return page.replace("</main></body>", f"</main>{_SORT}</body>")


def _counts(counts: dict, seconds: float) -> str:
    parts = [
        f"{counts[s]} {s.replace('_', ' ')}" for s in ("ok", "over_budget", "failed", "stopped", "crashed") if counts[s]
    ]
    return f"{counts['total']} trials: {', '.join(parts)} ({counts['reused']} reused); {seconds:.0f} s"
