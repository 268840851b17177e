"""Several tasks on one backbone (`tasks:`): the task list's schema, and what a multi-task build cannot do yet.

A recipe with `tasks:` trains one backbone with one head per task (loss = Σ loss_weight × task
loss); each task reads its labels from its own manifest column. Fields that assume one task are
refused by name as one paragraph (RecipeError, exit code 2) before anything runs, as
`edgetl.recipe.tasks` does for multi-label.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from edgetl.errors import RecipeError
from edgetl.recipe.sections import Section
from edgetl.recipe.tasks import single_label_only

BUILTIN_COLUMNS = ("digit", "parity")  # data.builtin digits: the digit (0-9) and its parity (even/odd)
RESERVED_NAMES = ("image", "path", "split")  # the ONNX input and the manifest's own columns


class TaskSpec(Section):
    """One task of a multi-task recipe: its name (the ONNX output's name), the manifest column of its labels,
    its kind and its weight in the summed loss."""

    name: str = Field(..., pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=64, description="Task and output name.")
    labels: str | None = Field(None, max_length=200, description="The manifest column of its labels (default: name).")
    kind: Literal["single", "multilabel"] = Field("single", description="One class, or a `|` list of labels.")
    loss_weight: float = Field(1.0, gt=0, description="λ of this task in loss = Σ λ × task loss.")

    @property
    def column(self) -> str:
        return self.labels or self.name


# field (as the recipe spells it) → why a multi-task build refuses it
_REFUSES = {
    "task": "`tasks` lists each task's kind; drop `task`",
    "distill": "distillation matches one teacher's softmax over one task's classes",
    "adapt": "domain adaptation's report compares one task's top-1 accuracy before and after adapting",
    "train.class_balance": "class weights and the balanced sampler count the classes of one task",
    "train.label_smoothing": "label smoothing applies to one softmax; the tasks' losses are summed as they are",
    "train.pos_weight": "positive weights are counted over one label set",
    "quantize[].method qat": "QAT fine-tunes with one task's cross-entropy",
    "quantize[].max_accuracy_drop": "accuracy control measures one task's top-1 accuracy; `min_agreement` "
    "controls the agreement of every task's answers",
    "gates.min_map": "the gates apply to the mean of the tasks' primary metrics; use `gates.min_accuracy`",
    "data.path": "class folders give each image one label; set `data.manifest` with one column per task",
    "data.allow_empty_labels": "every multilabel task's row needs a label",
}


def check(recipe, path: Path) -> None:
    """Raise RecipeError naming the first field of `recipe` (read from `path`) that its `tasks` cannot use: see
    `_REFUSES`, duplicate task names, and builtin digits columns other than `BUILTIN_COLUMNS`."""
    tasks = recipe.tasks
    if not tasks:
        return
    names = [t.name for t in tasks]
    twice = sorted({n for n in names if names.count(n) > 1} | (set(names) & set(RESERVED_NAMES)))
    if twice:
        _refuse(path, "tasks[].name", f"{twice} appear twice or are reserved; each task needs its own output name")
    data, train = recipe.data, recipe.train
    if data.builtin is not None:
        unknown = [t.column for t in tasks if t.column not in BUILTIN_COLUMNS or t.kind != "single"]
        if data.builtin != "digits" or unknown:
            _refuse(path, "tasks[].labels", f"builtin digits has the single-label columns {list(BUILTIN_COLUMNS)}")
    used = {
        "task": "task" in recipe.model_fields_set,
        **single_label_only(recipe),
        "train.pos_weight": train.pos_weight != "none",
        "gates.min_map": recipe.gates.min_map is not None,
        "data.path": data.path is not None,
        "data.allow_empty_labels": data.allow_empty_labels,
    }
    for field, on in used.items():
        if on:
            _refuse(path, field, _REFUSES[field])


def _refuse(path: Path, field: str, why: str) -> None:
    raise RecipeError(f"{path}: `{field}` cannot be used with `tasks:` (several tasks on one backbone): {why}.")
