"""End-to-end `edgetl build` on tiny real data: strategies, determinism, resume, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edgetl import pipeline
from edgetl.infer import model_logits
from edgetl.models import REGISTRY, build, load_checkpoint
from edgetl.recipe import load_recipe
from edgetl.train import TrainedModel

pytestmark = pytest.mark.slow  # whole builds: `pytest -m 'not slow'` skips them


def edgetl(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgetl", *args], capture_output=True, text=True, **kwargs)


def test_build_writes_a_checkpoint_that_reproduces_its_metrics(tiny_recipe: Path, tmp_path: Path) -> None:
    done = edgetl("build", str(tiny_recipe), "-o", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.75  # palace vs flower crops: pretrained features separate them
    assert len(metrics["history"]) == 5 and metrics["dataset"]["counts"]["train"]["per_class"] == [8, 8]
    assert "augment" not in " ".join(metrics["notes"])  # augment none: nothing was overridden

    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    recipe = load_recipe(tiny_recipe)
    from edgetl import data

    dataset = data.run(recipe.data, checkpoint.preprocessing, recipe.seed)
    predictions = model_logits(checkpoint.model, dataset.test.images, checkpoint.preprocessing).argmax(1)
    assert np.mean(predictions == dataset.test.labels) == pytest.approx(metrics["test_accuracy"])
    assert checkpoint.labels == ("china", "flower")
    stage = next((tmp_path / "run" / "stages").glob("train-*"))
    for split in ("val", "test"):  # the export parity check and validation reuse them as PyTorch's logits
        expected = model_logits(checkpoint.model, dataset.split(split).images, checkpoint.preprocessing)
        np.testing.assert_allclose(np.load(stage / f"{split}_logits.npy"), expected, atol=1e-4)
    trained = TrainedModel.load(stage)  # what later stages get back from the cache
    assert trained.summary() == json.loads((stage / "train.json").read_text())
    assert trained.summary().items() <= metrics.items() and trained.checkpoint == stage / "checkpoint.pt"
    np.testing.assert_array_equal(trained.test_logits, np.load(stage / "test_logits.npy"))
    (stage / "val_logits.npy").unlink()  # as a stage folder written before val logits were kept
    assert TrainedModel.load(stage).val_logits is None and torch.equal(
        TrainedModel.load(stage).model.head.weight, checkpoint.model.head.weight
    )


def test_same_seed_same_data_gives_same_metrics(tiny_recipe: Path, tmp_path: Path) -> None:
    recipe = load_recipe(
        tiny_recipe, ["train.strategy=partial", "train.unfreeze=1", "data.augment=default", "train.epochs=2"]
    )
    first = pipeline.build(recipe, tmp_path / "a").metrics
    second = pipeline.build(recipe, tmp_path / "b").metrics
    assert _without_timing(first["history"]) == _without_timing(second["history"])
    assert first["test_accuracy"] == second["test_accuracy"]


def test_data_crop_pct_sets_the_contract_the_checkpoint_carries(tiny_recipe: Path, tmp_path: Path) -> None:
    assert REGISTRY.get("efficientnet_lite0").preprocessing(32).resize_size == 36  # the backbone's 0.875 crop
    pipeline.train_model(load_recipe(tiny_recipe, ["data.crop_pct=1.0", "train.epochs=1"]), tmp_path / "run")
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt").preprocessing.resize_size == 32  # the whole frame


def _without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in history]


@pytest.mark.parametrize("strategy", ["partial", "finetune"])
def test_frozen_stages_keep_pretrained_weights_and_batchnorm_statistics(
    tiny_recipe: Path, tmp_path: Path, strategy: str
) -> None:
    recipe = load_recipe(
        tiny_recipe,
        [
            f"train.strategy={strategy}",
            "train.unfreeze=2",
            "data.augment=strong",
            "train.epochs=2",
            "train.class_balance=balanced_sampler",
        ],
    )
    pipeline.build(recipe, tmp_path / "run")
    trained = load_checkpoint(tmp_path / "run" / "checkpoint.pt").model.stages.state_dict()
    pretrained = build(REGISTRY.get("efficientnet_lite0"), "pretrained", num_classes=2).stages.state_dict()
    unchanged = {k for k in trained if torch.equal(trained[k], pretrained[k])}
    stage_of = {k: int(k.split(".")[0]) for k in trained}  # stages: 0 stem, 1..7 blocks, 8 neck
    if strategy == "partial":  # unfreeze 2: stem and blocks 1..5 frozen, BatchNorm statistics included
        assert {k for k in trained if stage_of[k] <= 5} <= unchanged
        assert any(k not in unchanged for k in trained if stage_of[k] >= 6)
    else:
        assert "0.0.weight" not in unchanged and "8.0.weight" not in unchanged


def test_linear_probe_records_that_augmentation_was_not_applied(tiny_recipe: Path, tmp_path: Path) -> None:
    metrics = pipeline.build(
        load_recipe(tiny_recipe, ["data.augment=default", "train.epochs=1"]), tmp_path / "run"
    ).metrics
    assert any("data.augment=default was not applied" in note for note in metrics["notes"])


def test_resume_after_sigkill_ends_where_an_uninterrupted_run_does(tiny_recipe: Path, tmp_path: Path) -> None:
    overrides = [
        "--set",
        "train.strategy=partial",
        "--set",
        "train.unfreeze=2",
        "--set",
        "data.augment=default",
        "--set",
        "train.epochs=6",
    ]
    reference = edgetl("build", str(tiny_recipe), "-o", str(tmp_path / "ref"), *overrides)
    assert reference.returncode == 0, reference.stderr

    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "edgetl", "build", str(tiny_recipe), "-o", str(run), *overrides],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list((run / "state").glob("train-*.pt")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run / "metrics.json").exists(), "killed too late to test resuming"

    resumed = edgetl("build", str(tiny_recipe), "-o", str(run), "--resume", *overrides)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from epoch" in resumed.stderr
    want = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    got = json.loads((run / "metrics.json").read_text())
    assert [h["val_accuracy"] for h in got["history"]] == [h["val_accuracy"] for h in want["history"]]
    assert [round(h["train_loss"], 5) for h in got["history"]] == [round(h["train_loss"], 5) for h in want["history"]]
    assert got["test_accuracy"] == want["test_accuracy"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.path=/nonexistent/images", "is not a folder"),
        ("model.backbone=resnet19", "Did you mean resnet18"),
        ("train.unfreeze=99", "`train.unfreeze` is 99"),
        ("model.weights=missing.pth", "missing.pth does not exist"),
    ],
)
def test_cli_errors_are_one_paragraph_with_exit_code_2(
    tiny_recipe: Path, tmp_path: Path, override: str, message: str
) -> None:
    done = edgetl(
        "build", str(tiny_recipe), "-o", str(tmp_path / "run"), "--set", override, "--set", "train.strategy=partial"
    )
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
