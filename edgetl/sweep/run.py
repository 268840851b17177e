"""`edgetl sweep`: the trials on Ray Tune, then the sweep's records, reports, best recipe and bundle.

Ray runs locally by default (started here with the machine's CPUs and GPUs, quiet, no
dashboard) or joins a cluster at `address`; then the output folder must be one every node
sees (a shared filesystem), as the trials write their run folders and the shared stage
cache there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path

from edgetl.errors import EdgetlError, ExportError, GateFailure, RecipeError
from edgetl.fileio import remove_temporaries, write_json
from edgetl.sweep import space
from edgetl.sweep.output import SweepSummary, remove_outputs, write_outputs
from edgetl.sweep.progress import SweepProgress
from edgetl.sweep.spec import SweepPlan
from edgetl.sweep.trial import RECORD, TrialRecord, TrialSetup, run_trial

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Launch:
    """How to run a sweep: the command line's options (None: the sweep file's, then the defaults)."""

    out_dir: Path
    trials: int | None = None
    concurrency: int | None = None
    address: str | None = None


def run_sweep(plan: SweepPlan, launch: Launch) -> SweepSummary:
    """Run every trial of `plan` on Ray Tune and write `launch.out_dir`/sweep.json, sweep.md, sweep.html and, for the
    best trial within the budget, best.yaml, bundle/ and its archive.

    Raises RecipeError for options that do not fit the sweep, GateFailure (exit 3, after writing the outputs) when no
    trial is within the budget, and the trials' own error (exit 2 or 4) when every trial failed before its gates.

    >>> run_sweep(load_sweep(Path("recipes/sweep.yaml")), Launch(Path("runs/sweep"))).best.name
    """
    sweep = plan.sweep
    if launch.trials is not None and sweep.search == "grid":
        raise RecipeError(
            "--trials: search grid runs every combination of the space; it applies to random, tpe, nsga2."
        )
    out_dir = launch.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_outputs(out_dir)
    remove_temporaries(out_dir / "stages")  # a killed earlier sweep's: no trial runs yet
    shutil.rmtree(out_dir / ".ray", ignore_errors=True)  # Ray Tune's own state; trial.json files are the record
    started = time.monotonic()
    owns_ray = _start_ray(launch.address)
    try:
        records = _tune(plan, launch, out_dir)
    finally:
        if owns_ray:
            import ray

            ray.shutdown()
    summary = write_outputs(plan, records, out_dir, round(time.monotonic() - started, 1))
    _raise_unless_found(summary)
    return summary


def _start_ray(address: str | None) -> bool:
    """Start (or join) Ray unless this process already did; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None  # Ray's own convention: `ray job submit` sets it
    if address:
        _require_listening(address)
    try:
        ray.init(
            # "local": a new Ray of this machine's own. Left None, Ray would join whatever cluster
            # /tmp/ray/ray_current_cluster names, even a stale one whose head was killed, and wait on it.
            address=address or "local",
            include_dashboard=False,
            log_to_driver=False,  # trials log into their build.log; the driver prints the sweep's progress
            logging_level=logging.WARNING,
        )
    except ConnectionError as exc:
        raise RecipeError(
            f"--address {address}: the Ray cluster there did not let this machine join ({exc}). A cluster with "
            "token authentication (`ray start --head` turns it on when its machine has ~/.ray/auth_token) takes a "
            "driver that sends its token, which Ray does for an explicit address only with RAY_AUTH_MODE=token: "
            "run `RAY_AUTH_MODE=token edgetl sweep ...` with the head's token in ~/.ray/auth_token or RAY_AUTH_TOKEN "
            "(`ray get-auth-token` on the head prints it)."
        ) from None
    return True


def _require_listening(address: str) -> None:
    """Fail in seconds, not after Ray's minutes of retries, when nothing listens at a HOST:PORT address."""
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:6379
    if "://" in address or not port.isdigit():  # ray://, "auto": Ray resolves those itself
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise RecipeError(
            f"--address {address}: no Ray cluster answers there ({exc}). Start one (`ray start --head` on that "
            "machine), check the host and port, or leave --address out to run on this machine."
        ) from None


def _tune(plan: SweepPlan, launch: Launch, out_dir: Path) -> list[TrialRecord]:
    import ray
    from ray import tune

    sweep = plan.sweep
    resources = ray.cluster_resources()
    gpus = sweep.resources.gpus if sweep.resources.gpus is not None else float(resources.get("GPU", 0) > 0)
    cpus = sweep.resources.cpus
    concurrency = launch.concurrency or sweep.concurrency or max(1, int(resources.get("CPU", 1) // cpus))
    setup = TrialSetup(plan, out_dir, plan.sweep_overrides(max(1, int(cpus))))
    total = space.trial_count(sweep, launch.trials)
    max_epochs = plan.trial_recipe([], setup.sweep_sets).train.epochs
    log.info(
        "sweep %s: %d trial(s), %s search, %d at once, %g CPU and %g GPU each; output %s",
        sweep.name,
        total,
        sweep.search,
        concurrency,
        cpus,
        gpus,
        out_dir,
    )
    # Ray Tune's own console tables repeat what SweepProgress says; its legacy reporter at verbose 0 prints nothing.
    # Its warnings point at Tuner.restore, but a sweep resumes by running it again.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    logging.getLogger("ray.tune").setLevel(logging.ERROR)
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"cpu": cpus, "gpu": gpus})
    progress = SweepProgress(total)
    tuner = tune.Tuner(
        trainable,
        param_space=space.param_space(sweep),
        tune_config=tune.TuneConfig(
            search_alg=space.searcher(sweep, concurrency),
            scheduler=space.scheduler(sweep, max_epochs),
            num_samples=space.num_samples(sweep, launch.trials),
        ),
        run_config=tune.RunConfig(name="tune", storage_path=str(out_dir / ".ray"), verbose=0, callbacks=[progress]),
    )
    try:
        results = tuner.fit()
    finally:
        progress.close()  # also when fit() raises: a live bar would keep the terminal
    if len(results) < total or results.num_terminated + results.num_errors < len(results):
        # Ray Tune ends fit() quietly on Ctrl-C; the trials left unfinished must not be recorded as finished.
        raise KeyboardInterrupt
    return _collect(setup, results)


def _collect(setup: TrialSetup, results: object) -> list[TrialRecord]:
    """Each Ray trial's record, once per distinct trial: what its worker wrote, or what Ray saw when the worker died
    (crashed) or ASHA stopped it (stopped; written now, so a rerun reuses it too)."""
    plan, records = setup.plan, {}
    for result in results:
        overrides = plan.trial_overrides(space.point(plan.sweep, result.config))
        name = plan.trial_name(overrides, setup.sweep_sets)
        done = setup.out_dir / "trials" / name / RECORD
        last = result.metrics or {}
        if done.is_file():
            record = replace(TrialRecord.from_dict(json.loads(done.read_text())), reused=bool(last.get("reused")))
        elif result.error is not None:
            error = str(result.error).strip().splitlines()
            record = TrialRecord(name, overrides, "crashed", 1, " ".join(error[-3:])[-800:])
        elif plan.sweep.early_stop is None:  # ended without a record or an error, and no scheduler stops trials
            record = TrialRecord(name, overrides, "crashed", 1, "the trial ended without a result (interrupted?)")
        else:
            history = _epochs(result)
            record = TrialRecord(name, overrides, "stopped", None, "stopped early by ASHA", history=history)
            write_json(done, record.to_dict())
        records.setdefault(name, record)
    return list(records.values())


def _epochs(result: object) -> list[dict]:
    frame = result.metrics_dataframe
    if frame is None or space.EPOCH not in frame:
        return []
    rows = frame.dropna(subset=[space.EPOCH])
    return [{"epoch": int(e), "val_accuracy": float(a)} for e, a in zip(rows[space.EPOCH], rows[space.VAL_ACCURACY])]


def _raise_unless_found(summary: SweepSummary) -> None:
    """Exit codes as `edgetl build`: 3 when trials were measured but none is within the budget; else the trials'
    own error (2 or 4) when none got that far."""
    if summary.best is not None:
        return
    records = summary.trials
    where = f"report in {summary.html}"
    if any(r.status == "over_budget" for r in records):
        raise GateFailure(f"no trial of the sweep has a variant within the budget; {where}")
    failed = [r for r in records if r.status == "failed"]
    if failed:
        kind = ExportError if all(r.exit_code == 4 for r in failed) else RecipeError
        raise kind(f"every trial of the sweep failed ({len(records)}); the first: {failed[0].error}; {where}")
    raise EdgetlError(f"no trial of the sweep finished (crashed or stopped: {len(records)}); {where}")
