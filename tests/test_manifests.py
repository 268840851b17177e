"""Label manifests (CSV, JSON Lines) on real images: the same build as class folders, and every bad row named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgetl import data, pipeline
from edgetl.errors import DataError
from edgetl.recipe import DataConfig, load_recipe
from edgetl.runtime.preprocess import Preprocessing
from tests.conftest import write_folder

PRE = Preprocessing(32, 36, "bilinear", (0.5,) * 3, (0.5,) * 3)


def rows_of(root: Path, split: str | None = None) -> list[dict]:
    """One row per image under <root>/<class>/*, paths relative to `root`, newest-first to prove order is not used."""
    return [
        {"path": str(path.relative_to(root)), "label": path.parent.name, **({"split": split} if split else {})}
        for path in sorted(root.glob("*/*"), reverse=True)
    ]


def write_csv(path: Path, rows: list[dict], columns: tuple[str, ...] = ("path", "label", "split")) -> Path:
    present = [c for c in columns if any(c in row for row in rows)]
    lines = [",".join(present)] + [",".join(str(row.get(c, "")) for c in present) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def config(**source) -> DataConfig:
    return DataConfig(val_split=0.2, test_split=0.2, **source)


def same_dataset(first: data.Dataset, second: data.Dataset) -> None:
    assert first.classes == second.classes and first.content_hash == second.content_hash
    for split in data.SPLITS:
        assert first.split(split).sources == second.split(split).sources
        assert first.split(split).labels.tolist() == second.split(split).labels.tolist()


def test_csv_and_jsonl_manifests_list_a_folder_root_as_the_folders_do(image_folder: Path) -> None:
    folders = data.run(config(path=image_folder), PRE, seed=3)
    from_csv = data.run(config(manifest=write_csv(image_folder / "labels.csv", rows_of(image_folder))), PRE, seed=3)
    from_jsonl = data.run(config(manifest=write_jsonl(image_folder / "labels.jsonl", rows_of(image_folder))), PRE, 3)
    same_dataset(folders, from_csv)
    same_dataset(folders, from_jsonl)
    assert [len(folders.split(s).labels) for s in data.SPLITS] == [16, 4, 4]


def test_a_split_column_matches_split_folders_and_missing_splits_are_carved(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_folder(root / "train", count=10)
    write_folder(root / "val", count=3, seed=5)
    rows = rows_of(root / "train", "train") + rows_of(root / "val", "validation")  # 20 + 6
    manifest = write_jsonl(
        tmp_path / "labels.jsonl",
        [{**r, "path": f"root/train/{r['path']}"} for r in rows[:20]]
        + [{**r, "path": f"root/val/{r['path']}"} for r in rows[20:]],
    )
    same_dataset(data.run(config(path=root), PRE, seed=0), data.run(config(manifest=manifest), PRE, seed=0))


def test_a_missing_or_corrupt_image_is_skipped_and_reported(image_folder: Path) -> None:
    (image_folder / "china" / "001.jpg").write_bytes(b"not a jpeg")
    rows = rows_of(image_folder) + [{"path": "china/gone.jpg", "label": "china"}]
    ds = data.run(config(manifest=write_csv(image_folder / "labels.csv", rows)), PRE, seed=0)
    skipped = {Path(s.path).name: s.reason for s in ds.skipped}
    assert set(skipped) == {"001.jpg", "gone.jpg"}
    assert sum(len(ds.split(s).labels) for s in data.SPLITS) == 24 + 1 - 2


@pytest.mark.parametrize(
    ("rows", "suffix", "message"),
    [
        ("path,label\nchina/000.png,china\nchina/000.png,flower\n", "csv", "line 3 lists"),
        ("path,label\nchina/000.png,\n", "csv", "line 2 (china/000.png) has an empty label"),
        ("path,label\n,china\n", "csv", "line 2 has no image path"),
        ("file,class\nchina/000.png,china\n", "csv", "no 'path' or 'label' column"),
        ("path,label,split\nchina/000.png,china,holdout\n", "csv", "split 'holdout'"),
        ("path,label,split\nchina/000.png,china,train\nchina/001.jpg,china,\n", "csv", "line 3"),
        (
            "path,label,split\nchina/000.png,china,train\nflower/000.png,flower,train\nchina/001.jpg,cat,test\n",
            "csv",
            "line 4 (",
        ),
        ('{"path": "china/000.png", "label": "china"}\n{"path": "china/001.jpg"\n', "jsonl", "line 2 is not valid"),
        ('["china/000.png", "china"]\n', "jsonl", "line 1 is a JSON list"),
        ("path,label\n", "csv", "has no rows"),
        ("path,label\nchina/000.png,china\n", "txt", "neither .csv nor .jsonl"),
    ],
)
def test_bad_manifests_name_the_row(image_folder: Path, rows: str, suffix: str, message: str) -> None:
    manifest = image_folder / f"labels.{suffix}"
    manifest.write_text(rows)
    with pytest.raises(DataError) as raised:
        data.run(config(manifest=manifest), PRE, seed=0)
    assert message in str(raised.value) and str(manifest) in str(raised.value)


def test_unknown_label_error_names_the_label_and_the_train_labels(image_folder: Path) -> None:
    rows = rows_of(image_folder, "train")
    rows[0].update(split="val")
    rows[1].update(split="test", label="cat")
    with pytest.raises(DataError) as raised:
        data.run(config(manifest=write_csv(image_folder / "labels.csv", rows)), PRE, seed=0)
    assert "line 3" in str(raised.value) and "'cat', which no train row has" in str(raised.value)
    assert "['china', 'flower']" in str(raised.value)


def test_the_cli_reports_a_bad_manifest_in_one_paragraph_with_exit_code_2(tiny_recipe: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label\nchina/000.png,china\nchina/000.png,china\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgetl",
            "build",
            str(tiny_recipe),
            "-o",
            str(tmp_path / "run"),
            "--set",
            "data.path=null",
            "--set",
            f"data.manifest={manifest}",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr
    assert "line 3 lists" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "report.json").exists()


@pytest.mark.slow
def test_a_csv_manifest_build_gives_the_folder_build_metrics(tiny_recipe: Path, image_folder: Path, tmp_path: Path):
    manifest = write_csv(image_folder / "labels.csv", rows_of(image_folder))
    folders = pipeline.build(load_recipe(tiny_recipe), tmp_path / "folders").metrics
    recipe = load_recipe(tiny_recipe, ["data.path=null", f"data.manifest={manifest}"])
    listed = pipeline.build(recipe, tmp_path / "manifest").metrics
    for name in ("test_accuracy", "val_accuracy", "best_epoch"):
        assert listed[name] == folders[name]
    assert [h["val_loss"] for h in listed["history"]] == [h["val_loss"] for h in folders["history"]]
