"""Report stage: turn report.json into a CI job summary (Markdown) and a one-file HTML page.

The Markdown is short enough for a GitHub job summary (it is appended to
`$GITHUB_STEP_SUMMARY` when that is set); the HTML holds the charts and every detail and opens
offline. `compare` puts several builds side by side. The content shared by both formats
lives in `report_content`, the page in `report_html`, the charts in `report_charts`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgetl.build_report import BuildReport
from edgetl.errors import DataError
from edgetl.fileio import atomic_path
from edgetl.report_content import (
    DASH,
    VARIANT_COLUMNS,
    Run,
    agreement_table,
    failed_gates,
    gate_value,
    multilabel_tables,
    pareto_front,
    pct,
    run_summary,
    run_variants,
    stage_summary,
    transfer_tables,
)
from edgetl.report_html import build_page, compare_page
from edgetl.runtime.metrics import VariantMetrics


@dataclass(frozen=True)
class ReportFiles:
    """Where the two renderings of a report were written."""

    markdown: Path
    html: Path


def write_reports(report: BuildReport, run_dir: Path) -> ReportFiles:
    """Write `run_dir/report.md` and `run_dir/report.html` from a build's report.

    >>> files = write_reports(BuildReport.from_json((run_dir / "report.json").read_text()), run_dir)
    >>> files.html
    PosixPath('runs/quickstart/report.html')
    """
    return _write(Path(run_dir), build_markdown(report), build_page(report))


def compare(run_dirs: list[Path], out_dir: Path) -> ReportFiles:
    """Compare builds: write `out_dir/report.md` and `out_dir/report.html` from each run
    directory's report.json. Raises DataError naming a report.json that is missing or not a build report.

    >>> compare([Path("runs/lite0"), Path("runs/lite2")], Path("runs/compare"))
    """
    if not run_dirs:
        raise DataError("Nothing to compare: pass at least one run directory written by `edgetl build`.")
    reports = [(Path(d), _load(Path(d))) for d in run_dirs]
    names = [report.name for _, report in reports]
    # Two builds of one recipe share a name; their directories tell them apart.
    runs = [
        Run(name if names.count(name) == 1 else f"{name} ({directory.name})", directory, report)
        for name, (directory, report) in zip(names, reports)
    ]
    return _write(Path(out_dir), compare_markdown(runs), compare_page(runs))


def build_markdown(report: BuildReport) -> str:
    """The job summary: verdict, variants, failed gates, selection, stages."""
    verdict = "✅ PASS" if report.passed else "❌ FAIL"
    variants = report.variants
    lines = [f"## edgetl build `{report.name}`: {verdict}", ""]
    lines += _variant_table([("", v) for v in variants])
    failed = failed_gates(report)
    if failed:
        lines += ["", f"**Failed gates ({len(failed)})**", ""]
        lines += _markdown_table(
            ["gate", "variant", "threshold", "measured"],
            [[g.gate, g.variant, gate_value(g.gate, g.threshold), gate_value(g.gate, g.value)] for g in failed],
            [False, False, True, True],
        )
    else:
        lines += ["", "**Gates:** all gates passed." if report.gates else "**Gates:** the recipe sets none."]
    selected = report.selected
    if selected:
        lines += ["", f"**Selected:** `{selected.name}` (policy {selected.policy}): {selected.reason}"]
    else:
        lines += ["", "**Selected:** none; no variant passes every gate."]
    lines += ["", f"**Pareto front** (fastest first): {_front_names([('', v) for v in variants])}"]
    for table in filter(None, [agreement_table(report), *transfer_tables(report), *multilabel_tables(report)]):
        lines += ["", f"**{table.title}**", ""] + _markdown_table(
            table.headers, table.rows, [False] + [True] * (len(table.headers) - 1)
        )
    lines += ["", f"**Stages:** {stage_summary(report)}", ""]
    return "\n".join(lines)


def compare_markdown(runs: Sequence[Run]) -> str:
    """The comparison summary: one row per run, then every variant with its run."""
    summaries = [run_summary(run) for run in runs]
    headers = list(summaries[0])
    lines = [f"## edgetl compare: {len(runs)} runs", ""]
    lines += _markdown_table(headers, [list(s.values()) for s in summaries], [h == "test accuracy" for h in headers])
    lines += ["", "**Variants**", ""]
    lines += _variant_table(run_variants(runs))
    lines += ["", f"**Pareto front across runs** (fastest first): {_front_names(run_variants(runs))}", ""]
    return "\n".join(lines)


def _variant_table(rows: Sequence[tuple[str, VariantMetrics]]) -> list[str]:
    """The variants table; a non-empty run label adds a leading "run" column."""
    with_run = any(label for label, _ in rows)
    return _markdown_table(
        ["run"] * with_run + [c.header for c in VARIANT_COLUMNS],
        [[label] * with_run + [c.cell(v) for c in VARIANT_COLUMNS] for label, v in rows],
        [False] * with_run + [c.numeric for c in VARIANT_COLUMNS],
    )


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool]) -> list[str]:
    """GitHub table lines, numeric columns right-aligned."""
    align = ["---:" if right else "---" for right in numeric]
    return [_markdown_row(headers), "| " + " | ".join(align) + " |"] + [_markdown_row(row) for row in rows]


def _markdown_row(cells: Sequence[str]) -> str:
    # A pipe or newline inside a cell would end the cell or the table.
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _front_names(rows: Sequence[tuple[str, VariantMetrics]]) -> str:
    """The Pareto-optimal variants, fastest first, named run/variant when a run label is set."""
    front = [rows[i] for i in pareto_front([(v.latency_ms.p50, v.accuracy) for _, v in rows])]
    named = (
        f"`{label + '/' if label else ''}{v.name}` ({v.latency_ms.p50:.2f} ms, {pct(v.accuracy)})" for label, v in front
    )
    return " → ".join(named) or DASH


def _load(run_dir: Path) -> BuildReport:
    """A run's report.json, or a DataError that names the file and how to get it."""
    path = run_dir / "report.json"
    try:
        return BuildReport.from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"{path} does not exist: run `edgetl build` for this run first, then pass its run directory."
        ) from None
    except (OSError, ValueError) as exc:  # ValueError: json.JSONDecodeError, UnicodeDecodeError
        raise DataError(f"{path} is not a readable report ({exc}); rebuild it with `edgetl build`.") from None
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        why = f"it has no `{exc.args[0]}`" if isinstance(exc, KeyError) else str(exc)
        raise DataError(f"{path} is not an edgetl build report ({why}); rebuild it with `edgetl build`.") from None


def _write(out_dir: Path, markdown: str, page: str) -> ReportFiles:
    files = ReportFiles(out_dir / "report.md", out_dir / "report.html")
    for dest, text in ((files.markdown, markdown), (files.html, page)):
        with atomic_path(dest) as tmp:
            tmp.write_text(text, encoding="utf-8")
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:  # GitHub renders this file on the job's page
        with open(summary, "a", encoding="utf-8") as handle:
            handle.write(markdown + "\n")
    return files
