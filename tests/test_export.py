"""Export, parity, quantization and the validation matrix on a tiny real model.

One linear probe of pretrained lite0 on photo crops (32 px) is trained per module; every
test runs the real ONNX Runtime and OpenVINO on its real images.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgetl import data, export, quantize, validate
from edgetl.errors import ExportError, RecipeError
from edgetl.models import Checkpoint, load_checkpoint
from edgetl.pipeline import train_model
from edgetl.recipe import MeasureConfig, QuantVariant, load_recipe
from edgetl.runtime.engines import open_engine
from edgetl.runtime.preprocess import normalize
from edgetl.infer import model_logits
from tests.conftest import write_folder, write_recipe

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
    recipe_path = write_recipe(root / "recipe.yaml", f"""
        name: tiny-export
        data: {{path: {images}, val_split: 0.2, test_split: 0.2, image_size: 32, augment: none}}
        train: {{strategy: linear_probe, epochs: 5, batch_size: 8, lr: 0.01}}
        quantize: []
        """)
    recipe = load_recipe(recipe_path)
    train_model(recipe, root / "run")
    checkpoint = load_checkpoint(root / "run" / "checkpoint.pt")
    dataset = data.run(recipe.data, checkpoint.preprocessing, recipe.seed)
    exported = export.run(checkpoint.model, checkpoint.preprocessing, checkpoint.labels, root / "run" / "export", 17, "cafe", want_openvino=True)
    return Trained(checkpoint, dataset, exported, recipe_path, root / "run")


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
    artifacts = [validate.Artifact("onnx-fp32", "onnxruntime", "fp32", trained.exported.onnx), validate.Artifact("ov-fp32", "openvino", "fp32", trained.exported.openvino)]
    outcomes = validate.parity(trained.checkpoint.model, artifacts, trained.dataset.val, trained.checkpoint.preprocessing, 1e-3, None)
    for outcome in outcomes:
        assert outcome["passed"] and outcome["agreement"] == 1.0
        assert outcome["max_abs_logit_delta"] < 1e-4  # an FP16-compressed IR would be off by ~1e-2
    assert outcomes[1]["images"] == len(trained.dataset.val.labels)


def test_parity_failure_stops_the_build_naming_the_images(trained: Trained) -> None:
    artifact = validate.Artifact("onnx-fp32", "onnxruntime", "fp32", trained.exported.onnx)
    with pytest.raises(ExportError, match=r"disagrees with PyTorch on \d+ of \d+ validation images .*images/(china|flower)/\d+\.(jpg|png) \(\|Δlogit\|"):
        validate.parity(trained.checkpoint.model, [artifact], trained.dataset.val, trained.checkpoint.preprocessing, 1e-12, None)


def test_quantized_variants_are_calibrated_on_real_images_and_measured(trained: Trained, tmp_path: Path) -> None:
    variants = [
        QuantVariant(runtime="onnxruntime", activation_type="uint8", calibration_images=1000),
        QuantVariant(runtime="openvino", calibration_images=16),
        QuantVariant(runtime="openvino", precision="fp16"),
    ]
    made = quantize.run(trained.exported, trained.dataset, trained.checkpoint.preprocessing, variants, tmp_path, seed=0, threads=None)
    ort, ov, fp16 = made
    assert [m.name for m in made] == ["ort-int8", "ov-int8", "ov-fp16"]
    assert ort.calibration_images == len(trained.dataset.train.labels) and "asked for 1000 calibration images" in ort.notes[0]
    assert ov.calibration_images == 16
    graph = onnx.load(str(ort.file)).graph
    convs = [n for n in onnx.load(str(trained.exported.onnx)).graph.node if n.op_type == "Conv"]
    first_depthwise = next(n.name for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute))
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 20 and ort.float_layers == [convs[0].name, first_depthwise]  # keep_float's default
    assert len(ov.float_layers) <= 1  # NNCF may keep the 3-channel stem in float; the rest is int8

    artifacts = [validate.Artifact(m.name, m.runtime, m.precision, m.file, m.float_layers, m.notes) for m in made]
    rows = validate.run(trained.checkpoint.model, artifacts, trained.dataset.test, trained.checkpoint.preprocessing, FAST, trained.run_dir / "checkpoint.pt")
    by_name = {row["name"]: row for row in rows}
    assert list(by_name) == ["pytorch-fp32", "ort-int8", "ov-int8", "ov-fp16"]
    fp32_mb = by_name["pytorch-fp32"]["size_mb"]
    assert by_name["ort-int8"]["size_mb"] < 0.4 * fp32_mb and by_name["ov-int8"]["size_mb"] < 0.4 * fp32_mb
    assert 0.4 * fp32_mb < by_name["ov-fp16"]["size_mb"] < 0.6 * fp32_mb
    reference = model_logits(trained.checkpoint.model, trained.dataset.test.images, trained.checkpoint.preprocessing).argmax(1)
    for row in rows:
        low, high = row["accuracy_ci95"]
        assert low <= row["accuracy"] <= high and high - low > 0
        assert row["agreement"] >= 0.75 and row["test_images"] == len(reference)
        assert row["latency_ms"]["p50"] <= row["latency_ms"]["p90"] <= row["latency_ms"]["p99"]
        assert row["throughput_ips"] > 0 and row["peak_rss_mb"] > 10 and row["load_seconds"] > 0
    assert by_name["pytorch-fp32"]["agreement"] == 1.0 and by_name["pytorch-fp32"]["accuracy"] == pytest.approx(float(np.mean(reference == trained.dataset.test.labels)))


def test_keep_float_names_the_float_layers_and_rejects_unknown_nodes(trained: Trained, tmp_path: Path) -> None:
    pre = trained.checkpoint.preprocessing
    (everything,) = quantize.run(trained.exported, trained.dataset, pre, [QuantVariant(runtime="onnxruntime", activation_type="uint8", keep_float=[])], tmp_path, seed=0, threads=None)
    assert everything.float_layers == []
    with pytest.raises(RecipeError, match=r"keep_float names \['/no/such/Conv'\].*its convolutions are"):
        quantize.run(trained.exported, trained.dataset, pre, [QuantVariant(runtime="onnxruntime", activation_type="uint8", keep_float=["/no/such/Conv"])], tmp_path, seed=0, threads=None)


def test_bias_correction_measures_the_mean_output_shift_of_rounded_weights(tmp_path: Path) -> None:
    """A 1×1 grouped conv has no padding border: the predicted shift must equal the measured one."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(6, 2, 1, 1)).astype(np.float32)
    weight[:, :, 0, 0] *= np.array([[1.0, 0.01]], dtype=np.float32)  # a large and a small weight per channel: coarse steps
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", group=2)], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 4, 5, 5])], [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(weight, "w"), onnx.numpy_helper.from_array(np.zeros(6, np.float32), "b")],
    )
    path = tmp_path / "conv.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=10), str(path))
    calibration = [(rng.normal(size=(1, 4, 5, 5)) + np.arange(1, 5).reshape(1, 4, 1, 1)).astype(np.float32) for _ in range(8)]
    bias, shift = quantize._weight_rounding_errors(onnx.load(str(path)), calibration, reduce_range=True, input_name="x")["conv"]
    from onnxruntime.quantization.quant_utils import quantize_data

    rounded = np.stack([quantize._dequantized(quantize_data(w.ravel(), onnx.TensorProto.INT8, True, True)).reshape(w.shape) for w in weight])
    x = np.concatenate(calibration).astype(np.float64)
    groups = x.reshape(8, 2, 2, 5, 5)  # (N, group, in per group, H, W)
    measured = np.einsum("ngihw,goi->ngo", groups, (rounded - weight)[:, :, 0, 0].reshape(2, 3, 2)).reshape(8, 6).mean(0) / 25  # mean over the 5×5 positions
    assert bias == "b" and np.abs(shift).max() > 1e-4
    np.testing.assert_allclose(shift, measured, rtol=1e-6, atol=1e-9)


def test_accuracy_control_keeps_the_val_drop_within_the_bound(trained: Trained, tmp_path: Path) -> None:
    variant = QuantVariant(runtime="onnxruntime", activation_type="uint8", max_accuracy_drop=0.001)
    (made,) = quantize.run(trained.exported, trained.dataset, trained.checkpoint.preprocessing, [variant], tmp_path, seed=0, threads=None)
    control = next(note for note in made.notes if note.startswith("accuracy control"))
    assert "NOT within" not in control
    pre, val = trained.checkpoint.preprocessing, trained.dataset.val
    x = normalize(val.images, pre)
    float_accuracy = np.mean(open_engine(trained.exported.onnx, "onnxruntime").run(x).argmax(1) == val.labels)
    int8_accuracy = np.mean(open_engine(made.file, "onnxruntime").run(x).argmax(1) == val.labels)
    assert float_accuracy - int8_accuracy <= 0.001


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


def test_a_missing_runtime_is_skipped_with_a_line_unless_the_recipe_asks_for_it(trained: Trained, tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", BLOCK_OPENVINO, "build", str(trained.recipe_path), "-o", str(run)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "openvino is not installed: its variants were skipped" in done.stderr
    report = json.loads((run / "report.json").read_text())
    assert [v["runtime"] for v in report["variants"]] == ["pytorch", "onnxruntime"]
    assert any("openvino is not installed" in line for line in report["skipped"])

    asked = subprocess.run([sys.executable, "-c", BLOCK_OPENVINO, "build", str(trained.recipe_path), "-o", str(tmp_path / "asked"), "--set", "export.runtimes=[openvino]"], capture_output=True, text=True)
    assert asked.returncode == 2 and "export.runtimes" in asked.stderr and "Traceback" not in asked.stderr


def test_qat_variant_fine_tunes_with_fake_quantization_and_exports_an_int8_ir(trained: Trained, tmp_path: Path) -> None:
    pre = trained.checkpoint.preprocessing
    variant = QuantVariant(runtime="openvino", method="qat", qat_epochs=1, qat_lr=1e-4, calibration_images=16)
    (made,) = quantize.run(trained.exported, trained.dataset, pre, [variant], tmp_path, seed=0, threads=None, model=trained.checkpoint.model)
    assert made.name == "ov-int8-qat" and made.file.suffix == ".xml"
    assert not made.float_layers, "every conv of the QAT model must carry int8 weights"
    assert any(note.startswith("QAT: val accuracy") for note in made.notes)
    engine = open_engine(made.file, "openvino", None)
    logits = engine.run(normalize(trained.dataset.test.images, pre))
    reference = model_logits(trained.checkpoint.model, trained.dataset.test.images, pre)
    assert (logits.argmax(1) == reference.argmax(1)).mean() >= 0.75
    # converted from PyTorch, the IR still carries the labels and contract the runtime checks edgetl.json against
    assert json.loads(engine.metadata["edgetl.labels"]) == list(trained.dataset.classes)
    assert json.loads(engine.metadata["edgetl.preprocessing"]) == pre.to_dict()


def test_qat_is_an_openvino_variant() -> None:
    with pytest.raises(ValueError, match="method qat makes an int8 OpenVINO IR"):
        QuantVariant(runtime="onnxruntime", method="qat")


def test_saved_training_logits_are_reused_only_when_they_match_the_model(trained: Trained, caplog: pytest.LogCaptureFixture) -> None:
    model, test, pre = trained.checkpoint.model, trained.dataset.test, trained.checkpoint.preprocessing
    fresh = model_logits(model, test.images, pre)
    marked = fresh + np.float32(1e-6)  # within tolerance: these very arrays come back
    assert validate._saved_or_computed_logits(model, test, pre, marked) is marked
    stale = fresh.copy()
    stale[:, 0] += 5.0  # another model's logits
    recomputed = validate._saved_or_computed_logits(model, test, pre, stale)
    np.testing.assert_allclose(recomputed, fresh, atol=1e-5)
    assert "do not match the model" in caplog.text
