"""NNCF for ONNX Runtime on a tiny real model (digits at 32 px, one epoch of linear probe): QAT's
QDQ ONNX with int8 weights and folded BatchNorms, and NNCF's post-training options."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from edgetl import data, export
from edgetl.export import static_same_padding
from edgetl.infer import model_logits
from edgetl.models import Checkpoint, load_checkpoint
from edgetl.pipeline import train_model
from edgetl.quantize import Inputs, QuantizedArtifact, run_variant
from edgetl.quantize.nncf_onnx import export_qdq, fold_batchnorm
from edgetl.quantize.nncf_ptq import options
from edgetl.quantize.qat import _use_native_quantize_functions
from edgetl.recipe import QuantVariant, Recipe
from edgetl.runtime.engines import open_engine
from edgetl.runtime.preprocess import normalize


@dataclass(frozen=True)
class Trained:
    checkpoint: Checkpoint
    dataset: data.Dataset
    exported: export.ExportResult


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("nncf")
    recipe = Recipe.model_validate(
        {
            "name": "tiny-digits",
            # 15% of the digits to train on (270 images): QAT's epoch is the slow part
            "data": {"builtin": "digits", "image_size": 32, "augment": "none", "val_split": 0.25, "test_split": 0.6},
            "train": {"strategy": "linear_probe", "epochs": 1, "batch_size": 16, "lr": 0.05},
            "quantize": [],
        }
    )
    train_model(recipe, root / "run")
    checkpoint = load_checkpoint(root / "run" / "checkpoint.pt")
    dataset = data.run(recipe.data, checkpoint.preprocessing, recipe.seed)
    exported = export.run(
        checkpoint.model, checkpoint.preprocessing, checkpoint.labels, root / "export", 17, "cafe", want_openvino=False
    )
    return Trained(checkpoint, dataset, exported)


def made(trained: Trained, variant: QuantVariant, out: Path) -> QuantizedArtifact:
    inputs = Inputs(trained.dataset, trained.checkpoint.preprocessing, 0, None)
    run_variant(trained.exported, variant, out, inputs, trained.checkpoint.model).save(out)
    return QuantizedArtifact.load(out)


def agreement(file: Path, trained: Trained, reference: np.ndarray) -> float:
    images = normalize(trained.dataset.test.images, trained.checkpoint.preprocessing)
    return float((open_engine(file, "onnxruntime").run(images).argmax(1) == reference.argmax(1)).mean())


def conv_weights(graph: onnx.GraphProto) -> list[tuple[str, int]]:
    """Per Conv: where its weight comes from (`DequantizeLinear`, or the initializer's name) and the element type."""
    initializers = {init.name: init for init in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    found = []
    for node in graph.node:
        if node.op_type == "Conv":
            source = producers.get(node.input[1])
            if source is not None and source.op_type == "DequantizeLinear":
                found.append(("DequantizeLinear", initializers[source.input[0]].data_type))
            else:
                found.append((node.input[1], initializers[node.input[1]].data_type))
    return found


@pytest.mark.slow
def test_qat_for_onnxruntime_makes_a_qdq_onnx_with_int8_weights_and_no_batchnorm(
    trained: Trained, tmp_path: Path
) -> None:
    variant = QuantVariant(runtime="onnxruntime", method="qat", qat_epochs=1, qat_lr=1e-4, calibration_images=32)
    qat = made(trained, variant, tmp_path)
    assert qat.name == "ort-int8-qat" and qat.file.suffix == ".onnx" and not qat.float_layers
    graph = onnx.load(str(qat.file)).graph
    weights = conv_weights(graph)
    assert len(weights) > 40 and set(weights) == {("DequantizeLinear", TensorProto.INT8)}
    assert not [node for node in graph.node if node.op_type == "BatchNormalization"]
    float_4d = [i.name for i in graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) == 4]
    assert not float_4d, f"float conv weights left: {float_4d[:3]}"
    (note,) = [note for note in qat.notes if note.kind == "qat"]
    assert note.values["epochs"] == 1 and note.values["best"] >= note.values["start"]
    # the file is the QAT model: ONNX Runtime's val accuracy is the one QAT kept (integer kernels round differently)
    val = trained.dataset.val
    logits = open_engine(qat.file, "onnxruntime").run(normalize(val.images, trained.checkpoint.preprocessing))
    assert abs(float((logits.argmax(1) == val.labels).mean()) - note.values["best"]) <= 0.05
    engine = open_engine(qat.file, "onnxruntime")
    assert json.loads(engine.metadata["edgetl.labels"]) == list(trained.dataset.classes)


@pytest.mark.slow
def test_exported_qdq_onnx_agrees_with_its_quantized_torch_model(trained: Trained, tmp_path: Path) -> None:
    import nncf

    pre = trained.checkpoint.preprocessing
    _use_native_quantize_functions()
    model = static_same_padding(copy.deepcopy(trained.checkpoint.model).eval(), pre.input_size)
    calibration = normalize(trained.dataset.train.images[:32], pre)
    variant = QuantVariant(runtime="onnxruntime", method="qat")
    quantized = nncf.quantize(
        model,
        nncf.Dataset([calibration[i : i + 1] for i in range(32)], torch.from_numpy),
        subset_size=32,
        **options(variant),
    )
    images = normalize(trained.dataset.test.images, pre)
    with torch.no_grad():
        expected = quantized(torch.from_numpy(images)).numpy()
    file = export_qdq(quantized, pre.input_size, tmp_path / "qat.onnx", 17, {"edgetl.labels": "[]"})
    logits = open_engine(file, "onnxruntime").run(images)
    # ONNX Runtime's integer kernels round where NNCF's float fake quantization does not: close, not equal
    assert (logits.argmax(1) == expected.argmax(1)).mean() >= 0.9
    assert np.corrcoef(logits.ravel(), expected.ravel())[0, 1] > 0.95


def test_batchnorm_folds_exactly_into_per_channel_int8_weights() -> None:
    import onnxruntime as ort
    from onnx import helper

    rng = np.random.default_rng(0)
    gamma = rng.uniform(0.5, 2, 4) * np.array([1, -1, 1, -1])  # negative γ: the channel's int8 weights negate
    tensors = {
        "w": rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8),
        "w_scale": rng.uniform(0.001, 0.01, 4),
        "w_zero": np.zeros(4, np.int8),
        "b": rng.normal(size=4),
        "gamma": gamma,
        "beta": rng.normal(size=4),
        "mean": rng.normal(size=4),
        "var": rng.uniform(0.5, 2, 4),
    }
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["w_float"], axis=0),
            helper.make_node("Conv", ["x", "w_float", "b"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["conv", "gamma", "beta", "mean", "var"], ["y"], epsilon=1e-3),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(v if v.dtype == np.int8 else v.astype(np.float32), k) for k, v in tensors.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    folded = fold_batchnorm(onnx.ModelProto.FromString(model.SerializeToString()))
    assert [node.op_type for node in folded.graph.node] == ["DequantizeLinear", "Conv"]
    assert {i.name: i.data_type for i in folded.graph.initializer}["conv.weight_int8"] == TensorProto.INT8
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    outputs = [ort.InferenceSession(m.SerializeToString(), options).run(None, {"x": x})[0] for m in (model, folded)]
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_nncf_for_onnxruntime_quantizes_activations_per_tensor_with_the_recipes_options(
    trained: Trained, tmp_path: Path
) -> None:
    variant = QuantVariant(
        runtime="onnxruntime",
        engine="nncf",
        calibration_images=64,
        bias_correction="full",
        preset="mixed",
        activation_ranges="histogram",
        overflow_fix="enable",
    )
    artifact = made(trained, variant, tmp_path)
    assert artifact.name == "ort-int8-nncf" and not artifact.float_layers
    graph = onnx.load(str(artifact.file)).graph
    initializers = {init.name: init for init in graph.initializer}
    weights = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers}
    activation_scales = [
        numpy_helper.to_array(initializers[n.input[1]])
        for n in graph.node
        if n.op_type == "QuantizeLinear" and n.output[0] not in weights
    ]
    assert activation_scales and all(scale.size == 1 for scale in activation_scales)
    zero_points = [
        numpy_helper.to_array(initializers[n.input[2]])
        for n in graph.node
        if n.op_type == "QuantizeLinear" and len(n.input) > 2
    ]
    assert any(zp.any() for zp in zero_points), "preset mixed: some activations must be asymmetric"
    # overflow fix everywhere: 7-bit weights (|w| ≤ 64) in every conv but the depthwise ones, which NNCF exempts
    int8_weights = [
        numpy_helper.to_array(i) for i in graph.initializer if i.data_type == TensorProto.INT8 and len(i.dims) == 4
    ]
    full = [w for w in int8_weights if w.shape[1] > 1]
    assert full and max(int(np.abs(w.astype(int)).max()) for w in full) <= 64
    reference = model_logits(trained.checkpoint.model, trained.dataset.test.images, trained.checkpoint.preprocessing)
    assert agreement(artifact.file, trained, reference) >= 0.9


def test_nncf_options_apply_to_the_nncf_engine_only() -> None:
    with pytest.raises(ValueError, match="bias_correction, preset apply to engine: nncf"):
        QuantVariant(runtime="onnxruntime", bias_correction="full", preset="mixed")
    with pytest.raises(ValueError, match="drop `precision`, `engine`"):
        QuantVariant(runtime="onnxruntime", method="qat", engine="nncf")
    assert QuantVariant(runtime="onnxruntime", method="qat").display_name == "ort-int8-qat"
    assert options(QuantVariant(runtime="openvino", bias_correction="full"))["fast_bias_correction"] is False
