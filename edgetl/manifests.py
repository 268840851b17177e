"""Label manifests: one row per image in a CSV or JSON Lines file, as labeling tools export them.

A row names an image by its path (relative to the manifest's folder, or absolute), its label,
and optionally its split (`train`, `val` or `validation`, `test`):

    path,label,split                          {"path": "cat/001.jpg", "label": "cat", "split": "train"}
    cat/001.jpg,cat,train

The rows become the same (source, label, name) listing an ImageFolder gives, in the same order
(per class, then by path), so the same images as a manifest and as class folders make the same
build.

Multi-label manifests (`task: multilabel`) give each row a set of labels, as a `labels` column
delimited by `|` (`cat|outdoor`; empty: no label), as one 0/1 column per label (every column but
`path` and `split`; the header names the labels), or in JSON Lines as `"labels": ["cat", "outdoor"]`.
Their rows are listed by path, each with a tuple of 0/1 per label (the labels sorted).

Malformed rows are errors that name the file and the row; an image the row points to that is
missing or unreadable is skipped and reported by the data stage like a corrupt image.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgetl.errors import DataError

SPLITS = ("train", "val", "test")
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
_COLUMNS = "\0label columns"  # a record's key for its manifest's 0/1 label columns (no CSV header names it)
DELIMITER = "|"  # between the labels of a multi-label row's `labels` field
_MAX_FIELD = 4096  # characters in one field: a path or a label; longer means the file is not a manifest


@dataclass(frozen=True)
class Row:
    """One manifest row: `line` is its line number in the file (the CSV header is line 1)."""

    line: int
    path: Path
    label: str  # "" in a multi-label manifest
    split: str | None  # train | val | test; None when the manifest has no split column
    labels: tuple[str, ...] = ()  # a multi-label manifest's label set (possibly empty)
    columns: tuple[str, ...] = ()  # the label columns of a manifest with one 0/1 column per label


def read(manifest: Path, multilabel: bool = False, allow_empty: bool = False) -> list[Row]:
    """Every row of `manifest` (.csv or .jsonl), checked; `multilabel`: each row has a label set (empty ones only
    with `allow_empty`).

    Raises DataError naming the file and the row: an unreadable file, a missing `path` or
    `label` column, an empty path or label, an unknown split name, a path listed twice, a
    split column some rows leave empty; multi-label: a 0/1 column holding another value (naming
    the column), a `labels` field that is not a list of strings, an empty label set.
    """
    if not manifest.is_file():
        raise DataError(f"`data.manifest` {manifest} is not a file. Point it at a .csv or .jsonl label manifest.")
    if manifest.suffix.lower() not in (".csv", ".jsonl"):
        raise DataError(
            f"`data.manifest` {manifest} is neither .csv nor .jsonl; save the labels as CSV (columns path,label"
            "[,split]) or JSON Lines (one object per line with path, label and optionally split)."
        )
    records = read_records(manifest, ("path", "labels" if multilabel else "label"))
    rows = [parse_row(manifest, line, record, multilabel, allow_empty) for line, record in records]
    if not rows:
        raise DataError(f"`data.manifest` {manifest} has no rows. Add one row per image: path, label[, split].")
    require_consistent_splits(manifest, rows)
    require_unique_paths(manifest, rows)
    return rows


def listing(
    manifest: Path, multilabel: bool = False, allow_empty: bool = False
) -> tuple[tuple[str, ...], dict[str, list[tuple[Path, int | tuple[int, ...], str]]], bool]:
    """The classes (the train rows' labels, sorted), each split's (path, label index, name) items in an
    ImageFolder's order (by class, then path), and whether the rows name their splits (if not, every row is
    listed under "train", for the data stage to split).

    Raises DataError naming the file and row: see `read`; also fewer than two classes, or a val/test label
    that no train row has.
    """
    rows = read(manifest, multilabel, allow_empty)
    named_splits = rows[0].split is not None
    split_rows = {name: [row for row in rows if row.split in (None, name)] for name in SPLITS}
    if multilabel:
        return _multilabel_listing(manifest, split_rows, named_splits)
    classes = tuple(sorted({row.label for row in split_rows["train"]}))
    if len(classes) < 2:
        raise DataError(
            f"The train rows of `data.manifest` {manifest} have {len(classes)} label(s) {list(classes)}; edgetl "
            "needs at least 2 classes with training images."
        )
    index = {name: label for label, name in enumerate(classes)}
    listed = {}
    for name in SPLITS if named_splits else ("train",):
        unknown = next((row for row in split_rows[name] if row.label not in index), None)
        if unknown is not None:
            raise DataError(
                f"{manifest} line {unknown.line} ({unknown.path}) has label {unknown.label!r}, which no train row has. "
                f"Every class needs training images; the train labels are {list(classes)}."
            )
        items = [(row.path, index[row.label], str(row.path)) for row in split_rows[name]]
        if items or name == "train":
            listed[name] = sorted(items, key=lambda item: (item[1], item[0]))
    return classes, listed, named_splits


def _multilabel_listing(manifest: Path, split_rows: dict[str, list[Row]], named_splits: bool):
    """`listing` of multi-label rows: the labels of the train rows, sorted; items by path with 0/1 per label."""
    named = {label for row in split_rows["train"] for label in (*row.labels, *row.columns)}  # a 0/1 column: a label
    classes = tuple(sorted(named))
    if len(classes) < 2:
        raise DataError(
            f"The train rows of `data.manifest` {manifest} have {len(classes)} label(s) {list(classes)}; a "
            "multi-label build needs at least 2 labels with training images."
        )
    listed = {}
    for name in SPLITS if named_splits else ("train",):
        unknown = next((row for row in split_rows[name] if not set(row.labels) <= set(classes)), None)
        if unknown is not None:
            extra = sorted(set(unknown.labels) - set(classes))
            raise DataError(
                f"{manifest} line {unknown.line} ({unknown.path}) has label(s) {extra}, which no train row has. "
                f"Every label needs training images; the train labels are {list(classes)}."
            )
        items = [(row.path, tuple(int(c in row.labels) for c in classes), str(row.path)) for row in split_rows[name]]
        if items or name == "train":
            listed[name] = sorted(items, key=lambda item: item[0])
    return classes, listed, named_splits


def read_records(manifest: Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """The (line, record) pairs of a .csv (with the `required` columns) or .jsonl manifest. Raises DataError when
    it cannot be read as UTF-8 text, or a line is malformed (`csv_records`, `jsonl_records`)."""
    try:
        with open(manifest, encoding="utf-8-sig", newline="") as handle:
            if manifest.suffix.lower() == ".csv":
                return list(csv_records(handle, manifest, required))
            return list(jsonl_records(handle, manifest))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"Cannot read `data.manifest` {manifest}: {exc}. Save it as UTF-8 text.") from None


def csv_records(handle, manifest: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """The CSV's records; a multi-label one (`required` path, labels) without a `labels` column has one 0/1 column
    per label, gathered into `labels` here."""
    reader = csv.DictReader(handle)
    try:
        columns = reader.fieldnames or []
        label_columns = [c for c in columns if c not in ("path", "split")] if required[1] == "labels" else []
        if label_columns == ["label"] and "labels" not in columns:
            raise DataError(
                f"`data.manifest` {manifest} has a single-label `label` column, but the recipe says `task: "
                "multilabel`. Name the column `labels` and list each image's labels separated by | (cat|dog), or "
                "give one 0/1 column per label; or drop `task: multilabel` for one label per image."
            )
        if label_columns and "labels" not in columns:
            required = ("path",)
        missing = [name for name in required if name not in columns]
        if missing:
            raise DataError(
                f"`data.manifest` {manifest} has no {' or '.join(repr(m) for m in missing)} column (its header is "
                f"{columns}). The first line must name the columns: path,label and optionally split."
            )
        for record in reader:
            if None in record:  # more fields than the header names
                raise DataError(
                    f"{manifest} line {reader.line_num} has more fields than the header {columns}; quote fields "
                    "that contain commas."
                )
            if required == ("path",):
                record["labels"] = _from_columns(manifest, reader.line_num, record, label_columns)
                record[_COLUMNS] = tuple(label_columns)
            yield reader.line_num, record
    except csv.Error as exc:
        raise DataError(f"{manifest} line {reader.line_num} is not valid CSV: {exc}.") from None


def _from_columns(manifest: Path, line: int, record: dict, columns: list[str]) -> list[str]:
    """The labels whose 0/1 column holds 1. Raises DataError naming the row and column of any other value."""
    for column in columns:
        value = (record[column] or "").strip()
        if value not in ("0", "1"):
            raise DataError(
                f"{manifest} line {line} ({record.get('path')}) has {value!r} in label column `{column}`; each label "
                "column holds 1 (the image has the label) or 0."
            )
    return [column for column in columns if record[column].strip() == "1"]


def jsonl_records(handle, manifest: Path) -> Iterator[tuple[int, dict]]:
    for line, text in enumerate(handle, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{manifest} line {line} is not valid JSON: {exc.msg}. Write one object per line."
            ) from None
        if not isinstance(record, dict):
            raise DataError(f"{manifest} line {line} is a JSON {type(record).__name__}; write one object per line.")
        yield line, record


def parse_row(manifest: Path, line: int, record: dict, multilabel: bool = False, allow_empty: bool = False) -> Row:
    where = f"{manifest} line {line}"
    fields = {}
    for name in ("path", "split") if multilabel else ("path", "label", "split"):
        value = record.get(name)
        if value is not None and not isinstance(value, (str, int)):
            raise DataError(f"{where}: `{name}` is a JSON {type(value).__name__}; give it as a string.")
        text = "" if value is None else str(value).strip()
        if len(text) > _MAX_FIELD:
            raise DataError(f"{where}: `{name}` is {len(text)} characters long; a path or label is under {_MAX_FIELD}.")
        fields[name] = text
    if not fields["path"]:
        raise DataError(f"{where} has no image path. Every row names one image file.")
    labels = label_set(where, fields["path"], record.get("labels"), allow_empty) if multilabel else ()
    if not multilabel and not fields["label"]:
        raise DataError(f"{where} ({fields['path']}) has an empty label. Give every image its class, or drop the row.")
    split = None
    if "split" in record:
        split = SPLIT_NAMES.get(fields["split"].lower()) if fields["split"] else ""
        if split is None:
            raise DataError(
                f"{where} ({fields['path']}) has split {fields['split']!r}; use train, val (or validation) or test."
            )
    columns = record.get(_COLUMNS, ())
    return Row(line, manifest.parent / fields["path"], fields.get("label", ""), split, labels, columns)


def label_set(where: str, path: str, value, allow_empty: bool) -> tuple[str, ...]:
    """A multi-label row's labels: a list of strings, or a string delimited by `DELIMITER`."""
    if isinstance(value, str):
        value = value.split(DELIMITER) if value.strip() else []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where} ({path}): `labels` must be a list of label names; got {value!r}.")
    labels = tuple(dict.fromkeys(v.strip() for v in value))  # in order, once each
    if "" in labels or any(len(v) > _MAX_FIELD for v in labels):
        raise DataError(f"{where} ({path}) has an empty or overlong label in {value!r}; separate labels by one `|`.")
    if not labels and not allow_empty:
        raise DataError(
            f"{where} ({path}) has an empty label set. Give every image at least one label, drop the row, or set "
            "`data.allow_empty_labels: true` to train on images that show none of the labels."
        )
    return labels


def require_consistent_splits(manifest: Path, rows: list[Row]) -> None:
    if any(row.split is not None for row in rows):
        empty = next((row for row in rows if not row.split), None)
        if empty is not None:
            raise DataError(
                f"{manifest} line {empty.line} ({empty.path}) has no split while other rows do. Give every row "
                "train, val or test, or drop the split column to have edgetl split the rows."
            )


def require_unique_paths(manifest: Path, rows: list[Row]) -> None:
    first: dict[Path, Row] = {}
    for row in rows:
        key = Path(os.path.normpath(row.path))  # a/./b, a/../a/b and a/b are one file
        if key in first:
            raise DataError(
                f"{manifest} line {row.line} lists {row.path} again (first on line {first[key].line}). An image "
                "appears once, with one label and one split: remove the duplicate row."
            )
        first[key] = row
