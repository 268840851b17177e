"""Quantize stage: INT8 (and FP16) variants of the exported model, calibrated on real images.

INT8 for ONNX Runtime uses ONNX Runtime's own `quantize_static` (QDQ, per-channel int8
weights) on the ORT-optimized graph: measured on lite0, its uint8-activation model ran at
0.25× FP32 latency, while NNCF's QDQ graph ran 2–3× *slower* than FP32 in ONNX Runtime on
this AVX2 CPU. INT8 for OpenVINO uses NNCF (FACTS.md: 0.84–0.98 top-1 agreement).
`max_accuracy_drop` turns on accuracy control: NNCF's accuracy-controlled quantization for
OpenVINO; for ONNX Runtime, the most sensitive layers are left in float until the drop on
the validation split is within bound. Calibration always uses real training images
through the eval preprocessing.

ONNX Runtime's INT8 gets two corrections NNCF already applies on its side. Its weights are
7-bit on CPUs without VNNI, and their rounding shifts each conv's mean output: every
quantized conv's bias absorbs that shift, measured on the calibration images (bias
correction). And the first convolution and the first depthwise one stay in float by
default (`keep_float`). Measured on the fine-tuned cifar lite0 (1,000 test images, FP32
0.776): plain 0.719, first conv in float 0.764, bias-corrected 0.742, both 0.774 (agreement
0.805 → 0.911); the first depthwise conv in float too: agreement 0.919 → 0.954 on test and
0.927 → 0.973 on val (NNCF reverts it as well). Neither float layer costs measurable latency.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from edgetl import qat
from edgetl.data import Dataset
from edgetl.environment import has_vnni
from edgetl.errors import RecipeError
from edgetl.export import ExportResult, onnx_metadata, save_openvino, to_openvino
from edgetl.fileio import atomic_path
from edgetl.models import TransferModel
from edgetl.progress import track
from edgetl.recipe import QuantVariant
from edgetl.runtime.bench import interleaved_latency
from edgetl.runtime.engines import OnnxRuntimeEngine, open_engine
from edgetl.runtime.preprocess import Preprocessing, normalize
from edgetl.infer import accuracy

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizedArtifact:
    name: str
    runtime: str
    precision: str
    file: Path
    float_layers: list[str]  # weighted layers left in float (accuracy control, or never quantized)
    seconds: float
    calibration_images: int
    notes: list[str] = field(default_factory=list)


def run(export: ExportResult, dataset: Dataset, pre: Preprocessing, variants: list[QuantVariant], out_dir: Path, seed: int, threads: int | None,
        model: TransferModel | None = None) -> list[QuantizedArtifact]:
    """Make every variant of the recipe's `quantize:` list into `out_dir/<name>.onnx|.xml`.

    `model` (the trained PyTorch model) is needed by `method: qat` variants only.

    >>> run(export_result, dataset, pre, recipe.quantize, run_dir / "quantize", seed=0, threads=None)[0].file
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    with _temporaries_in(out_dir):
        for variant in variants:
            if variant.runtime == "openvino" and export.openvino is None:
                raise RecipeError(f"quantize variant {variant.display_name} needs OpenVINO, which is not installed; install it with `pip install 'edgetl[openvino]'` or remove the variant.")
            started = time.monotonic()
            notes: list[str] = []
            if variant.precision == "fp16":
                file = to_openvino(export.onnx, out_dir / f"{variant.display_name}.xml", compress_to_fp16=True)
                results.append(QuantizedArtifact(variant.display_name, "openvino", "fp16", file, [], time.monotonic() - started, 0))
                continue
            calibration = _calibration_batches(dataset, pre, variant.calibration_images, seed, variant.display_name, notes)
            if variant.method == "qat":
                metadata = onnx_metadata(export.onnx)  # the labels and contract, for the IR converted from PyTorch
                file, qat_notes = qat.run(model, dataset, pre, variant, calibration, out_dir, seed, metadata)
                notes.extend(qat_notes)
            elif variant.quantizer == "onnxruntime":
                file = _ort_quantize(export.onnx, out_dir / f"{variant.display_name}.onnx", calibration, dataset, pre, variant, threads, notes)
            else:
                file = _nncf_quantize(export, out_dir, calibration, dataset, pre, variant)
            float_layers = float_weighted_layers(file)
            if float_layers:
                notes.append(f"{len(float_layers)} weighted layer(s) kept in float: {', '.join(float_layers[:8])}{' …' if len(float_layers) > 8 else ''}")
            seconds = time.monotonic() - started
            log.info("quantized %s in %.1fs%s", variant.display_name, seconds, f" ({'; '.join(notes)})" if notes else "")
            results.append(QuantizedArtifact(variant.display_name, variant.runtime, "int8", file, float_layers, seconds, len(calibration), notes))
    return results


@contextmanager
def _temporaries_in(out_dir: Path) -> Iterator[None]:
    """Python's temp folder moved under `out_dir` while quantizing, removed afterwards.

    ONNX Runtime's quantize_static (and NNCF) write their working copies of the model
    (13 MB for lite0) to `tempfile`'s folder, without a `dir` argument; a killed build
    left them in /tmp. Under the stage's staging folder they go with it: removed here,
    or by the next build's cleanup of the staging folder after a kill.
    """
    folder = tempfile.mkdtemp(prefix=".quantizer.", suffix=".tmp", dir=out_dir)
    previous, tempfile.tempdir = tempfile.tempdir, folder
    try:
        yield
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(folder, ignore_errors=True)


def _calibration_batches(dataset: Dataset, pre: Preprocessing, count: int, seed: int, name: str, notes: list[str]) -> list[np.ndarray]:
    """`count` real training images, seeded, each a float32 (1, 3, S, S) batch."""
    available = len(dataset.train.labels)
    if available < count:
        notes.append(f"asked for {count} calibration images; the train split has {available}, all used")
        log.warning("%s: %s", name, notes[-1])
    order = np.random.default_rng(seed).permutation(available)[:count]
    images = normalize(dataset.train.images[np.sort(order)], pre)
    return [images[i : i + 1] for i in range(len(images))]


def _nncf_quantize(export: ExportResult, out_dir: Path, calibration: list[np.ndarray], dataset: Dataset, pre: Preprocessing, variant: QuantVariant) -> Path:
    import nncf

    if variant.runtime == "openvino":
        import openvino as ov

        model = ov.Core().read_model(str(export.openvino))
        to_input = lambda batch: batch  # noqa: E731 - NNCF wants a transform function
    else:
        import onnx

        model = onnx.load(str(export.onnx))
        input_name = model.graph.input[0].name
        to_input = lambda batch: {input_name: batch}  # noqa: E731
    calibration_set = nncf.Dataset(calibration, to_input)
    if variant.max_accuracy_drop is None:
        quantized = nncf.quantize(model, calibration_set, subset_size=len(calibration))
    else:
        val_images = normalize(dataset.val.images, pre)
        val_items = [(val_images[i : i + 1], int(label)) for i, label in enumerate(dataset.val.labels)]
        quantized = nncf.quantize_with_accuracy_control(
            model, calibration_set, nncf.Dataset(val_items, lambda item: to_input(item[0])), _nncf_accuracy,
            max_drop=variant.max_accuracy_drop, subset_size=len(calibration),
        )
    if variant.runtime == "openvino":
        return save_openvino(quantized, out_dir / f"{variant.display_name}.xml", compress_to_fp16=False)
    import onnx

    file = out_dir / f"{variant.display_name}.onnx"
    with atomic_path(file) as tmp:
        onnx.save(quantized, str(tmp))
    return file


def _nncf_accuracy(model, items) -> float:
    """NNCF's validation_fn: top-1 accuracy. It passes an OpenVINO compiled model or an ONNX ModelProto."""
    if hasattr(model, "SerializeToString"):
        import onnxruntime as ort

        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        predict = lambda x: session.run(None, {name: x})[0]  # noqa: E731
    else:
        predict = lambda x: model(x)[0]  # noqa: E731
    hits = [int(np.argmax(predict(image)) == label) for image, label in items]
    return float(np.mean(hits))


def _ort_quantize(fp32: Path, file: Path, calibration: list[np.ndarray], dataset: Dataset, pre: Preprocessing, variant: QuantVariant, threads: int | None, notes: list[str]) -> Path:
    """ONNX Runtime's own QDQ quantization (per-channel int8 weights) of the ORT-optimized graph.

    Calibration runs once; every trial below (activation type, layers left in float)
    reuses its ranges through ONNX Runtime's calibration cache.
    """
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = file.with_name(f".{file.stem}.prepared.onnx")
    ranges = file.with_name(f".{file.stem}.calibration.json")
    try:
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        float_model = onnx.load(str(prepared))  # parsed once: the ranking quantizes ~100 times
        input_name = float_model.graph.input[0].name
        reduce_range = not has_vnni()
        kept = _kept_in_float(float_model.graph, variant.keep_float, variant.display_name)
        if kept:
            notes.append(f"kept in float (keep_float): {', '.join(kept)}")
        errors = _weight_rounding_errors(float_model, calibration, reduce_range, input_name)
        notes.append(f"bias correction: {len(errors)} conv(s) absorb the mean output shift of their rounded weights")
        quantizer = _OrtQuantizer(prepared, float_model, calibration, variant.calibration_method, ranges, reduce_range, input_name, errors)
        if quantizer.reduce_range:
            notes.append("7-bit weights (reduce_range): this CPU has no VNNI, where 8-bit weights saturate ONNX Runtime's int8 kernels")
        activation = variant.activation_type
        if activation == "auto":
            activation = _faster_activation_type(quantizer, file, calibration[0], kept, threads, notes)
        else:
            quantizer(file, activation, kept)
        if variant.max_accuracy_drop is not None:
            excluded = _exclude_sensitive_nodes(quantizer, file, activation, kept, dataset, pre, variant.max_accuracy_drop, threads, notes)
            if excluded != kept:
                quantizer(file, activation, excluded)
    finally:
        prepared.unlink(missing_ok=True)
        ranges.unlink(missing_ok=True)
    return file


@dataclass(frozen=True)
class _OrtQuantizer:
    """`quantize_static` of one prepared model with one calibration, callable per trial."""

    prepared: Path
    float_model: onnx.ModelProto  # `prepared`, parsed
    calibration: list[np.ndarray]
    method: str
    ranges: Path  # ONNX Runtime's calibration cache: written by the first call, read by the rest
    reduce_range: bool  # 7-bit weights: ONNX Runtime's advice for u8s8 on CPUs without VNNI (see environment.has_vnni)
    input_name: str
    bias_errors: dict[str, tuple[str, np.ndarray]]  # conv node → (its bias initializer, mean output shift of its rounded weights)

    def __call__(self, out: Path, activation: str, excluded: list[str]) -> Path:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
        corrected = out.with_name(f".{out.stem}.corrected.onnx")
        try:
            _correct_biases(self.float_model, corrected, {node: error for node, error in self.bias_errors.items() if node not in excluded})
            with atomic_path(out) as tmp:
                quantize_static(
                    str(corrected), str(tmp), _Reader(self.calibration, self.input_name), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=self.reduce_range, activation_type=QuantType.QUInt8 if activation == "uint8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8, calibrate_method=methods[self.method], nodes_to_exclude=excluded,
                    calibration_cache_path=str(self.ranges),
                )
        finally:
            corrected.unlink(missing_ok=True)
        return out


def _kept_in_float(graph: onnx.GraphProto, keep_float: list[str] | None, name: str) -> list[str]:
    """The recipe's `keep_float` nodes, checked against the graph; by default the first
    convolution and the first depthwise one (where there is one: not in a ResNet)."""
    convs = [node for node in graph.node if node.op_type == "Conv"]
    if keep_float is None:
        depthwise = [node.name for node in convs[1:] if any(a.name == "group" and a.i > 1 for a in node.attribute)]
        return [node.name for node in convs[:1]] + depthwise[:1]
    unknown = sorted(set(keep_float) - {node.name for node in graph.node})
    if unknown:
        raise RecipeError(f"quantize variant {name}: keep_float names {unknown}, which are not nodes of the exported model; its convolutions are {[node.name for node in convs[:4]]} … (report.json lists every variant's float layers)")
    return list(keep_float)


def _weight_rounding_errors(float_model: onnx.ModelProto, calibration: list[np.ndarray], reduce_range: bool, input_name: str) -> dict[str, tuple[str, np.ndarray]]:
    """Per conv with a bias: E[(W_q − W) ∗ x], the mean output shift its quantized weights cause.

    W_q comes from ONNX Runtime's own per-channel symmetric weight quantizer, and E[x] is each
    input channel's mean over the calibration images in the float model (Nagel et al. 2019,
    "Data-Free Quantization", bias correction, with measured instead of BatchNorm-derived
    means; padding borders are ignored). Subtracting it from the bias removes the systematic
    part of the rounding error, the part that adds up layer after layer.
    """
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, numpy_helper
    from onnxruntime.quantization.quant_utils import quantize_data

    model = onnx.ModelProto()
    model.CopyFrom(float_model)  # its outputs are replaced below
    weights = {init.name: init for init in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 2 and n.input[1] in weights and n.input[2] in weights]
    inputs = sorted({n.input[0] for n in convs})
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in inputs)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    batch = np.concatenate(calibration)
    sums = dict.fromkeys(inputs, 0.0)
    for i in range(0, len(batch), 32):
        for name, value in zip(inputs, session.run(inputs, {input_name: batch[i : i + 32]})):
            sums[name] = sums[name] + value.astype(np.float64).mean(axis=(2, 3)).sum(0)
    errors = {}
    for node in convs:
        w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float64)
        rounded = np.stack([_dequantized(quantize_data(channel.ravel(), TensorProto.INT8, True, reduce_range)).reshape(channel.shape) for channel in w])
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        out_channels, in_per_group = w.shape[:2]
        channel_of = (np.arange(out_channels) // (out_channels // groups))[:, None] * in_per_group + np.arange(in_per_group)[None]  # (O, I/g) → input channel
        mean_x = sums[node.input[0]] / len(batch)
        errors[node.name] = (node.input[2], ((rounded - w).sum(axis=(2, 3)) * mean_x[channel_of]).sum(axis=1))
    return errors


def _dequantized(quantized: tuple) -> np.ndarray:
    zero_point, scale, values = quantized
    return (values.astype(np.float64) - float(zero_point)) * float(scale)


def _correct_biases(float_model: onnx.ModelProto, out: Path, errors: dict[str, tuple[str, np.ndarray]]) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(float_model)
    by_name = {init.name: init for init in model.graph.initializer}
    for bias, error in errors.values():
        corrected = numpy_helper.to_array(by_name[bias]).astype(np.float64) - error
        by_name[bias].CopyFrom(numpy_helper.from_array(corrected.astype(np.float32), bias))
    onnx.save(model, str(out))


def _faster_activation_type(quantizer: _OrtQuantizer, file: Path, example: np.ndarray, kept: list[str], threads: int | None, notes: list[str]) -> str:
    """Quantize with uint8 and int8 activations and keep the faster here, at `file` (FACTS.md: no VNNI → uint8)."""
    trials = {a: file.with_name(f".{file.stem}.{a}.onnx") for a in ("uint8", "int8")}
    try:
        engines = {a: open_engine(quantizer(path, a, kept), "onnxruntime", threads) for a, path in trials.items()}
        timings = interleaved_latency({a: (lambda e=e: e.run(example)) for a, e in engines.items()}, rounds=5, runs_per_round=10, warmup=5)
        chosen = min(timings, key=lambda a: timings[a]["p50"])
        trials[chosen].replace(file)
    finally:
        for path in trials.values():
            path.unlink(missing_ok=True)
    notes.append("activation type measured: " + ", ".join(f"{a} {t['p50']:.2f} ms" for a, t in timings.items()) + f"; kept {chosen}")
    return chosen


def _exclude_sensitive_nodes(quantizer: _OrtQuantizer, file: Path, activation: str, kept: list[str], dataset: Dataset, pre: Preprocessing, max_drop: float, threads: int | None, notes: list[str]) -> list[str]:
    """Beyond `kept`, leave the most sensitive nodes in float, 1, 2, 4, … of them, until the val drop is within `max_drop`."""
    val_x, val_y = normalize(dataset.val.images, pre), dataset.val.labels
    float_logits = _logits(OnnxRuntimeEngine(quantizer.prepared, threads), val_x)
    float_accuracy = accuracy(float_logits, val_y)
    trial = file.with_name(f".{file.stem}.trial.onnx")

    def drop_with(excluded: list[str]) -> float:
        quantizer(trial, activation, excluded)
        return float_accuracy - accuracy(_logits(OnnxRuntimeEngine(trial, threads), val_x), val_y)

    try:
        drop = drop_with(kept)
        if drop <= max_drop:
            notes.append(f"accuracy control: val drop {drop:.4f} ≤ {max_drop} with every other layer quantized")
            return kept
        ranking = _sensitivity_ranking(quantizer, trial, activation, kept, val_x[:_RANKING_IMAGES], float_logits[:_RANKING_IMAGES], threads)
        count = 1
        while True:
            excluded = kept + ranking[:count]
            drop = drop_with(excluded)
            if drop <= max_drop or count == len(ranking):
                met = "within" if drop <= max_drop else "NOT within"
                notes.append(f"accuracy control: {count} more of {len(ranking)} quantized node(s) left in float, val drop {drop:.4f} {met} {max_drop}")
                if drop > max_drop:
                    log.warning("%s: %s", file.stem, notes[-1])
                return excluded
            count = min(count * 2, len(ranking))
    finally:
        trial.unlink(missing_ok=True)


_RANKING_IMAGES = 64


def _sensitivity_ranking(quantizer: _OrtQuantizer, trial: Path, activation: str, kept: list[str], x: np.ndarray, float_logits: np.ndarray, threads: int | None) -> list[str]:
    """Every quantized node (convs, but also residual Adds and pooling, whose activation noise
    adds up too), most sensitive first: how close to the float logits the model gets when
    that node also stays in float (NNCF ranks its quantizers the same way). `trial` holds
    the model quantized but for `kept` when called."""
    import onnx

    graph = onnx.load(str(trial)).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    nodes = [n.name for n in graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and dequantized & set(n.input)]
    error = {}
    for node in track(nodes, total=len(nodes), description="ranking nodes by quantization sensitivity"):
        quantizer(trial, activation, [*kept, node])
        error[node] = float(np.mean((_logits(OnnxRuntimeEngine(trial, threads), x) - float_logits) ** 2))
    return sorted(nodes, key=error.__getitem__)


def _logits(engine: OnnxRuntimeEngine, x: np.ndarray) -> np.ndarray:
    return np.concatenate([engine.run(x[i : i + 64]) for i in range(0, len(x), 64)])


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over in-memory batches (quantize_static
    calls `get_next`; the qdq_loss_debug tools iterate)."""

    def __init__(self, batches: list[np.ndarray], input_name: str) -> None:
        self._items = iter([{input_name: b} for b in batches])

    def get_next(self) -> dict | None:
        return next(self._items, None)

    def __iter__(self):
        return self._items


def float_weighted_layers(file: Path) -> list[str]:
    """Convolutions and matmuls whose weights are not quantized, by node name."""
    if file.suffix == ".onnx":
        import onnx

        graph = onnx.load(str(file)).graph
        dequantized = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
        return [node.name for node in graph.node if node.op_type in ("Conv", "Gemm", "MatMul") and node.input[1] not in dequantized]
    import openvino as ov

    model = ov.Core().read_model(str(file))
    weighted = ("Convolution", "GroupConvolution", "MatMul")
    return [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() in weighted and not _has_quantized_weights(op.input_value(1).get_node())]


def _has_quantized_weights(node, depth: int = 4) -> bool:
    """NNCF stores OpenVINO weights as int8 constants with a decompression chain (Convert, Subtract, Multiply)."""
    if node.get_type_name() == "FakeQuantize" or (node.get_type_name() == "Constant" and node.get_element_type().get_type_name() in ("i8", "u8", "i4", "u4")):
        return True
    return depth > 0 and any(_has_quantized_weights(value.get_node(), depth - 1) for value in node.input_values())
