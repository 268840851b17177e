"""Multi-task labels: a manifest with one column per task, or the bundled digits with a derived second task.

    path,digit,parity,split        (a multi-label task's column holds a `|` list: cat|outdoor)
    a/001.png,3,odd,train

Each row becomes one item whose label is a tuple of 0/1 over every task's classes, in the
recipe's task order (`edgetl.multitask`); decoded splits hold them as (N, Σ classes) uint8.
Each task's classes are its train rows' labels, sorted. Rows without a split are split at
random (seeded, `edgetl.label_sets.random_split`), not stratified: a combination of several
tasks' labels has no one class to stratify on.
"""

from __future__ import annotations

from pathlib import Path

from edgetl import label_sets, manifests
from edgetl.errors import DataError
from edgetl.manifests import SPLITS, Row
from edgetl.tasks import LabelTask


def listing(config, specs: list, seed: int) -> tuple[tuple[LabelTask, ...], tuple[str, ...], dict[str, list], str]:
    """The tasks (their classes found in the data), every task's classes as `task:class`, each split's
    (source, 0/1 tuple, name) items and the origin, of the recipe's `data` (`config`: builtin digits or a
    manifest) for its `tasks` (`specs`).

    Raises DataError naming the file and row: see `manifests.read`; also an empty task label, a task column
    that is missing, a task with fewer than 2 classes, a val/test label no train row has.
    """
    if config.builtin == "digits":
        images, targets = label_sets.digit_images()
        derived = {"digit": [str(t) for t in targets], "parity": ["odd" if t % 2 else "even" for t in targets]}
        rows = [(image, {s.column: derived[s.column][i] for s in specs}, f"digits[{i}]", None, f"digits[{i}]")
                for i, image in enumerate(images)]  # fmt: skip
        origin = "builtin:digits"
    else:
        manifest = Path(config.manifest)
        rows = [(row.path, values, str(row.path), row.split, f"{manifest} line {row.line} ({row.path})")
                for row, values in _read(manifest, specs)]  # fmt: skip
        origin = str(manifest)
    named = rows[0][3] is not None
    by_split = {name: [r for r in rows if r[3] in (None, name)] for name in SPLITS}
    tasks = tuple(_task(spec, by_split["train"], origin) for spec in specs)
    listed = {}
    for name in SPLITS if named else ("train",):
        items = [
            (source, _encode(values, specs, tasks, where), key) for source, values, key, _, where in by_split[name]
        ]
        if items or name == "train":
            listed[name] = sorted(items, key=lambda item: item[2])
    fractions = {"val": config.val_split, "test": config.test_split}
    missing = tuple(name for name in ("val", "test") if name not in listed)
    if missing:  # rows without a split, or no val/test rows: held out of train at random
        listed.update(label_sets.random_split(listed["train"], missing, fractions, seed))
    return tasks, tuple(f"{t.name}:{c}" for t in tasks for c in t.classes), listed, origin


def _read(manifest: Path, specs: list) -> list[tuple[Row, dict]]:
    """The manifest's rows (path and split checked as `manifests.read` does) with each task column's value."""
    columns = [s.column for s in specs]
    if not manifest.is_file() or manifest.suffix.lower() not in (".csv", ".jsonl"):
        raise DataError(
            f"`data.manifest` {manifest} is not a .csv or .jsonl file with columns path,{','.join(columns)}."
        )
    out = []
    for line, record in manifests.read_records(manifest, ("path", *columns)):
        row = manifests.parse_row(manifest, line, {**record, "label": "-"})  # path and split; the tasks' labels below
        values = {}
        for spec in specs:
            value = record.get(spec.column)
            where = f"{manifest} line {line}"
            if spec.kind == "multilabel":
                values[spec.column] = manifests.label_set(where, str(row.path), value, allow_empty=False)
            elif not isinstance(value, (str, int)) or not str(value).strip():
                raise DataError(
                    f"{where} ({row.path}) has no label in column `{spec.column}` (task {spec.name}). Give every "
                    "image a label for every task, or drop the row."
                )
            else:
                values[spec.column] = str(value).strip()
        out.append((row, values))
    if not out:
        raise DataError(f"`data.manifest` {manifest} has no rows. Add one row per image: path,{','.join(columns)}.")
    rows = [row for row, _ in out]
    manifests.require_consistent_splits(manifest, rows)
    manifests.require_unique_paths(manifest, rows)
    return out


def _task(spec, train_rows: list, origin: str) -> LabelTask:
    """The task of `spec` over the labels its train rows have, sorted."""
    found = set()
    for _, values, *_ in train_rows:
        value = values[spec.column]
        found.update(value if isinstance(value, tuple) else (value,))
    classes = tuple(sorted(found, key=lambda c: (len(c), c) if c.isdigit() else (0, c)))
    if len(classes) < 2:
        raise DataError(
            f"The train rows of {origin} have {len(classes)} label(s) {list(classes)} in column `{spec.column}` "
            f"(task {spec.name}); a task needs at least 2 classes with training images."
        )
    return LabelTask(spec.name, spec.kind, classes, spec.loss_weight)


def _encode(values: dict, specs: list, tasks: tuple[LabelTask, ...], where: str) -> tuple[int, ...]:
    """One row's labels as 0/1 over every task's classes. Raises DataError for a label no train row has."""
    bits: list[int] = []
    for spec, task in zip(specs, tasks):
        value = values[spec.column]
        chosen = set(value) if isinstance(value, tuple) else {value}
        unknown = sorted(chosen - set(task.classes))
        if unknown:
            raise DataError(
                f"{where} has label(s) {unknown} in column `{spec.column}`, which no train row has (task {task.name}"
                f"'s train labels are {list(task.classes)})."
            )
        bits.extend(int(c in chosen) for c in task.classes)
    return tuple(bits)
