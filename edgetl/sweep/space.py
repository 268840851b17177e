"""The sweep's search space, searcher and scheduler as Ray Tune objects.

Ray's config keys are the recipe's `--set` paths. Lists and grids of values that are not
plain scalars (a `quantize` list, say) go to Ray, and to Optuna, which only samples
scalars, as their `--set` YAML text, and `point` turns them back into values.
"""

from __future__ import annotations

from typing import Any

import yaml

from edgetl.sweep.spec import Grid, Range, Sweep

# Both searches report these in every trial's last result; `objective` is the trial's test accuracy within
# the budget, or that accuracy minus 1 when no variant is within it (worse than any trial that is).
OBJECTIVE, ACCURACY, LATENCY = "objective", "accuracy", "latency_ms"
VAL_ACCURACY, EPOCH = "val_accuracy", "epoch"  # reported after every training epoch (ASHA's rungs)


def param_space(sweep: Sweep) -> dict[str, Any]:
    """The Ray Tune param space: `tune.grid_search`, `tune.choice` and the (log-)uniform ranges."""
    from ray import tune

    space: dict[str, Any] = {}
    for path, dimension in sweep.space.items():
        if isinstance(dimension, Range):
            space[path] = _range(dimension)
        else:
            values = [_encode(v) for v in (dimension.grid if isinstance(dimension, Grid) else dimension)]
            grid = isinstance(dimension, Grid) or sweep.search == "grid"
            space[path] = tune.grid_search(values) if grid else tune.choice(values)
    return space


def point(sweep: Sweep, config: dict[str, Any]) -> dict[str, Any]:
    """The trial's values by path, decoded from Ray's config (which may hold more keys)."""
    return {
        path: _decode(config[path]) if not isinstance(dim, Range) else config[path] for path, dim in sweep.space.items()
    }


def searcher(sweep: Sweep, concurrency: int) -> Any:
    """Ray's variant generator for grid and random (seeded: a rerun draws the same trials and reuses them);
    Optuna's TPE or NSGA-II otherwise; at most `concurrency` trials at once."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if sweep.search in ("grid", "random"):
        return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=concurrency)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial INFO lines repeat the sweep's progress

    if sweep.search == "tpe":
        optuna_search = OptunaSearch(metric=OBJECTIVE, mode="max", sampler=optuna.samplers.TPESampler(seed=sweep.seed))
    else:
        sampler = optuna.samplers.NSGAIISampler(seed=sweep.seed)
        optuna_search = OptunaSearch(metric=[ACCURACY, LATENCY], mode=["max", "min"], sampler=sampler)
    return ConcurrencyLimiter(optuna_search, max_concurrent=concurrency)


def scheduler(sweep: Sweep, max_epochs: int) -> Any:
    """ASHA on the per-epoch val accuracy when `early_stop` is set, else None (every trial runs to its end)."""
    if sweep.early_stop is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    epochs = sweep.space.get("train.epochs")  # the longest trial sets ASHA's last rung
    if isinstance(epochs, Range):
        max_epochs = max(max_epochs, int(epochs.high))
    elif epochs is not None:
        max_epochs = max([max_epochs, *(epochs.grid if isinstance(epochs, Grid) else epochs)])

    return ASHAScheduler(
        time_attr=EPOCH,
        metric=VAL_ACCURACY,
        mode="max",
        max_t=max(max_epochs, sweep.early_stop.grace_epochs),
        grace_period=sweep.early_stop.grace_epochs,
        reduction_factor=sweep.early_stop.reduction_factor,
        stop_last_trials=False,  # a trial that reaches its last epoch goes on to export, quantize and validate
    )


def trial_count(sweep: Sweep, trials: int | None) -> int:
    """How many trials the sweep runs: every grid combination (times `trials` passes for random), else `trials`."""
    grids = [d for d in sweep.space.values() if isinstance(d, Grid) or (sweep.search == "grid" and isinstance(d, list))]
    combinations = 1
    for dimension in grids:
        combinations *= len(dimension.grid if isinstance(dimension, Grid) else dimension)
    return combinations * num_samples(sweep, trials)


def num_samples(sweep: Sweep, trials: int | None) -> int:
    """Ray Tune's `num_samples`: one pass over the grid, or `trials` (the command line's, the file's, else 10) draws."""
    return 1 if sweep.search == "grid" else (trials or sweep.trials or 10)


def _range(dimension: Range) -> Any:
    from ray import tune

    if dimension.integer:  # both ends included
        sample = tune.lograndint if dimension.log else tune.randint
        return sample(int(dimension.low), int(dimension.high) + 1)
    return (tune.loguniform if dimension.log else tune.uniform)(dimension.low, dimension.high)


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return "yaml:" + yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("yaml:"):
        return yaml.safe_load(value.removeprefix("yaml:"))
    return value
