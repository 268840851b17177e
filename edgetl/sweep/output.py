"""The sweep's outputs: sweep.json (schema in the README), sweep.md, sweep.html, and the best trial's recipe and bundle.

Written like a build's: the previous sweep's are removed when a sweep starts, each file is
written atomically, and sweep.json goes last, so a sweep.json means the sweep is done and
never names a bundle that is not complete.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from edgetl import __version__, environment
from edgetl.fileio import atomic_dir, atomic_path, write_json
from edgetl.report_charts import metric_floor
from edgetl.report_content import pareto_front
from edgetl.sweep.page import Point, sweep_markdown, sweep_page
from edgetl.sweep.spec import SweepPlan
from edgetl.sweep.trial import STATUSES, TrialRecord

SCHEMA_VERSION = 1
OUTPUTS = ("sweep.json", "sweep.md", "sweep.html", "best.yaml", "bundle")


@dataclass(frozen=True)
class SweepSummary:
    """What sweep.json holds, as records."""

    plan: SweepPlan
    trials: list[TrialRecord]
    best: TrialRecord | None  # the most accurate trial within the budget (ties: the faster)
    pareto: list[Point]  # fastest first
    seconds: float
    html: Path

    def to_dict(self) -> dict:
        sweep, best = self.plan.sweep, self.best
        counts = {status: sum(r.status == status for r in self.trials) for status in STATUSES}
        best_row = best.selected_row() if best else None
        return {
            "schema_version": SCHEMA_VERSION,
            "edgetl_version": __version__,
            "name": sweep.name,
            "sweep": sweep.model_dump(mode="json"),
            "counts": {**counts, "reused": sum(r.reused for r in self.trials), "total": len(self.trials)},
            "trials": [r.to_dict() for r in self.trials],
            "best": None
            if best is None
            else {
                "trial": best.name,
                "overrides": best.overrides,
                "variant": best.selected,
                "accuracy": best_row["accuracy"],
                "p50_ms": best_row["p50_ms"],
                "size_mb": best_row["size_mb"],
                "recipe": "best.yaml",
                "bundle": "bundle",
                "archive": f"{best.name}.tar.gz",
            },
            "pareto": [p.__dict__ for p in self.pareto],
            "seconds": self.seconds,
            "environment": environment.describe(),
        }


def remove_outputs(out_dir: Path) -> None:
    """A sweep in progress must not show the last sweep's results as its own."""
    for name in OUTPUTS:
        path = out_dir / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    for archive in out_dir.glob("*.tar.gz"):
        archive.unlink()


def write_outputs(plan: SweepPlan, records: list[TrialRecord], out_dir: Path, seconds: float) -> SweepSummary:
    """Write the best trial's bundle, archive and recipe, then sweep.md, sweep.html and sweep.json (last)."""
    within = [r for r in records if r.status == "ok" and r.selected_row() is not None]
    best = max(within, key=lambda r: (r.selected_row()["accuracy"], -r.selected_row()["p50_ms"]), default=None)
    points = chart_points(records)
    front = [points[i] for i in pareto_front([(p.latency_ms, p.accuracy) for p in points])]
    summary = SweepSummary(plan, records, best, front, seconds, out_dir / "sweep.html")
    if best is not None:
        _copy_best(out_dir / "trials" / best.name, out_dir, best.name)
    budget = plan.sweep.budget
    floor = metric_floor(lambda gate: getattr(budget, gate))
    with atomic_path(out_dir / "sweep.md") as tmp:
        tmp.write_text(sweep_markdown(summary.to_dict()))
    with atomic_path(out_dir / "sweep.html") as tmp:
        tmp.write_text(sweep_page(summary.to_dict(), points, front, floor, budget.max_latency_ms))
    write_json(out_dir / "sweep.json", summary.to_dict())
    return summary


def chart_points(records: Sequence[TrialRecord]) -> list[Point]:
    """Every deployable variant of every trial that was measured."""
    return [
        Point(r.name, v["name"], v["accuracy"], v["p50_ms"], v["size_mb"], bool(v["within_budget"]))
        for r in records
        for v in r.variants
        if v["runtime"] != "pytorch"
    ]


def _copy_best(run_dir: Path, out_dir: Path, name: str) -> None:
    """best.yaml (the trial's complete recipe, every default filled in), bundle/ and the archive."""
    with atomic_dir(out_dir / "bundle") as tmp:
        shutil.copytree(run_dir / "bundle", tmp, dirs_exist_ok=True)
    with atomic_path(out_dir / f"{name}.tar.gz") as tmp:
        shutil.copyfile(run_dir / f"{name}.tar.gz", tmp)
    recipe = json.loads((run_dir / "report.json").read_text())["recipe"]
    with atomic_path(out_dir / "best.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(recipe, sort_keys=False))
