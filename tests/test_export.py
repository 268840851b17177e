"""Export, parity, quantization and the validation matrix on a tiny real model.

One linear probe of pretrained lite0 on photo crops (32 px) is trained per module; every
test runs the real ONNX Runtime and OpenVINO on its real images.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgetl import data, export, validate
from edgetl.build_report import ParityOutcome
from edgetl.errors import ExportError, RecipeError
from edgetl.infer import model_logits
from edgetl.models import Checkpoint, load_checkpoint
from edgetl.notes import TEMPLATES, Note, render
from edgetl.pipeline import train_model
from edgetl.quantize import Inputs, QuantizedArtifact, run_variant
from edgetl.quantize.ort import weight_rounding_errors
from edgetl.recipe import MeasureConfig, QuantVariant, load_recipe
from edgetl.runtime.engines import open_engine
from edgetl.runtime.preprocess import normalize
from tests.conftest import write_folder, write_recipe

pytestmark = pytest.mark.slow  # whole builds: `pytest -m 'not slow'` skips them

FAST = MeasureConfig(latency_rounds=2, latency_runs=3, warmup=1, throughput_batch=4)


@dataclass(frozen=True)
class Trained:
    checkpoint: Checkpoint
    dataset: data.Dataset
    exported: export.ExportResult
    recipe_path: Path
    run_dir: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("export")
    images = write_folder(root / "images", count=20)
    recipe_path = write_recipe(
        root / "recipe.yaml",
        f"""
        name: tiny-export
        data: {{path: {images}, val_split: 0.2, test_split: 0.2, image_size: 32, augment: none}}
        train: {{strategy: linear_probe, epochs: 5, batch_size: 8, lr: 0.01}}
        quantize: []
        """,
    )
    recipe = load_recipe(recipe_path)
    train_model(recipe, root / "run")
    checkpoint = load_checkpoint(root / "run" / "checkpoint.pt")
    dataset = data.run(recipe.data, checkpoint.preprocessing, recipe.seed)
    exported = export.run(
        checkpoint.model,
        checkpoint.preprocessing,
        checkpoint.labels,
        root / "run" / "export",
        17,
        "cafe",
        want_openvino=True,
    )
    return Trained(checkpoint, dataset, exported, recipe_path, root / "run")


def made(trained: Trained, variant: QuantVariant, out: Path, model=None) -> QuantizedArtifact:
    """The variant quantized as the pipeline does: run, saved to its folder, loaded back."""
    run_variant(
        trained.exported, variant, out, Inputs(trained.dataset, trained.checkpoint.preprocessing, 0, None), model
    ).save(out)
    return QuantizedArtifact.load(out)


def test_onnx_export_is_a_clean_opset_17_graph_with_dynamic_batch_and_metadata(trained: Trained) -> None:
    graph = onnx.load(str(trained.exported.onnx))
    onnx.checker.check_model(graph, full_check=True)
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    ops = {node.op_type for node in graph.graph.node}
    assert not ops & {"Pad", "Shape", "Gather", "Ceil", "Max"}, "TF-SAME padding left shape arithmetic in the graph"
    assert trained.exported.node_count == len(graph.graph.node) < 120
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    props = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(props["edgetl.labels"]) == ["china", "flower"]
    assert json.loads(props["edgetl.preprocessing"]) == trained.checkpoint.preprocessing.to_dict()
    assert props["edgetl.recipe_hash"] == "cafe"
    x = normalize(trained.dataset.test.images[:5], trained.checkpoint.preprocessing)
    assert open_engine(trained.exported.onnx, "onnxruntime").run(x).shape == (5, 2)


def test_fp32_onnx_and_openvino_agree_with_pytorch_on_every_validation_image(trained: Trained) -> None:
    artifacts = [
        validate.Artifact("onnx-fp32", "onnxruntime", "fp32", trained.exported.onnx),
        validate.Artifact("ov-fp32", "openvino", "fp32", trained.exported.openvino),
    ]
    outcomes = validate.parity(
        trained.checkpoint.model, artifacts, trained.dataset.val, trained.checkpoint.preprocessing, 1e-3, None
    )
    for outcome in outcomes:
        assert outcome.passed and outcome.agreement == 1.0
        assert outcome.max_abs_logit_delta < 1e-4  # an FP16-compressed IR would be off by ~1e-2
    assert outcomes[1].images == len(trained.dataset.val.labels)


def test_parity_failure_stops_the_build_naming_the_images(trained: Trained) -> None:
    artifact = validate.Artifact("onnx-fp32", "onnxruntime", "fp32", trained.exported.onnx)
    with pytest.raises(
        ExportError,
        match=r"disagrees with PyTorch on \d+ of \d+ validation images .*images/(china|flower)/\d+\.(jpg|png) "
        r"\(\|Δlogit\|",
    ):
        validate.parity(
            trained.checkpoint.model, [artifact], trained.dataset.val, trained.checkpoint.preprocessing, 1e-12, None
        )


def test_quantized_variants_are_calibrated_on_real_images_and_measured(trained: Trained, tmp_path: Path) -> None:
    variants = [
        QuantVariant(runtime="onnxruntime", activation_type="uint8", calibration_images=1000, min_agreement=None),
        QuantVariant(runtime="openvino", calibration_images=16),
        QuantVariant(runtime="openvino", precision="fp16"),
    ]
    ort, ov, fp16 = quantized = [made(trained, variant, tmp_path / str(i)) for i, variant in enumerate(variants)]
    assert [m.name for m in quantized] == ["ort-int8", "ov-int8", "ov-fp16"]
    train_images = len(trained.dataset.train.labels)
    assert ort.calibration_images == train_images and ort.notes[0] == Note(
        "calibration_short", {"asked": 1000, "available": train_images}
    )
    assert ort.notes_text()[0] == f"asked for 1000 calibration images; the train split has {train_images}, all used"
    assert ov.calibration_images == 16 and fp16.notes == []
    graph = onnx.load(str(ort.file)).graph
    convs = [n for n in onnx.load(str(trained.exported.onnx)).graph.node if n.op_type == "Conv"]
    first_depthwise = next(n.name for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute))
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 20 and ort.float_layers == [
        convs[0].name,
        first_depthwise,
    ]  # keep_float's default
    notes = {note.kind: note.values for note in ort.notes}
    assert notes["keep_float"] == {"nodes": f"{convs[0].name}, {first_depthwise}"}
    assert notes["float_layers"] == {"count": 2, "layers": f"{convs[0].name}, {first_depthwise}"}
    assert notes["bias_correction"]["convs"] == sum(len(n.input) > 2 for n in convs)  # every conv with a bias
    assert len(ov.float_layers) <= 1  # NNCF may keep the 3-channel stem in float; the rest is int8

    artifacts = [validate.Artifact(m.name, m.runtime, m.precision, m.file, m.float_layers, m.notes) for m in quantized]
    rows = validate.run(
        trained.checkpoint.model,
        artifacts,
        trained.dataset.test,
        trained.checkpoint.preprocessing,
        FAST,
        trained.run_dir / "checkpoint.pt",
    ).variants
    by_name = {row.name: row for row in rows}
    assert list(by_name) == ["pytorch-fp32", "ort-int8", "ov-int8", "ov-fp16"]
    fp32_mb = by_name["pytorch-fp32"].size_mb
    assert by_name["ort-int8"].size_mb < 0.4 * fp32_mb and by_name["ov-int8"].size_mb < 0.4 * fp32_mb
    assert 0.4 * fp32_mb < by_name["ov-fp16"].size_mb < 0.6 * fp32_mb
    reference = model_logits(
        trained.checkpoint.model, trained.dataset.test.images, trained.checkpoint.preprocessing
    ).argmax(1)
    for row in rows:
        low, high = row.accuracy_ci95
        assert low <= row.accuracy <= high and high - low > 0
        assert row.agreement >= 0.75 and row.test_images == len(reference)
        assert row.latency_ms.p50 <= row.latency_ms.p90 <= row.latency_ms.p99
        assert row.throughput_ips > 0 and row.peak_rss_mb > 10 and row.load_seconds > 0
    assert by_name["pytorch-fp32"].agreement == 1.0 and by_name["pytorch-fp32"].accuracy == pytest.approx(
        float(np.mean(reference == trained.dataset.test.labels))
    )


def test_notes_given_as_records_reach_the_row_as_sentences_and_as_records(
    trained: Trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(TEMPLATES, "test_kept", "{count} layer(s) kept in float")
    notes = ["a plain sentence", Note("test_kept", {"count": 2})]
    artifact = validate.Artifact("onnx-fp32", "onnxruntime", "fp32", trained.exported.onnx, notes=notes)
    pre = trained.checkpoint.preprocessing
    measured = validate.run(
        trained.checkpoint.model, [artifact], trained.dataset.test, pre, FAST, trained.run_dir / "checkpoint.pt"
    )
    baseline, row = measured.variants
    assert row.notes == ["a plain sentence", "2 layer(s) kept in float"]
    assert row.note_records == [{"kind": "test_kept", "values": {"count": 2}}]
    assert baseline.notes == [] and baseline.note_records is None and "note_records" not in baseline.to_dict()


def test_keep_float_names_the_float_layers_and_rejects_unknown_nodes(trained: Trained, tmp_path: Path) -> None:
    pre = trained.checkpoint.preprocessing
    variant = QuantVariant(runtime="onnxruntime", activation_type="uint8", keep_float=[], min_agreement=None)
    everything = made(trained, variant, tmp_path)  # no agreement control: it could keep layers in float
    assert everything.float_layers == [] and {"keep_float", "float_layers"}.isdisjoint(
        note.kind for note in everything.notes
    )
    with pytest.raises(RecipeError, match=r"keep_float names \['/no/such/Conv'\].*its convolutions are"):
        run_variant(
            trained.exported,
            QuantVariant(runtime="onnxruntime", activation_type="uint8", keep_float=["/no/such/Conv"]),
            tmp_path,
            Inputs(trained.dataset, pre, 0, None),
        )


def test_bias_correction_measures_the_mean_output_shift_of_rounded_weights(tmp_path: Path) -> None:
    """A 1×1 grouped conv has no padding border: the predicted shift must equal the measured one."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(6, 2, 1, 1)).astype(np.float32)
    weight[:, :, 0, 0] *= np.array(
        [[1.0, 0.01]], dtype=np.float32
    )  # a large and a small weight per channel: coarse steps
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", group=2)],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 4, 5, 5])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(weight, "w"), onnx.numpy_helper.from_array(np.zeros(6, np.float32), "b")],
    )
    path = tmp_path / "conv.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=10), str(path))
    calibration = [
        (rng.normal(size=(1, 4, 5, 5)) + np.arange(1, 5).reshape(1, 4, 1, 1)).astype(np.float32) for _ in range(8)
    ]
    bias, shift = weight_rounding_errors(onnx.load(str(path)), calibration, reduce_range=True, input_name="x")["conv"]
    from onnxruntime.quantization.quant_utils import quantize_data

    def rounded_channel(w: np.ndarray) -> np.ndarray:
        zero_point, scale, values = quantize_data(w.ravel(), onnx.TensorProto.INT8, True, True)
        return ((values.astype(np.float64) - float(zero_point)) * float(scale)).reshape(w.shape)

    rounded = np.stack([rounded_channel(w) for w in weight])
    x = np.concatenate(calibration).astype(np.float64)
    groups = x.reshape(8, 2, 2, 5, 5)  # (N, group, in per group, H, W)
    measured = (
        np.einsum("ngihw,goi->ngo", groups, (rounded - weight)[:, :, 0, 0].reshape(2, 3, 2)).reshape(8, 6).mean(0) / 25
    )  # mean over the 5×5 positions
    assert bias == "b" and np.abs(shift).max() > 1e-4
    np.testing.assert_allclose(shift, measured, rtol=1e-6, atol=1e-9)


def test_accuracy_control_keeps_the_val_drop_within_the_bound(trained: Trained, tmp_path: Path) -> None:
    variant = QuantVariant(runtime="onnxruntime", activation_type="uint8", max_accuracy_drop=0.001)
    controlled = made(trained, variant, tmp_path)
    (control,) = [note for note in controlled.notes if note.kind.startswith("accuracy_control")]
    assert control.kind in ("accuracy_control_all", "accuracy_control_met") and control.values["drop"] <= 0.001
    pre, val = trained.checkpoint.preprocessing, trained.dataset.val
    x = normalize(val.images, pre)
    float_accuracy = np.mean(open_engine(trained.exported.onnx, "onnxruntime").run(x).argmax(1) == val.labels)
    int8_accuracy = np.mean(open_engine(controlled.file, "onnxruntime").run(x).argmax(1) == val.labels)
    assert float_accuracy - int8_accuracy <= 0.001


def test_the_export_result_saves_itself_to_its_folder_and_loads_back(trained: Trained, tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    for file in trained.exported.onnx.parent.iterdir():  # model.onnx, model.xml, model.bin
        (folder / file.name).write_bytes(file.read_bytes())
    row = {"name": "onnx-fp32", "runtime": "onnxruntime", "images": 4, "agreement": 1.0,
           "max_abs_logit_delta": 2e-6, "tolerance": 1e-3, "passed": True}  # fmt: skip
    parity = [ParityOutcome.from_dict(row)]
    replace(trained.exported, parity=parity, seconds=1.234567).save(folder)
    assert json.loads((folder / "export.json").read_text()) == {
        "opset": 17,
        "node_count": trained.exported.node_count,
        "seconds": 1.23,
        "parity": [row],
    }
    loaded = export.ExportResult.load(folder)
    assert loaded == export.ExportResult(
        folder / "model.onnx", folder / "model.xml", trained.exported.node_count, 17, 1.23, parity
    )
    (folder / "model.xml").unlink()
    assert export.ExportResult.load(folder).openvino is None


def test_a_quantize_folder_saved_before_notes_were_records_loads_with_its_sentences(tmp_path: Path) -> None:
    sentences = [
        "asked for 300 calibration images; the train split has 16, all used",
        "bias correction: 49 conv(s) absorb the mean output shift of their rounded weights",
    ]
    facts = {
        "name": "ort-int8",
        "runtime": "onnxruntime",
        "precision": "int8",
        "float_layers": ["/conv"],
        "seconds": 2.5,
        "calibration_images": 16,
        "notes": sentences,
        "file": "ort-int8.onnx",
    }
    (tmp_path / "quantize.json").write_text(json.dumps(facts))
    loaded = QuantizedArtifact.load(tmp_path)
    assert (
        loaded.file == tmp_path / "ort-int8.onnx"
        and loaded.float_layers == ["/conv"]
        and loaded.calibration_images == 16
    )
    assert [note.kind for note in loaded.notes] == ["text", "text"] and loaded.notes_text() == sentences
    loaded.save(tmp_path)
    assert QuantizedArtifact.load(tmp_path) == loaded
    assert {
        k: v for k, v in json.loads((tmp_path / "quantize.json").read_text()).items() if k != "note_records"
    } == facts


@pytest.mark.parametrize(
    ("note", "sentence"),
    [
        (
            Note("calibration_short", {"asked": 300, "available": 16}),
            "asked for 300 calibration images; the train split has 16, all used",
        ),
        (
            Note("reduce_range"),
            "7-bit weights (reduce_range): this CPU has no VNNI, where 8-bit weights saturate ONNX Runtime's int8 "
            "kernels",
        ),
        (
            Note("activation_type", {"uint8_ms": 1.234, "int8_ms": 2.0, "kept": "uint8"}),
            "activation type measured: uint8 1.23 ms, int8 2.00 ms; kept uint8",
        ),
        (
            Note("accuracy_control_all", {"drop": 0.0, "max_drop": 0.01}),
            "accuracy control: val drop 0.0000 ≤ 0.01 with every other layer quantized",
        ),
        (
            Note("accuracy_control_met", {"count": 4, "ranked": 62, "drop": 0.00625, "max_drop": 0.01}),
            "accuracy control: 4 more of 62 quantized node(s) left in float, val drop 0.0063 within 0.01",
        ),
        (
            Note("accuracy_control_missed", {"count": 62, "ranked": 62, "drop": 0.0125, "max_drop": 0.001}),
            "accuracy control: 62 more of 62 quantized node(s) left in float, val drop 0.0125 NOT within 0.001",
        ),
        (
            Note("qat", {"start": 0.75, "best": 0.8125, "best_epoch": 2, "epochs": 3, "seconds": 41.6}),
            "QAT: val accuracy 0.7500 after calibration, 0.8125 after fine-tuning (best epoch 2 of 3, 42s)",
        ),
    ],
)
def test_quantization_notes_render_the_sentences_reports_have_always_shown(note: Note, sentence: str) -> None:
    assert render(note) == sentence


BLOCK_OPENVINO = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("openvino blocked by the test")
sys.meta_path.insert(0, Blocker())
from edgetl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_missing_runtime_is_skipped_with_a_line_unless_the_recipe_asks_for_it(
    trained: Trained, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_OPENVINO, "build", str(trained.recipe_path), "-o", str(run)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "openvino is not installed: its variants were skipped" in done.stderr
    report = json.loads((run / "report.json").read_text())
    assert [v["runtime"] for v in report["variants"]] == ["pytorch", "onnxruntime"]
    assert any("openvino is not installed" in line for line in report["skipped"])

    asked = subprocess.run(
        [
            sys.executable,
            "-c",
            BLOCK_OPENVINO,
            "build",
            str(trained.recipe_path),
            "-o",
            str(tmp_path / "asked"),
            "--set",
            "export.runtimes=[openvino]",
        ],
        capture_output=True,
        text=True,
    )
    assert asked.returncode == 2 and "export.runtimes" in asked.stderr and "Traceback" not in asked.stderr


def test_qat_variant_fine_tunes_with_fake_quantization_and_exports_an_int8_ir(trained: Trained, tmp_path: Path) -> None:
    pre = trained.checkpoint.preprocessing
    variant = QuantVariant(runtime="openvino", method="qat", qat_epochs=1, qat_lr=1e-4, calibration_images=16)
    qat = made(trained, variant, tmp_path, model=trained.checkpoint.model)
    assert qat.name == "ov-int8-qat" and qat.file.suffix == ".xml"
    assert not qat.float_layers, "every conv of the QAT model must carry int8 weights"
    (note,) = [note for note in qat.notes if note.kind == "qat"]
    assert (
        note.values["epochs"] == 1
        and note.values["best_epoch"] in (0, 1)
        and note.values["best"] >= note.values["start"]
    )
    engine = open_engine(qat.file, "openvino", None)
    logits = engine.run(normalize(trained.dataset.test.images, pre))
    reference = model_logits(trained.checkpoint.model, trained.dataset.test.images, pre)
    assert (logits.argmax(1) == reference.argmax(1)).mean() >= 0.75
    # converted from PyTorch, the IR still carries the labels and contract the runtime checks edgetl.json against
    assert json.loads(engine.metadata["edgetl.labels"]) == list(trained.dataset.classes)
    assert json.loads(engine.metadata["edgetl.preprocessing"]) == pre.to_dict()


def test_qat_makes_int8_only() -> None:
    with pytest.raises(ValueError, match="method qat makes an int8 model"):
        QuantVariant(runtime="openvino", method="qat", precision="fp16")


def test_saved_training_logits_are_reused_only_when_they_match_the_model(
    trained: Trained, caplog: pytest.LogCaptureFixture
) -> None:
    model, test, pre = trained.checkpoint.model, trained.dataset.test, trained.checkpoint.preprocessing
    fresh = model_logits(model, test.images, pre)
    marked = fresh + np.float32(1e-6)  # within tolerance: these very arrays come back
    assert validate.pytorch_logits(model, test, pre, marked) is marked
    stale = fresh.copy()
    stale[:, 0] += 5.0  # another model's logits
    recomputed = validate.pytorch_logits(model, test, pre, stale)
    np.testing.assert_allclose(recomputed, fresh, atol=1e-5)
    assert "do not match the model" in caplog.text
