"""Recipe v1: the YAML file that describes a build, validated by a pydantic schema.

Unknown keys are errors, relative paths resolve against the recipe's folder, and every
error names the file, the field path and what is allowed, so a typo never trains the
wrong model for an hour.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_serializer, model_validator

from edgetl.errors import RecipeError
from edgetl.recipe import multitask, tasks
from edgetl.recipe.multitask import TaskSpec
from edgetl.recipe.sections import (
    AdaptConfig,
    DataConfig,
    DeviceConfig,
    DistillConfig,
    ExportConfig,
    GatesConfig,
    MeasureConfig,
    ModelConfig,
    QuantVariant,
    Section,
    TeacherConfig,
    TrainConfig,
    default_variants,
)

__all__ = [
    "AdaptConfig",
    "DataConfig",
    "DeviceConfig",
    "DistillConfig",
    "ExportConfig",
    "GatesConfig",
    "MeasureConfig",
    "ModelConfig",
    "QuantVariant",
    "TeacherConfig",
    "TrainConfig",
    "Recipe",
    "describe_errors",
    "load_recipe",
    "read_yaml",
    "recipe_from_mapping",
    "recipe_json_schema",
]


class Recipe(Section):
    """A whole build. `edgetl schema` prints this as JSON Schema for editors."""

    version: Literal[1] = 1
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100, description="Run and bundle name.")
    seed: int = Field(0, ge=0)
    task: Literal["single", "multilabel"] = Field(
        "single", description="single: one class per image; multilabel: a set of labels per image (sigmoid head)."
    )
    tasks: list[TaskSpec] | None = Field(
        None, min_length=2, description="Several tasks on one backbone, one head each (instead of `task`)."
    )
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    distill: DistillConfig | None = Field(None, description="Knowledge distillation from a bigger teacher.")
    adapt: AdaptConfig | None = Field(None, description="Unsupervised domain adaptation to unlabeled target images.")
    quantize: list[QuantVariant] = Field(
        default_factory=default_variants, description="Quantized variants to make and validate; [] for none."
    )
    measure: MeasureConfig = MeasureConfig()
    gates: GatesConfig = GatesConfig()
    select: Literal["fastest", "most_accurate", "smallest"] = Field(
        "fastest", description="Which variant that passes every gate goes into the bundle."
    )
    device: DeviceConfig = DeviceConfig()

    @model_validator(mode="after")
    def _unique_variants(self) -> Recipe:
        names = [v.display_name for v in self.quantize]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"quantize variant names must be unique; {duplicates} appear twice (set `name:` on one)")
        return self

    @model_serializer(mode="wrap")
    def _without_tasks(self, handler) -> dict[str, Any]:
        """A recipe without `tasks` dumps without the key (a null list would only add noise to its reports)."""
        dumped = handler(self)
        if self.tasks is None:
            dumped.pop("tasks", None)
        return dumped

    def section_hash(self, *sections: str) -> str:
        """A short, stable hash of some sections: stage caches and reports key on it.

        Where and with how many workers the data is read (`data.cache_dir`, `data.workers`) does not
        shape the model: left out."""
        dumped = self.model_dump(mode="json", exclude={"data": {"cache_dir", "workers"}})
        payload = json.dumps({s: dumped[s] for s in sections}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_recipe(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe.

    >>> load_recipe(Path("recipes/quickstart.yaml"), ["train.epochs=3"]).train.epochs
    3
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(
            f"Recipe file {path} does not exist. Pass the path of a YAML recipe, "
            "e.g. `edgetl build recipes/quickstart.yaml`."
        )
    return recipe_from_mapping(read_yaml(path), path, overrides)


def read_yaml(path: Path, label: str | None = None) -> object:
    """The YAML document at `path` ({} when empty). Raises RecipeError naming `label` (default: the path) when it
    is not valid YAML."""
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{label or path} is not valid YAML: {exc}") from None


def recipe_from_mapping(raw: object, path: Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Override and validate a recipe already read as YAML (a sweep's inline base recipe, say); `path` names it in
    errors and its folder resolves relative paths. `raw` is not modified. Raises RecipeError.

    >>> recipe_from_mapping({"name": "x", "data": {"builtin": "digits"}}, Path("sweep.yaml"), ["seed=1"]).seed
    1
    """
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{path} must be a YAML mapping of sections (name, data, model, train); got a {type(raw).__name__}."
        )
    raw = copy.deepcopy(raw)
    for override in overrides:
        _apply_override(raw, override, path)
    try:
        recipe = Recipe.model_validate(raw, context={"base_dir": path.parent.resolve()})
    except ValidationError as exc:
        raise RecipeError(_describe(exc, path)) from None
    multitask.check(recipe, path)
    if not recipe.tasks:
        tasks.check(recipe, path)
    return recipe


def _apply_override(raw: dict[str, Any], override: str, path: Path) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise RecipeError(f"--set {override!r} must look like `section.field=value`, e.g. `--set train.epochs=5`.")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {override!r}: `{part}` in {path} is a value, not a section.")
        node = child
    node[leaf] = yaml.safe_load(value) if value.strip() else None


def _describe(exc: ValidationError, path: Path) -> str:
    return describe_errors(exc, f"{path} is not a valid recipe:", _allowed_fields)


def describe_errors(exc: ValidationError, title: str, allowed_fields: Callable[[tuple], list[str]]) -> str:
    """pydantic's errors as one paragraph under `title`: each field by its dotted path, with the fields
    allowed where an unknown one was given (`allowed_fields(parent path)`) and the closest as a hint."""
    lines = [title]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            allowed = allowed_fields(err["loc"][:-1])
            close = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            lines.append(f"  `{loc}` is not a known field.{hint} Allowed here: {', '.join(allowed)}.")
        elif err["type"] == "missing":
            lines.append(f"  `{loc}` is required.")
        else:
            where = f"`{loc}`: " if loc else ""
            lines.append(f"  {where}{err['msg'].removeprefix('Value error, ')}; got {err['input']!r}.")
    return "\n".join(lines)


def _allowed_fields(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def recipe_json_schema() -> dict[str, Any]:
    """The JSON Schema of recipe v1 (for editor completion and validation)."""
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "edgetl recipe v1"
    return schema
