"""A build you can trust at its finish: all-or-nothing outputs under SIGKILL and SIGTERM, no
leftovers, a full disk as a one-paragraph error, no non-finite model, an isolated probe,
epoch ranking on tiny val splits, and selection for the device's runtimes.

One tiny build is trained once (module fixture); each CLI build here starts from a copy of
its stage cache, so it reuses training and export and takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper

from edgetl import data, gates, pipeline, validate
from edgetl.errors import InferenceError, RecipeError
from edgetl.models import load_checkpoint
from edgetl.notes import Note, render
from edgetl.recipe import GatesConfig, load_recipe
from edgetl.runtime.metrics import Latency, VariantMetrics
from edgetl.runtime.predictor import Predictor
from edgetl.train import ranking_notes
from tests.conftest import write_folder, write_recipe

pytestmark = pytest.mark.slow  # whole builds: `pytest -m 'not slow'` skips them

# Runs the CLI like the `edgetl` console script does (its own folder first on sys.path, not
# the cwd), after replacing MODULE:ATTR with a version that SIGKILLs the process right after
# the original returns: a kill at an exact point, with nothing added to edgetl for tests.
LAUNCHER = """
import importlib, os, resource, signal, sys

kill_after, file_limit, *argv = sys.argv[1:]
if kill_after:
    module, _, path = kill_after.partition(":")
    *parents, name = path.split(".")
    owner = importlib.import_module(module)
    for part in parents:
        owner = getattr(owner, part)
    original = getattr(owner, name)

    def killing(*args, **kwargs):
        original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(owner, name, killing)
if file_limit:  # writes past it fail with EFBIG, a real OSError, as on a full disk
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(file_limit), int(file_limit)))
from edgetl.cli import main
sys.exit(main(argv))
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny recipe (patience 1) built once in-process: its recipe and its run folder."""
    root = tmp_path_factory.mktemp("trust")
    images = write_folder(root / "images")
    recipe = write_recipe(
        root / "recipe.yaml",
        f"""
        name: tiny
        data: {{path: {images}, val_split: 0.2, test_split: 0.2, image_size: 32, augment: none}}
        train: {{strategy: linear_probe, epochs: 5, batch_size: 8, lr: 0.01, patience: 1}}
        quantize: []
        measure: {{latency_rounds: 2, latency_runs: 3, warmup: 2, throughput_batch: 4}}
        """,
    )
    (root / "launcher").mkdir()
    (root / "launcher" / "edgetl_launcher.py").write_text(LAUNCHER)
    pipeline.build(load_recipe(recipe), root / "base")
    return recipe, root / "base"


def start(
    base: tuple[Path, Path],
    run: Path,
    *args: str,
    kill_after: str = "",
    file_limit: int = 0,
    cwd: Path | None = None,
    env: dict | None = None,
) -> subprocess.Popen:
    """`edgetl build` of the base recipe into `run`, whose stage cache starts as a copy of the base run's."""
    recipe, base_run = base
    if not (run / "stages").exists():
        shutil.copytree(base_run / "stages", run / "stages")
    launcher = recipe.parent / "launcher" / "edgetl_launcher.py"
    command = [
        sys.executable,
        str(launcher),
        kill_after,
        str(file_limit or ""),
        "build",
        str(recipe),
        "-o",
        str(run),
        *args,
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)


def build(base: tuple[Path, Path], run: Path, *args: str, **kwargs) -> tuple[int, str, str]:
    process = start(base, run, *args, **kwargs)
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def temporaries(run: Path) -> list[Path]:
    return [p for folder in (run, run / "stages", run / "state") for p in folder.glob(".*.tmp")]


def assert_no_report_claims_success_without_a_bundle(run: Path, image: Path) -> None:
    claims = {
        "report.json": (run / "report.json").is_file() and json.loads((run / "report.json").read_text())["passed"],
        "report.md": (run / "report.md").is_file() and "PASS" in (run / "report.md").read_text(),
        "report.html": (run / "report.html").is_file() and "PASS" in (run / "report.html").read_text(),
    }
    if any(claims.values()):
        for bundle in (run / "bundle", run / "tiny.tar.gz"):  # each loads, verifies its hashes and predicts
            assert Predictor.load(bundle).predict(image).label in ("china", "flower"), (claims, bundle)


# 5: the finish is all or nothing --------------------------------------------------------------


@pytest.mark.parametrize(
    ("point", "kill_after"),
    [
        ("bundle packing", "tarfile:TarFile.add"),  # the archive's first member written, bundle/ still staged
        ("archive written", "edgetl.bundle:run"),  # bundle/ and the archive in place, no report yet
        ("report written", "edgetl.report:write_reports"),  # report.md and report.html in place, report.json not yet
    ],
)
def test_sigkill_at_the_finish_never_leaves_a_report_claiming_success_without_a_bundle(
    base, tmp_path: Path, point: str, kill_after: str
) -> None:
    run = tmp_path / "run"
    code, _, err = build(base, run, kill_after=kill_after)
    assert code == -signal.SIGKILL, err
    assert not (run / "report.json").exists()  # report.json is the very last file a build writes
    assert_no_report_claims_success_without_a_bundle(run, base[0].parent / "images" / "china" / "001.jpg")
    if point == "report written":
        assert "PASS" in (run / "report.md").read_text()  # ... and it was written after the bundle: checked above
    if point == "bundle packing":  # 6: what the kill left is removed by the next run
        assert {p.name.split(".")[1] for p in temporaries(run)} >= {"bundle", "tiny"}
        code, out, err = build(base, run)
        assert code == 0, err
        assert temporaries(run) == [] and "removed 2 temporary file(s) a killed build left" in err
        assert json.loads((run / "report.json").read_text())["passed"]
        assert_no_report_claims_success_without_a_bundle(run, base[0].parent / "images" / "china" / "001.jpg")


# 6: quantizer temp files, SIGTERM ------------------------------------------------------------------


def wait_for(
    pattern: str, folder: Path, process: subprocess.Popen, old: Path | None = None, seconds: float = 120
) -> Path:
    """The first path matching `pattern` under `folder` that is not under `old`, once `process` made it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        found = [p for p in folder.glob(pattern) if old is None or not p.is_relative_to(old)]
        if found:
            return found[0]
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"{pattern} never appeared in {folder}: {process.communicate()[1][-2000:]}")


def left_in(system_tmp: Path) -> list[str]:
    """Files left in the temp folder. ONNX Runtime's import writes a 51-byte `.ses` session id there (not a
    temporary), and torch may make an empty `torchinductor_<user>` folder."""
    return [str(p.relative_to(system_tmp)) for p in system_tmp.rglob("*") if p.is_file() and p.name != ".ses"]


def test_quantizer_temp_files_stay_in_the_stage_and_sigterm_removes_every_temporary(base, tmp_path: Path) -> None:
    run, system_tmp = tmp_path / "run", tmp_path / "system-tmp"
    system_tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(system_tmp)}
    variant = ["--set", "quantize=[{runtime: onnxruntime, activation_type: uint8, calibration_images: 8}]"]

    killed = start(base, run, *variant, env=env)
    ort_working_files = ".quantize-*.tmp/.quantizer.*.tmp/ort.quant.*/*"  # ONNX Runtime's copies of the model
    written = wait_for(ort_working_files, run / "stages", killed)
    killed.kill()
    killed.communicate()
    assert left_in(system_tmp) == []  # they were under the stage's staging folder, not in the system's temp folder
    assert [p.name.split(".")[1].split("-")[0] for p in temporaries(run)] == ["quantize"]

    terminated = start(base, run, *variant, env=env)
    leftover = written.relative_to(run / "stages").parts[0]
    wait_for(ort_working_files, run / "stages", terminated, old=run / "stages" / leftover)
    terminated.send_signal(signal.SIGTERM)
    _, err = terminated.communicate(timeout=60)
    assert terminated.returncode == 143, err
    assert "edgetl: terminated (SIGTERM)" in err and "Traceback" not in err
    assert temporaries(run) == [] and left_in(system_tmp) == []  # the kill's leftover too: removed at the start
    assert not list((run / "stages").glob("quantize-*"))


# 7: a write the disk refuses ----------------------------------------------------------------------


def test_a_refused_write_is_an_output_error_naming_the_file(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        from edgetl.errors import OutputError
        from edgetl.fileio import write_json
        try:
            write_json(sys.argv[1], list(range(1000)))
        except OutputError as exc:
            print(exc.exit_code, exc)
        """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out.json")], capture_output=True, text=True)
    assert done.stdout.startswith(f"2 cannot write {tmp_path / 'out.json'}: File too large [EFBIG]"), done.stderr
    assert "--resume" in done.stdout and list(tmp_path.iterdir()) == []  # neither the file nor its temporary


def test_a_full_disk_while_saving_the_model_is_exit_2_and_resume_finishes_the_build(base, tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, _, err = build(base, run, "--set", "train.epochs=4", file_limit=1_000_000)  # retrains; its snapshot is 14 MB
    assert code == 2, err
    assert f"edgetl: error: cannot write {run}/" in err and ".pt: File too large [EFBIG]" in err
    assert "Traceback" not in err
    assert "limits file sizes: pass an `--output` on another disk, then rerun the same command with --resume" in err
    assert temporaries(run) == []

    code, _, err = build(base, run, "--set", "train.epochs=4", "--resume")
    assert code == 0, err


# 8: non-finite numbers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.weight_decay=.inf", "train.weight_decay"),
        ("train.lr=.nan", "train.lr"),
        ("gates.max_latency_ms=.inf", "gates.max_latency_ms"),
        ("data.val_split=-.inf", "data.val_split"),
        ("quantize=[{runtime: onnxruntime, max_accuracy_drop: .nan}]", "quantize.0.max_accuracy_drop"),
    ],
)
def test_the_recipe_refuses_non_finite_numbers_naming_the_field(base, override: str, field: str) -> None:
    with pytest.raises(RecipeError) as raised:
        load_recipe(base[0], [override])
    assert f"`{field}`: Input should be a finite number" in str(raised.value) and raised.value.exit_code == 2


def test_weight_decay_1e30_stops_training_with_a_recipe_error_naming_the_epoch(base, tmp_path: Path) -> None:
    recipe = load_recipe(base[0], ["train.weight_decay=1e30"])
    with pytest.raises(RecipeError, match=r"training diverged in epoch 1: ") as raised:
        pipeline.train_model(recipe, tmp_path / "run")
    assert raised.value.exit_code == 2 and "lower `train.lr` (e.g. 0.001)" in str(raised.value)
    assert not list((tmp_path / "run" / "stages").glob("train-*"))  # nothing that looks trained


def test_parity_fails_when_logits_are_not_finite_even_where_both_sides_agree(base, tmp_path: Path) -> None:
    recipe, run = load_recipe(base[0]), base[1]
    checkpoint = load_checkpoint(run / "checkpoint.pt")
    val = data.run(recipe.data, checkpoint.preprocessing, recipe.seed).val
    model = checkpoint.model
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")  # what a diverged training leaves: NaN logits in PyTorch ...
    exported = onnx.load(str(next((run / "stages").glob("export-*")) / "model.onnx"))
    # ... and in the file exported from it
    head = next(init for init in exported.graph.initializer if init.name == "head.weight")
    head.CopyFrom(numpy_helper.from_array(model.head.weight.detach().numpy().copy(), head.name))
    onnx.save(exported, str(tmp_path / "model.onnx"))
    artifact = validate.Artifact("onnx-fp32", "onnxruntime", "fp32", tmp_path / "model.onnx")
    with pytest.raises(InferenceError, match="logits are not finite") as raised:
        validate.parity(model, [artifact], val, checkpoint.preprocessing, 1e-3, 1)
    count = len(val.labels)
    assert f"onnx-fp32 on onnxruntime on {count} of {count} validation images, PyTorch on {count}" in str(raised.value)
    assert raised.value.exit_code == 4


# 9: the fresh-process probe ignores the working directory -------------------------------------------


def test_a_module_shadowing_the_standard_library_in_the_cwd_does_not_break_validation(base, tmp_path: Path) -> None:
    cwd = tmp_path / "project"
    cwd.mkdir()
    (cwd / "inspect.py").write_text("raise ImportError('the user inspect.py, not the standard library')\n")
    code, out, err = build(base, tmp_path / "run", "--set", "measure.warmup=1", cwd=cwd)  # validation, probes rerun
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["stages"]["validate"] == "built"
    # 11: the summary line names the device's install, and the digest a device pins (--expect-sha256)
    assert f"(sha256 {report['selected']['bundle_sha256']}; device: `pip install edgetl`)" in out
    assert (
        report["selected"]["bundle_sha256"]
        == hashlib.sha256((tmp_path / "run" / "bundle" / "edgetl.json").read_bytes()).hexdigest()
    )


# 10: epochs on a tiny val split --------------------------------------------------------------------


def test_tied_val_accuracy_is_ranked_by_val_loss_and_the_notes_say_the_split_cannot_rank_epochs(base) -> None:
    training = json.loads((base[1] / "report.json").read_text())["training"]
    history = training["history"]
    assert len(history) == 5  # patience 1: a tie is not "no better epoch" while the val loss still falls
    top = max(h["val_accuracy"] for h in history)
    tied = [h for h in history if h["val_accuracy"] == top]
    assert len(tied) > 1, "the tiny split no longer ties; the test needs a tie"
    assert training["best_epoch"] == min(tied, key=lambda h: h["val_loss"])["epoch"]
    notes = " ".join(training["notes"])
    assert "the val split has 4 images (one image = 25.0 points of val accuracy), too few to rank epochs" in notes
    assert f"at {len(tied)} epochs" in notes
    assert f"epoch {training['best_epoch']} was kept for the lowest val loss" in notes


def test_a_saturated_val_split_is_named_as_such() -> None:
    history = [{"epoch": e, "val_accuracy": 1.0} for e in (1, 2, 3)] + [{"epoch": 4, "val_accuracy": 0.97}]
    notes = ranking_notes(history, 3, 37)
    assert notes[0] == Note("small_val_split", {"images": 37, "points": 100 / 37, "minimum": 50})
    assert notes[1] == Note("saturated_val_accuracy", {"count": 3, "epochs": "1, 2, 3", "best_epoch": 3})
    assert render(notes[1]).startswith("val accuracy was 1.0 (saturated) at 3 epochs (1, 2, 3)")
    assert ranking_notes(history, 3, 500) == [notes[1]] and ranking_notes(history[2:], 3, 500) == []
    tied = ranking_notes([{"epoch": e, "val_accuracy": 0.75} for e in (1, 2)], 2, 500)
    assert tied == [Note("tied_val_accuracy", {"accuracy": 0.75, "count": 2, "epochs": "1, 2", "best_epoch": 2})]
    assert render(tied[0]) == (
        "val accuracy was 0.7500 at 2 epochs (1, 2), so it cannot rank them: epoch 2 was kept "
        "for the lowest val loss among them"
    )


# 11: the device's runtimes ---------------------------------------------------------------------------


def variant(name: str, runtime: str, accuracy: float, p50: float) -> VariantMetrics:
    return VariantMetrics(
        name=name,
        runtime=runtime,
        accuracy=accuracy,
        accuracy_drop=0.95 - accuracy,
        agreement=1.0,
        latency_ms=Latency(p50),
        size_mb=4.0,
    )


VARIANTS = [
    variant("pytorch-fp32", "pytorch", 0.95, 20.0),
    variant("onnx-fp32", "onnxruntime", 0.95, 6.0),
    variant("ort-int8", "onnxruntime", 0.90, 3.0),
    variant("ov-int8", "openvino", 0.94, 2.0),
]


def test_selection_considers_only_variants_measured_on_the_device_runtimes(base) -> None:
    assert load_recipe(base[0]).device.runtimes == ["onnxruntime"]  # the default: what `pip install edgetl` runs
    default = gates.run(VARIANTS, GatesConfig(), "fastest", ["onnxruntime"])
    assert default.selected == "ort-int8"
    assert "not considered, measured on a runtime the device lacks: ov-int8 (openvino)" in default.reason
    assert default.selection.install == "pip install edgetl"
    openvino = gates.run(VARIANTS, GatesConfig(), "fastest", ["onnxruntime", "openvino"]).selection
    assert openvino.name == "ov-int8" and openvino.install == "pip install 'edgetl[openvino]'"
    gated = gates.run(VARIANTS, GatesConfig(min_accuracy=0.93), "fastest", ["onnxruntime"])
    assert gated.selected == "onnx-fp32"
    refused = gates.run(VARIANTS, GatesConfig(max_latency_ms=2.5), "fastest", ["onnxruntime"])
    assert refused.selected is None
    assert refused.reason == (
        "no variant that passes every gate can run on the device's onnxruntime "
        "(`device.runtimes`); ov-int8 (openvino) would: add its runtime there"
    )


def test_an_openvino_device_gets_an_openvino_variant_and_its_install_named(base, tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, out, err = build(base, run, "--set", "device.runtimes=[openvino]")
    assert code == 0, err
    report = json.loads((run / "report.json").read_text())
    assert report["selected"]["name"] == "ov-fp32" and report["selected"]["install"] == "pip install 'edgetl[openvino]'"
    assert f"(sha256 {report['selected']['bundle_sha256']}; device: `pip install 'edgetl[openvino]'`)" in out
    assert "On the device: `pip install 'edgetl[openvino]'`" in (run / "bundle" / "README.md").read_text()
    assert set(report["stages"].values()) == {"reused"}  # the device changes the selection, not what is built
