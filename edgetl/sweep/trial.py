"""One trial: a build of the base recipe with the trial's overrides, run inside its Ray worker.

In-process (`edgetl.pipeline.build`), not as a subprocess: the worker reports each epoch's val
accuracy to Ray Tune as training makes it (what ASHA stops trials on), without a second
channel. Each trial is still its own Ray actor process, so a crash or an out-of-memory kill
ends that trial only; Ray records it and the sweep goes on.

A finished trial leaves `trial.json` in its run folder (`TrialRecord`); a rerun of the sweep
finds it by the trial's name, a hash of its overrides, and reports it again instead of
rebuilding. Errors the recipe, data or export cause (exit 2 or 4) are finished trials too:
the same combination fails the same way. A crash leaves no `trial.json`, so a rerun retries it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgetl.cache import exclusive
from edgetl.errors import EdgetlError, GateFailure
from edgetl.fileio import write_json
from edgetl.sweep import space
from edgetl.sweep.spec import SweepPlan

RECORD = "trial.json"
# ok: a variant is within the budget; over_budget: the build ran, no variant is (exit 3); failed: exit 2 or 4;
# stopped: ASHA ended it after some epochs; crashed: the worker died or raised an unexpected error.
STATUSES = ("ok", "over_budget", "failed", "stopped", "crashed")


@dataclass(frozen=True)
class TrialRecord:
    """One trial as sweep.json lists it (`trials[]`)."""

    name: str
    overrides: list[str]
    status: str
    exit_code: int | None = None  # the exit code `edgetl build` would give; None while unknown (stopped)
    error: str | None = None
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)  # per epoch: epoch, val_accuracy
    stages: dict[str, str] = field(default_factory=dict)  # stage: built | reused (the shared stage cache)
    variants: list[dict] = field(default_factory=list)  # name, runtime, precision, accuracy, ..., within_budget
    selected: str | None = None  # the variant its build bundled
    reused: bool = False  # true when this run of the sweep found it finished

    def selected_row(self) -> dict | None:
        return next((v for v in self.variants if v["name"] == self.selected), None)

    def metrics(self) -> dict[str, float]:
        """What the trial's last Ray result says: the searchers' metrics, and the best val accuracy (Ray checks that
        every result carries the scheduler's metric)."""
        return {space.VAL_ACCURACY: max((h["val_accuracy"] for h in self.history), default=0.0), **self._objectives()}

    def _objectives(self) -> dict[str, float]:
        within = self.selected_row()
        deployable = [v for v in self.variants if v["runtime"] != "pytorch"]
        if within is not None:
            return {
                space.OBJECTIVE: within["accuracy"],
                space.ACCURACY: within["accuracy"],
                space.LATENCY: within["p50_ms"],
            }
        if deployable:  # over budget: ranked below every trial within it, by its most accurate variant
            best = max(deployable, key=lambda v: (v["accuracy"], -v["p50_ms"]))
            return {
                space.OBJECTIVE: best["accuracy"] - 1.0,
                space.ACCURACY: best["accuracy"],
                space.LATENCY: best["p50_ms"],
            }
        return {space.OBJECTIVE: -1.0, space.ACCURACY: 0.0, space.LATENCY: 1e9}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialRecord:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of one sweep shares, sent once to the Ray workers."""

    plan: SweepPlan
    out_dir: Path  # the sweep's output folder: trials/<name>/ and the shared stages/
    sweep_sets: list[str]  # the overrides the sweep adds to every trial (threads, select, budget)


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """Ray Tune's function trainable: build the trial, report each epoch and then the trial's metrics."""
    from ray import tune

    overrides = setup.plan.trial_overrides(space.point(setup.plan.sweep, config))
    name = setup.plan.trial_name(overrides, setup.sweep_sets)
    run_dir = setup.out_dir / "trials" / name
    done = run_dir / RECORD
    # Two samples of one point (random search can draw it twice) build once: the second waits and reuses it.
    with exclusive(setup.out_dir / "trials" / ".locks" / name):
        reused = done.is_file()
        if reused:
            record = TrialRecord.from_dict(json.loads(done.read_text()))
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            record = _build(setup, overrides, name, run_dir, _epoch_reporter(tune))
            write_json(done, record.to_dict())
    tune.report({**record.metrics(), "trial": name, "status": record.status, "reused": reused})


_UNMEASURED_MS = 1e9  # an epoch's latency stand-in: finite (Optuna refuses inf), worse than any measured one


def _epoch_reporter(tune: Any) -> Any:
    def on_epoch(row: dict) -> None:
        # every searcher metric in every result (Ray checks): NSGA-II's latency is only known once the build is done
        accuracy = row["val_accuracy"]
        tune.report(
            {
                space.EPOCH: row["epoch"],
                space.VAL_ACCURACY: accuracy,
                space.OBJECTIVE: accuracy,
                space.ACCURACY: accuracy,
                space.LATENCY: _UNMEASURED_MS,
            }
        )

    return on_epoch


def _build(setup: TrialSetup, overrides: list[str], name: str, run_dir: Path, on_epoch: Any) -> TrialRecord:
    """Build the trial into `run_dir` (its log in build.log); errors a user can fix become the record's error."""
    from edgetl.pipeline import build

    started = time.monotonic()
    handler = logging.FileHandler(run_dir / "build.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    edgetl_log = logging.getLogger("edgetl")
    edgetl_log.addHandler(handler)
    edgetl_log.setLevel(logging.INFO)
    status, code, error = "ok", 0, None
    try:
        recipe = setup.plan.trial_recipe(overrides, setup.sweep_sets)
        build(recipe, run_dir, stage_root=setup.out_dir / "stages", on_epoch=on_epoch)
    except GateFailure as exc:
        status, code, error = "over_budget", exc.exit_code, str(exc)
    except EdgetlError as exc:
        status, code, error = "failed", exc.exit_code, str(exc)
        edgetl_log.error("edgetl: error: %s", exc)
    finally:
        edgetl_log.removeHandler(handler)
        handler.close()
    return _record(name, overrides, status, code, error, run_dir, round(time.monotonic() - started, 2))


def _record(
    name: str, overrides: list[str], status: str, code: int, error: str | None, run_dir: Path, seconds: float
) -> TrialRecord:
    """The record of a build that ran: its report.json's variants, stages and training history when it got there."""
    report_file = run_dir / "report.json"
    if not report_file.is_file():
        return TrialRecord(name, overrides, status, code, error, seconds)
    report = json.loads(report_file.read_text())
    budget = {}
    for outcome in report["gates"]:
        passed = outcome["passed"] or not outcome.get("enforced", True)  # a below-bound variant the recipe allows
        budget[outcome["variant"]] = budget.get(outcome["variant"], True) and passed
    variants = [
        {
            "name": v["name"],
            "runtime": v["runtime"],
            "precision": v["precision"],
            "accuracy": v["accuracy"],
            "agreement": v["agreement"],
            "p50_ms": v["latency_ms"]["p50"],
            "size_mb": v["size_mb"],
            "within_budget": budget.get(v["name"], True) if v["runtime"] != "pytorch" else None,
        }
        for v in report["variants"]
    ]
    history = [{"epoch": h["epoch"], "val_accuracy": h["val_accuracy"]} for h in report["training"]["history"]]
    selected = report["selected"]["name"] if report["selected"] else None
    return TrialRecord(name, overrides, status, code, error, seconds, history, report["stages"], variants, selected)
