"""Agreement with FP32 as the quantization's control signal (issue 19): the search, its trials on
both runtimes, the recipe fields, and the selection of a variant below its bound."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from pydantic import ValidationError

from edgetl import data, export, gates
from edgetl.build_report import BuildReport
from edgetl.models import load_checkpoint
from edgetl.pipeline import train_model
from edgetl.quantize import Inputs, QuantizedArtifact, run_variant
from edgetl.quantize.control import fidelity, search, verify
from edgetl.quantize.graph import quantized_nodes, with_float_nodes
from edgetl.quantize.nncf_control import quantized_ops, with_float_ops
from edgetl.recipe import GatesConfig, QuantVariant, load_recipe
from edgetl.report import build_markdown
from edgetl.report_html import build_page
from edgetl.runtime.engines import open_engine
from edgetl.runtime.metrics import Latency, VariantMetrics
from edgetl.runtime.preprocess import normalize
from tests.conftest import write_folder, write_recipe
from tests.test_report import make_report


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """A linear probe of pretrained lite0 at 32 px on two photo classes, exported to ONNX and an IR."""
    root = tmp_path_factory.mktemp("agreement")
    images = write_folder(root / "images", count=20)
    recipe = load_recipe(
        write_recipe(
            root / "recipe.yaml",
            f"""
            name: tiny-agreement
            data: {{path: {images}, val_split: 0.2, test_split: 0.2, image_size: 32, augment: none}}
            train: {{strategy: linear_probe, epochs: 5, batch_size: 8, lr: 0.01}}
            quantize: []
            """,
        )
    )
    train_model(recipe, root / "run")
    checkpoint = load_checkpoint(root / "run" / "checkpoint.pt")
    dataset = data.run(recipe.data, checkpoint.preprocessing, recipe.seed)
    exported = export.run(
        checkpoint.model, checkpoint.preprocessing, checkpoint.labels, root / "export", 17, "cafe", want_openvino=True
    )
    return checkpoint, dataset, exported


def control_images(dataset, pre) -> np.ndarray:
    """What the control measures on: the val split, then the (seeded) calibration images, here all of train."""
    order = np.sort(np.random.default_rng(0).permutation(len(dataset.train.labels)))
    return np.concatenate([normalize(dataset.val.images, pre), normalize(dataset.train.images[order], pre)])


@pytest.mark.slow
def test_the_ort_agreement_search_stops_at_the_bound(tiny, tmp_path: Path) -> None:
    checkpoint, dataset, exported = tiny
    # nothing kept in float, int8 activations: the fully quantized model misses agreement 1.0 on the control images
    variant = QuantVariant(runtime="onnxruntime", activation_type="int8", keep_float=[], min_agreement=1.0)
    run_variant(exported, variant, tmp_path, Inputs(dataset, checkpoint.preprocessing, 0, None)).save(tmp_path)
    made = QuantizedArtifact.load(tmp_path)
    record = made.agreement_control
    assert record["start"]["agreement"] < 1.0, "the tiny model no longer needs the search: make the test harder"
    assert record["met"] and record["reached"]["all"]["agreement"] == 1.0
    count = len(record["float_layers_added"])
    trials, files = dict(record["trials"]), dict(record["checks"])  # (count, agreement): trials, the file
    assert count >= 1 and files[count] == 1.0
    assert files.get(count - 1, trials[count - 1]) < 1.0  # one ranked layer fewer misses the bound
    assert set(made.float_layers) >= {n for n in record["float_layers_added"] if n.endswith("Conv")}
    # the file itself, measured here: agreement 1.0 with FP32 on the control images
    x = control_images(dataset, checkpoint.preprocessing)
    fp32 = open_engine(exported.onnx, "onnxruntime").run(x)
    assert fidelity(open_engine(made.file, "onnxruntime").run(x), fp32).agreement == 1.0
    assert [note.kind for note in made.notes if note.kind.startswith("agreement")] == ["agreement_control_latency"]


@pytest.mark.slow
def test_reverting_every_quantized_node_or_op_gives_back_the_fp32_model(tiny, tmp_path: Path) -> None:
    """The trials of both runtimes revert what they are asked to: with every quantized node in float, the
    logits are FP32's (ONNX Runtime's activations still within their calibrated ranges)."""
    import openvino as ov

    checkpoint, dataset, exported = tiny
    x = normalize(dataset.val.images, checkpoint.preprocessing)
    fp32 = open_engine(exported.onnx, "onnxruntime").run(x)
    variant = QuantVariant(runtime="onnxruntime", activation_type="uint8", keep_float=[], min_agreement=None)
    ort_int8 = run_variant(exported, variant, tmp_path / "ort", Inputs(dataset, checkpoint.preprocessing, 0, None))
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = tmp_path / "prepared.onnx"  # the float graph quantize_static quantized (ort.quantize prepares it so)
    quant_pre_process(str(exported.onnx), str(prepared), skip_symbolic_shape=True)
    quantized, float_model = onnx.load(str(ort_int8.file)), onnx.load(str(prepared))
    reverted = tmp_path / "reverted.onnx"
    onnx.save(with_float_nodes(quantized, float_model, quantized_nodes(quantized.graph)), str(reverted))
    # activations are still held to their calibrated ranges (the ReLU6 that uint8 quantizers replace), not rounded
    error = np.abs(open_engine(reverted, "onnxruntime").run(x) - fp32).max()
    assert error < 0.5 * np.abs(open_engine(ort_int8.file, "onnxruntime").run(x) - fp32).max()

    ov_variant = QuantVariant(runtime="openvino", min_agreement=None)
    ov_int8 = run_variant(exported, ov_variant, tmp_path / "ov", Inputs(dataset, checkpoint.preprocessing, 0, None))
    core = ov.Core()
    int8_model, fp32_model = core.read_model(str(ov_int8.file)), core.read_model(str(exported.openvino))
    everything = with_float_ops(int8_model, fp32_model, quantized_ops(int8_model))
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}  # not bf16, OpenVINO's default where the CPU has AVX-512 BF16
    np.testing.assert_allclose(core.compile_model(everything, "CPU", f32)(x)[0], fp32, atol=5e-3)
    assert np.abs(core.compile_model(int8_model, "CPU", f32)(x)[0] - fp32).max() > 1e-3  # quantized, not FP32


def test_the_search_keeps_the_shortest_prefix_of_the_ranking_that_meets_the_bound() -> None:
    """A real network (a fixed random MLP on digits) whose layers are coarsely rounded unless kept in float."""
    from sklearn.datasets import load_digits

    x = load_digits().data[:300].astype(np.float32) / 16.0  # (300, 64)
    rng = np.random.default_rng(0)
    layers = {f"fc{i}": rng.normal(size=(64, 64)).astype(np.float32) / 8 for i in range(6)}
    head = rng.normal(size=(64, 10)).astype(np.float32)

    def run(float_layers: list[str], inputs: np.ndarray) -> np.ndarray:
        h = inputs
        for name, w in layers.items():
            kept = w if name in float_layers else np.round(w * 6) / 6  # coarse rounding: a 6-level "INT"
            h = np.tanh(h @ kept)
        return h @ head

    reference = run(list(layers), x)
    found, checks = verify(search(run, list(layers), x, reference, bound=0.97, limit=6), lambda f: run(f, x), reference)
    assert found.start.agreement < 0.97 <= found.reached.agreement
    assert found.met and found.reached == fidelity(run(found.float_layers, x), reference) and checks[-1][1] >= 0.97
    count = len(found.float_layers)
    shorter = fidelity(run(found.float_layers[:-1], x), reference).agreement
    assert shorter < 0.97  # one layer fewer misses the bound
    assert len(found.trials) <= 2 + 2 * int(np.ceil(np.log2(max(count, 2))))  # doubling, then bisection
    unreachable = search(run, list(layers), x, reference, bound=1.0, limit=2)
    closest = max([1, 2], key=lambda n: (dict(unreachable.trials)[n], -n))
    assert not unreachable.met and unreachable.float_layers == unreachable.ranking[:closest]


def row(name: str, runtime: str, agreement: float, p50: float) -> VariantMetrics:
    return VariantMetrics(name=name, runtime=runtime, accuracy=0.9, agreement=agreement, latency_ms=Latency(p50),
                          size_mb=4.0, accuracy_drop=0.0)  # fmt: skip


ROWS = [
    row("pytorch-fp32", "pytorch", 1.0, 20.0),
    row("onnx-fp32", "onnxruntime", 1.0, 6.0),
    row("ort-int8", "onnxruntime", 0.985, 3.0),
]


def test_a_variant_below_its_bound_is_not_selected_unless_the_recipe_allows_it() -> None:
    below = gates.run(ROWS, GatesConfig(), "fastest", ["onnxruntime"], {"ort-int8": (0.99, False)})
    assert below.selected == "onnx-fp32"
    (outcome,) = below.outcomes
    assert (outcome.gate, outcome.variant, outcome.threshold, outcome.value, outcome.passed, outcome.enforced) == (
        "quantize.min_agreement", "ort-int8", 0.99, 0.985, False, True
    )  # fmt: skip
    assert below.failures() == ["gate quantize.min_agreement failed for ort-int8: needs ≥ 0.99, measured 0.985"]
    allowed = gates.run(ROWS, GatesConfig(), "fastest", ["onnxruntime"], {"ort-int8": (0.99, True)})
    assert allowed.selected == "ort-int8" and not allowed.outcomes[0].passed and not allowed.outcomes[0].enforced
    met = gates.run(ROWS, GatesConfig(), "fastest", ["onnxruntime"], {"ort-int8": (0.98, False)})
    assert met.selected == "ort-int8" and met.outcomes[0].passed
    # the reports mark it: the failed gate, the agreement table and the agreement chart
    report = make_report(selected="onnx-fp32")
    report["gates"] += [o.to_dict() for o in below.outcomes]
    report["quantize"] = [{"name": "ort-int8", "agreement_control": {
        "min_agreement": 0.99, "met": True, "float_layers_added": ["/conv_dw/Conv"], "start": {"agreement": 0.97},
        "reached": {"val": {"agreement": 0.995}, "calibration": {"agreement": 0.993}},
        "latency_ms": {"quantized": 3.0, "with_float_layers": 3.1}}}]  # fmt: skip
    built = BuildReport.from_dict(report)
    markdown, page = build_markdown(built), build_page(built)
    assert "| quantize.min_agreement | ort-int8 | 99.00% | 98.50% |" in markdown
    assert "| ort-int8 | 99.00% | 1: /conv_dw/Conv | 97.00% | 99.50% | 99.30% | 98.50% ✗ below | 3.00 → 3.10 |" in (
        markdown
    )
    assert "Agreement with FP32 vs latency" in page and "min_agreement 99.00%" in page


def test_recipe_fields_of_the_agreement_control() -> None:
    assert QuantVariant(runtime="onnxruntime").min_agreement == 0.99
    assert QuantVariant(runtime="openvino", min_agreement=None).min_agreement is None
    for bad in (0.0, 1.5):
        with pytest.raises(ValidationError, match="min_agreement"):
            QuantVariant(runtime="onnxruntime", min_agreement=bad)
    with pytest.raises(ValidationError, match="allow_below_agreement lets a variant below its min_agreement"):
        QuantVariant(runtime="onnxruntime", min_agreement=None, allow_below_agreement=True)


@pytest.mark.slow
def test_a_build_checks_each_variant_against_its_bound_and_reports_the_control(tiny_recipe: Path, tmp_path: Path):
    """The pipeline's wiring: the variant's bound reaches the gates, the control's record the reports."""
    from edgetl.pipeline import build
    from edgetl.recipe import Recipe

    recipe = load_recipe(tiny_recipe)
    variant = {"runtime": "onnxruntime", "activation_type": "int8", "keep_float": [], "min_agreement": 1.0}
    # select the smallest: the INT8 file, unless it is below its bound (at 32 px the FP32 file can be the faster)
    recipe = Recipe.model_validate({**recipe.model_dump(mode="json"), "quantize": [variant], "select": "smallest"})
    report = build(recipe, tmp_path / "run").report
    (outcome,) = [g for g in report.gates if g.gate == "quantize.min_agreement"]
    row = next(v for v in report.variants if v.name == "ort-int8")
    assert (outcome.variant, outcome.threshold, outcome.value, outcome.enforced) == (
        "ort-int8",
        1.0,
        row.agreement,
        True,
    )
    assert outcome.passed == (row.agreement == 1.0) and (report.selected.name == "ort-int8") == outcome.passed
    control = report.quantize[0]["agreement_control"]
    assert control["min_agreement"] == 1.0 and control["reached"]["all"]["agreement"] >= control["start"]["agreement"]
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert "Agreement with FP32 (agreement control)" in markdown and ("✗ below" in markdown) != outcome.passed
