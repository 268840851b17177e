"""Gates, selection, the deploy bundle, the stage cache and crash safety, on real builds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgetl import data, gates, validate
from edgetl.build_report import BuildReport
from edgetl.recipe import GatesConfig, load_recipe
from edgetl.report import compare
from edgetl.runtime.engines import open_engine
from edgetl.runtime.metrics import Latency, VariantMetrics
from edgetl.runtime.preprocess import Preprocessing, normalize


def edgetl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgetl", *args], capture_output=True, text=True)


def variant(name: str, runtime: str, accuracy: float, p50: float, size: float) -> VariantMetrics:
    return VariantMetrics(
        name=name,
        runtime=runtime,
        accuracy=accuracy,
        accuracy_drop=0.95 - accuracy,
        agreement=accuracy + 0.04,
        latency_ms=Latency(p50),
        size_mb=size,
    )


VARIANTS = [
    variant("pytorch-fp32", "pytorch", 0.95, 20.0, 14.0),
    variant("onnx-fp32", "onnxruntime", 0.95, 6.0, 13.5),
    variant("ort-int8", "onnxruntime", 0.93, 3.0, 3.8),
    variant("ov-int8", "openvino", 0.94, 4.0, 3.7),
]


@pytest.mark.parametrize(
    ("policy", "expected"), [("fastest", "ort-int8"), ("most_accurate", "onnx-fp32"), ("smallest", "ov-int8")]
)
def test_selection_policies_pick_among_deployable_variants(policy: str, expected: str) -> None:
    decision = gates.run(VARIANTS, GatesConfig(), policy)
    assert decision.passed and decision.selected == expected and decision.outcomes == []


def test_a_variant_failing_any_gate_is_not_selected_and_the_failure_names_gate_threshold_and_value() -> None:
    decision = gates.run(VARIANTS, GatesConfig(min_accuracy=0.935, max_size_mb=10), "fastest")
    assert decision.selected == "ov-int8"  # ort-int8 is faster but below min_accuracy; onnx-fp32 too big
    assert "gate min_accuracy failed for ort-int8: needs ≥ 0.935, measured 0.93" in decision.failures()
    assert "gate max_size_mb failed for onnx-fp32: needs ≤ 10 MB, measured 13.5 MB" in decision.failures()
    assert not any(o.variant == "pytorch-fp32" for o in decision.outcomes)

    none_pass = gates.run(VARIANTS, GatesConfig(max_latency_ms=1.0), "fastest")
    assert not none_pass.passed and none_pass.selection is None and len(none_pass.failures()) == 3


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny recipe built once through the CLI, with one INT8 variant."""
    from tests.conftest import write_folder, write_recipe

    root = tmp_path_factory.mktemp("deploy")
    images = write_folder(root / "images")
    recipe = write_recipe(
        root / "recipe.yaml",
        f"""
        name: tiny
        data: {{path: {images}, val_split: 0.2, test_split: 0.2, image_size: 32, augment: none}}
        train: {{strategy: linear_probe, epochs: 3, batch_size: 8, lr: 0.01}}
        quantize: [{{runtime: onnxruntime, activation_type: uint8}}]
        measure: {{latency_rounds: 2, latency_runs: 3, warmup: 2, throughput_batch: 4}}
        """,
    )
    done = edgetl("build", str(recipe), "-o", str(root / "run"))
    assert done.returncode == 0, done.stderr
    return recipe, root / "run"


def test_bundle_holds_the_selected_model_its_contract_and_hashes_and_predicts_like_the_report(
    built: tuple[Path, Path],
) -> None:
    recipe_path, run = built
    report = json.loads((run / "report.json").read_text())
    manifest = json.loads((run / "bundle" / "edgetl.json").read_text())
    assert manifest["variant"] == report["selected"]["name"] and report["passed"]
    assert manifest["labels"] == ["china", "flower"] and manifest["input"]["shape"] == ["batch", 3, 32, 32]
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((run / "bundle" / name).read_bytes()).hexdigest() == digest
    assert (
        manifest["metrics"]["accuracy"]
        == next(v for v in report["variants"] if v["name"] == manifest["variant"])["accuracy"]
    )
    with tarfile.open(run / "tiny.tar.gz") as archive:
        assert sorted(archive.getnames()) == sorted(f"tiny/{p.name}" for p in (run / "bundle").iterdir())

    pre = Preprocessing.from_dict(manifest["preprocessing"])
    test = data.run(load_recipe(recipe_path).data, pre, seed=0).test
    engine = open_engine(run / "bundle" / manifest["model"], manifest["runtime"])
    accuracy = float(np.mean(engine.run(normalize(test.images, pre)).argmax(1) == test.labels))
    assert accuracy == pytest.approx(manifest["metrics"]["accuracy"])


def test_report_json_reads_back_as_the_records_it_was_written_from(built: tuple[Path, Path]) -> None:
    _, run = built
    text = (run / "report.json").read_text()
    report = BuildReport.from_json(text)
    assert BuildReport.from_json(report.to_json()) == report
    assert report.to_json() == text  # the same keys, in the same order, with the same rounding
    selected = report.selected_variant()
    assert selected.name == report.selected.name and selected.latency_ms.p99 >= selected.latency_ms.p50
    assert report.export.parity[0].name == "onnx-fp32" and all(
        p.passed and p.agreement == 1.0 for p in report.export.parity
    )
    # the validate stage's own file holds the same rows; the bundle's metrics are the selected row less two fields
    assert validate.Validation.load(next((run / "stages").glob("validate-*"))).variants == report.variants
    manifest = json.loads((run / "bundle" / "edgetl.json").read_text())
    assert VariantMetrics.from_dict(manifest["metrics"]) == replace(selected, file=None, confusion_matrix=None)


def test_a_report_json_written_before_later_fields_were_added_still_loads(
    built: tuple[Path, Path], tmp_path: Path
) -> None:
    _, run = built
    older = json.loads((run / "report.json").read_text())
    del older["transfer"]
    for field in ("runtime", "install", "bundle_sha256"):
        del older["selected"][field]
    for epoch in older["training"]["history"]:
        del epoch["val_loss"]
    report = BuildReport.from_dict(older)
    assert report.transfer is None and report.selected.install is None and report.selected.bundle_sha256 is None
    assert report.to_dict() == older  # what it lacked stays absent when written back
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "report.json").write_text(json.dumps(older))
    (tmp_path / "new").mkdir()
    shutil.copyfile(run / "report.json", tmp_path / "new" / "report.json")
    markdown = compare([tmp_path / "old", tmp_path / "new"], tmp_path / "compare").markdown.read_text()
    assert "| tiny (old) | linear_probe |" in markdown and f"| tiny (new) | {report.selected.name} |" in markdown


def test_changing_only_a_gate_reuses_every_stage_and_the_exit_code_follows_the_gate(
    built: tuple[Path, Path], tmp_path: Path
) -> None:
    recipe, run = built
    before = json.loads((run / "report.json").read_text())
    started = time.monotonic()
    failed = edgetl("build", str(recipe), "-o", str(run), "--set", "gates.max_latency_ms=0.0001")
    seconds = time.monotonic() - started
    assert failed.returncode == 3, failed.stderr
    assert (
        "gate max_latency_ms failed for onnx-fp32: needs ≤ 0.0001 ms, measured" in failed.stderr
        and "Traceback" not in failed.stderr
    )
    after = json.loads((run / "report.json").read_text())
    assert set(after["stages"].values()) == {"reused"}
    assert after["variants"] == before["variants"] and not after["passed"] and after["selected"] is None
    assert not (run / "bundle").exists() and not (run / "tiny.tar.gz").exists()
    assert seconds < 60  # generous for a loaded CI machine; benchmarks/ and the note give the real figure

    passed = edgetl("build", str(recipe), "-o", str(run), "--set", "gates.min_accuracy=0.5")
    assert passed.returncode == 0, passed.stderr
    assert (run / "bundle" / "edgetl.json").is_file()


def test_changing_quantize_reruns_quantization_but_not_training(built: tuple[Path, Path]) -> None:
    recipe, run = built
    done = edgetl(
        "build",
        str(recipe),
        "-o",
        str(run),
        "--set",
        "quantize=[{runtime: onnxruntime, activation_type: uint8, calibration_images: 8}]",
    )
    assert done.returncode == 0, done.stderr
    stages = json.loads((run / "report.json").read_text())["stages"]
    assert stages["train"] == stages["export"] == "reused"
    assert stages["quantize ort-int8"] == stages["validate"] == "built"


def test_sigkill_during_export_leaves_no_complete_looking_outputs_and_the_next_run_recovers(
    built: tuple[Path, Path], tmp_path: Path
) -> None:
    recipe, _ = built
    run = tmp_path / "run"
    assert edgetl("build", str(recipe), "-o", str(run), "--set", "gates.min_accuracy=0.5").returncode == 0
    overrides = ["--set", "export.parity_tolerance=0.002"]  # a new export key: export reruns, training is reused
    process = subprocess.Popen(
        [sys.executable, "-m", "edgetl", "build", str(recipe), "-o", str(run), *overrides],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list((run / "stages").glob(".export-*.tmp")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the build ended before export began"
    assert not (run / "bundle").exists() and not (run / "tiny.tar.gz").exists() and not (run / "report.json").exists()
    assert len(list((run / "stages").glob("export-*"))) == 1  # only the earlier, complete export

    again = edgetl("build", str(recipe), "-o", str(run), *overrides)
    assert again.returncode == 0, again.stderr
    report = json.loads((run / "report.json").read_text())
    assert report["stages"]["train"] == "reused" and report["stages"]["export"] == "built"
    assert not list((run / "stages").glob(".*.tmp"))
    manifest = json.loads((run / "bundle" / "edgetl.json").read_text())
    assert all(hashlib.sha256((run / "bundle" / n).read_bytes()).hexdigest() == d for n, d in manifest["files"].items())
    assert np.isfinite(report["variants"][1]["accuracy"])
