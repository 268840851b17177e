"""The recipe's `task` against its other sections: what a multi-label build supports, checked before anything runs.

Each refusal names the field and says why, as one paragraph (RecipeError, exit code 2), so a
recipe never trains for minutes and then fails on a field that cannot apply to label sets.
"""

from __future__ import annotations

from pathlib import Path

from edgetl.errors import RecipeError

# field (as the recipe spells it) → why a multi-label build refuses it
_MULTILABEL_REFUSES = {
    "distill": "distillation matches the teacher's softmax over classes, which a label set does not have",
    "adapt": "domain adaptation's report compares top-1 accuracies before and after adapting",
    "train.class_balance": "class weights and the balanced sampler count one class per image; use "
    "`train.pos_weight: balanced` to weigh rare labels",
    "train.label_smoothing": "label smoothing spreads one class's probability over the others (softmax); "
    "binary cross-entropy has no such spread",
    "gates.min_accuracy": "a label set has no top-1 accuracy; use `gates.min_map` (test mAP)",
    "quantize[].method qat": "QAT fine-tunes with the softmax cross-entropy of one class per image",
    "quantize[].max_accuracy_drop": "accuracy control measures top-1 accuracy; `min_agreement` controls the "
    "agreement of label sets",
}


def check(recipe, path: Path) -> None:
    """Raise RecipeError naming the first field of `recipe` (read from `path`) that its `task` cannot use."""
    multilabel = recipe.task == "multilabel"
    data = recipe.data
    if multilabel and data.path is not None:
        _refuse(
            path,
            "data.path",
            "class folders give each image one label; set `data.manifest` to a .csv or "
            ".jsonl manifest whose rows list each image's labels (or `data.builtin: digits-mosaic`)",
        )
    if data.builtin is not None and (data.builtin == "digits-mosaic") != multilabel:
        wanted = "multilabel" if data.builtin == "digits-mosaic" else "single"
        _refuse(path, "data.builtin", f"{data.builtin} is a {wanted} dataset; set `task: {wanted}`", recipe.task)
    if not multilabel:
        set_only = [f for f, on in (("gates.min_map", recipe.gates.min_map is not None),
                                    ("train.pos_weight", recipe.train.pos_weight != "none"),
                                    ("data.allow_empty_labels", data.allow_empty_labels)) if on]  # fmt: skip
        if set_only:
            _refuse(path, set_only[0], "it applies to `task: multilabel`", "single")
        return
    used = {**single_label_only(recipe), "gates.min_accuracy": recipe.gates.min_accuracy is not None}
    for field, on in used.items():
        if on:
            _refuse(path, field, _MULTILABEL_REFUSES[field])


def single_label_only(recipe) -> dict[str, bool]:
    """Whether the recipe uses each field that only a single-task, single-label build supports (label sets and
    several tasks refuse them alike)."""
    train = recipe.train
    return {
        "distill": recipe.distill is not None,
        "adapt": recipe.adapt is not None,
        "train.class_balance": train.class_balance != "none",
        "train.label_smoothing": "label_smoothing" in train.model_fields_set and train.label_smoothing,
        "quantize[].method qat": any(v.method == "qat" for v in recipe.quantize),
        "quantize[].max_accuracy_drop": any(v.max_accuracy_drop is not None for v in recipe.quantize),
    }


def _refuse(path: Path, field: str, why: str, task: str = "multilabel") -> None:
    raise RecipeError(f"{path}: `{field}` cannot be used with `task: {task}`: {why}.")
