"""The sweep file: a base recipe, a search space over its fields by their `--set` path, a budget and an objective.

Validated like a recipe: unknown keys are errors naming the field, and every value of the
search space is applied to the base recipe as the `--set` override it stands for and
validated there, so `space: {train.epoch: [1, 2]}` or a strategy that does not exist fails
before any trial starts, with the recipe's own message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgetl.cache import key
from edgetl.errors import RecipeError
from edgetl.recipe import GatesConfig, Recipe, describe_errors, read_yaml, recipe_from_mapping

SEARCHES = ("grid", "random", "tpe", "nsga2")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Grid(_Strict):
    """Every value in turn (`search: grid` and `random`; Optuna samples, it does not enumerate)."""

    grid: list[Any] = Field(..., min_length=1)


class Range(_Strict):
    """Numbers from `low` to `high`, both included: integers when both are integers, else floats."""

    low: float | int
    high: float | int
    log: bool = Field(False, description="Sample on a log scale (learning rates).")

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low >= self.high:
            raise ValueError(f"a range needs finite low < high; got low {self.low}, high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0; got {self.low}")
        return self

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)


class EarlyStop(_Strict):
    """ASHA on the per-epoch val accuracy: a trial below the top 1/`reduction_factor` at a rung stops."""

    grace_epochs: int = Field(1, ge=1, description="Epochs every trial trains before it can be stopped.")
    reduction_factor: float = Field(2.0, gt=1)


class Resources(_Strict):
    """What each trial asks Ray for."""

    cpus: float = Field(1.0, gt=0, description="CPUs per trial; also its training and inference threads.")
    gpus: float | None = Field(None, ge=0, description="GPUs per trial; default 1 when the Ray cluster has any.")


class Sweep(_Strict):
    """A sweep file (v1)."""

    version: Literal[1] = 1
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=80)
    base: str | dict[str, Any] = Field(..., description="The base recipe: a path (relative to this file) or inline.")
    set: list[str] = Field(default_factory=list, description="`--set` overrides of the base, in every trial.")
    space: dict[str, list[Any] | Grid | Range] = Field(..., min_length=1)
    search: Literal["grid", "random", "tpe", "nsga2"] = "random"
    trials: int | None = Field(None, ge=1, description="Trials to sample (random, tpe, nsga2); grid runs them all.")
    concurrency: int | None = Field(None, ge=1, description="Trials at once; default as many as the CPUs allow.")
    seed: int = Field(0, ge=0)
    budget: GatesConfig = GatesConfig()
    objective: Literal["accuracy", "pareto"] = "accuracy"
    early_stop: EarlyStop | None = None
    resources: Resources = Resources()

    @model_validator(mode="after")
    def _search_fits_space(self) -> Sweep:
        if self.search == "grid":
            ranges = [path for path, dim in self.space.items() if isinstance(dim, Range)]
            if ranges:
                raise ValueError(f"search grid enumerates lists; {ranges} are ranges (use random, tpe or nsga2)")
        if self.search in ("tpe", "nsga2"):
            grids = [path for path, dim in self.space.items() if isinstance(dim, Grid)]
            if grids:
                raise ValueError(
                    f"search {self.search} samples, it cannot enumerate the grids {grids}; make them lists"
                )
        return self


@dataclass(frozen=True)
class SweepPlan:
    """A validated sweep file with its base recipe read; `trial_overrides` turns a sampled point into a trial."""

    sweep: Sweep
    file: Path  # the sweep file
    base_raw: dict[str, Any]  # the base recipe as read (before overrides)
    base_path: Path  # names the base recipe in errors; its folder resolves the recipe's relative paths

    def trial_overrides(self, point: dict[str, Any]) -> list[str]:
        """The `--set` overrides of the sampled `point` ({path: value}), in the space's order."""
        return [override(path, point[path]) for path in self.sweep.space]

    def trial_name(self, overrides: list[str], sweep_sets: list[str]) -> str:
        """The trial's recipe and run folder name: the sweep's name and a hash of the base recipe and of what the
        trial and the sweep set in it, so a rerun finds the same trial and a changed base or budget does not."""
        return f"{self.sweep.name}-{key(self.base_raw, self.sweep.set, overrides, sweep_sets)[:8]}"

    def sweep_overrides(self, cpus: int) -> list[str]:
        """What the sweep sets in every trial, after the space: threads (when the base leaves them to the machine,
        a trial gets its share of the CPUs, not all of them), `select` (the accuracy objective ships the most
        accurate variant within budget) and the budget as gates."""
        base = recipe_from_mapping(self.base_raw, self.base_path, self.sweep.set)
        sets = [
            f"{section}.threads={cpus}" for section in ("train", "measure") if getattr(base, section).threads is None
        ]
        if self.sweep.objective == "accuracy":
            sets.append("select=most_accurate")
        return sets + self.budget_gates()

    def budget_gates(self) -> list[str]:
        """The budget as `gates.*` overrides of every trial."""
        return [f"gates.{gate}={value!r}" for gate, value in self.sweep.budget.model_dump(exclude_none=True).items()]

    def trial_recipe(self, overrides: list[str], sweep_sets: list[str]) -> Recipe:
        """The trial's complete recipe. Raises RecipeError for a combination the recipe refuses."""
        name = self.trial_name(overrides, sweep_sets)
        sets = [f"name={name}", *self.sweep.set, *overrides, *sweep_sets]
        return recipe_from_mapping(self.base_raw, self.base_path, sets)


def override(path: str, value: Any) -> str:
    """`path=value` as `--set` takes it: the value as one line of YAML (`[{runtime: openvino}]` for a list)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return f"{path}={text.removesuffix('...').strip()}"


def load_sweep(path: Path) -> SweepPlan:
    """Read and validate a sweep file and every value of its search space against the base recipe.

    Raises RecipeError naming the file and the field.

    >>> load_sweep(Path("recipes/sweep.yaml")).sweep.search
    'grid'
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"Sweep file {path} does not exist. Pass the path of a YAML sweep, e.g. recipes/sweep.yaml.")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise RecipeError(f"{path} must be a YAML mapping (name, base, space, budget); got a {type(raw).__name__}.")
    try:
        sweep = Sweep.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(_describe(exc, path)) from None
    base_raw, base_path = _read_base(sweep.base, path)
    plan = SweepPlan(sweep, path, base_raw, base_path)
    try:  # the base recipe with the sweep's `set` must be valid alone
        recipe_from_mapping(base_raw, base_path, sweep.set)
    except RecipeError as exc:
        raise RecipeError(f"{path}: the base recipe with `set` {sweep.set} is not valid: {exc}") from None
    try:  # and with the budget as its gates (a multi-label base has no top-1 accuracy to bound, say)
        recipe_from_mapping(base_raw, base_path, [*sweep.set, *plan.budget_gates()])
    except RecipeError as exc:  # the budget's fields are the gates': name them as the sweep file does
        message = str(exc).removeprefix(f"{base_path}: ").replace("gates.", "budget.")
        raise RecipeError(f"{path}: `budget` does not fit the base recipe: {message}") from None
    for field, dimension in sweep.space.items():
        _check_dimension(plan, field, dimension)
    return plan


def _read_base(base: str | dict[str, Any], sweep_file: Path) -> tuple[dict[str, Any], Path]:
    if isinstance(base, dict):
        return base, sweep_file
    base_path = (sweep_file.parent / base).resolve()
    if not base_path.is_file():
        raise RecipeError(f"{sweep_file}: `base` names the recipe {base_path}, which does not exist.")
    raw = read_yaml(base_path, f"{base_path} (the base of {sweep_file})")
    if not isinstance(raw, dict):
        raise RecipeError(f"{base_path} (the base of {sweep_file}) must be a YAML mapping; got {type(raw).__name__}.")
    return raw, base_path


def _check_dimension(plan: SweepPlan, field: str, dimension: list[Any] | Grid | Range) -> None:
    """Each value of one search dimension applied alone to the base recipe must give a valid recipe."""
    where = f"{plan.file}: `space.{field}`"
    if field.split(".")[0] in ("name", "gates", "version"):
        raise RecipeError(f"{where}: the sweep sets `name` and `gates` (from `budget`) itself; remove this entry.")
    if isinstance(dimension, Range):
        values = [dimension.low, dimension.high]
    else:
        values = dimension.grid if isinstance(dimension, Grid) else dimension
    if not values:
        raise RecipeError(f"{where} is an empty list; give at least one value.")
    for value in values:  # with the budget as gates, as each trial has it (named as the sweep file names it)
        try:
            recipe_from_mapping(
                plan.base_raw, plan.base_path, [*plan.sweep.set, override(field, value), *plan.budget_gates()]
            )
        except RecipeError as exc:
            message = str(exc).replace("gates.", "budget.")
            raise RecipeError(f"{where}: the value {value!r} does not make a valid recipe: {message}") from None


def _describe(exc: ValidationError, path: Path) -> str:
    return describe_errors(exc, f"{path} is not a valid sweep file:", _allowed)


def _allowed(loc: tuple[Any, ...]) -> list[str]:
    models = {(): Sweep, ("budget",): GatesConfig, ("early_stop",): EarlyStop, ("resources",): Resources}
    model = models.get(tuple(str(p) for p in loc))
    return list(model.model_fields) if model else ["grid", "low", "high", "log"]
