"""INT8 for ONNX Runtime: its own `quantize_static` (QDQ, per-channel int8 weights) on the
ORT-optimized graph, with bias correction, layers kept in float, and the agreement and accuracy controls.

Two corrections NNCF also applies: each quantized conv's bias absorbs the mean output shift of
its rounded (7-bit without VNNI) weights, and the first conv and first depthwise conv stay in
float (`keep_float`). `min_agreement` runs `control`'s search with trials that bypass Q/DQ pairs
of the quantized graph; `max_accuracy_drop` keeps layers in float until the val drop is in bound.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgetl.data import Split
from edgetl.environment import has_vnni
from edgetl.errors import RecipeError
from edgetl.fileio import atomic_path
from edgetl.infer import accuracy, engine_logits, in_batches
from edgetl.notes import Note, render
from edgetl.progress import track
from edgetl.quantize.artifact import Inputs
from edgetl.quantize.control import ControlSet
from edgetl.quantize.graph import quantized_nodes
from edgetl.quantize.ort_control import agreement_control
from edgetl.recipe import QuantVariant
from edgetl.runtime.bench import interleaved_latency
from edgetl.runtime.engines import OnnxRuntimeEngine, open_engine
from edgetl.runtime.preprocess import Preprocessing

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)
_RANKING_IMAGES = 64  # val images the sensitivity ranking compares logits on
# calibration images per batch when measuring the convs' mean inputs: it sets the order the means are summed
# in, so the corrected biases, and with them the quantized file's bytes, depend on it
_STATISTICS_BATCH = 32


def quantize(
    fp32: Path,
    file: Path,
    calibration: list[np.ndarray],
    variant: QuantVariant,
    inputs: Inputs,
    control: ControlSet | None = None,
) -> tuple[list[Note], dict | None]:
    """Quantize `fp32` into `file`; returns the notes for the report and the agreement control's record
    (`control.Search.record`; None when it did not run: no `control` set, or `max_accuracy_drop` instead).

    Calibration runs once; every trial below (activation type, layers left in float) reuses
    its ranges through ONNX Runtime's calibration cache. Raises RecipeError when `keep_float`
    names a node the graph does not have.
    """
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = file.with_name(f".{file.stem}.prepared.onnx")
    ranges = file.with_name(f".{file.stem}.calibration.json")
    notes = []
    try:
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        float_model = onnx.load(str(prepared))  # parsed once: the ranking quantizes ~100 times
        input_name = float_model.graph.input[0].name
        reduce_range = not has_vnni()
        kept = _kept_in_float(float_model.graph, variant.keep_float, variant.display_name)
        if kept:
            notes.append(Note("keep_float", {"nodes": ", ".join(kept)}))
        errors = weight_rounding_errors(float_model, calibration, reduce_range, input_name)
        notes.append(Note("bias_correction", {"convs": len(errors)}))
        quantizer = _OrtQuantizer(prepared, float_model, calibration, variant.calibration_method, ranges,
                                  reduce_range, input_name, errors, inputs.threads)  # fmt: skip
        if quantizer.reduce_range:
            notes.append(Note("reduce_range"))
        activation = variant.activation_type
        if activation == "auto":
            activation, measured = _faster_activation_type(quantizer, file, calibration[0], kept)
            notes.append(measured)
        else:
            quantizer(file, activation, kept)
        record = None
        if variant.max_accuracy_drop is not None:
            val, max_drop = inputs.dataset.val, variant.max_accuracy_drop
            excluded, accuracy_note = _exclude_sensitive_nodes(
                quantizer, file, activation, kept, val, inputs.pre, max_drop
            )
            notes.append(accuracy_note)
            if excluded != kept:
                quantizer(file, activation, excluded)
        elif control is not None and variant.min_agreement is not None:
            record = agreement_control(quantizer, file, activation, kept, control, variant.min_agreement)
    finally:
        prepared.unlink(missing_ok=True)
        ranges.unlink(missing_ok=True)
    return notes, record


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
    # conv node → (its bias initializer, mean output shift of its rounded weights)
    bias_errors: dict[str, tuple[str, np.ndarray]]
    threads: int | None  # of the sessions that measure the trials

    def __call__(self, out: Path, activation: str, excluded: list[str]) -> Path:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        methods = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }
        corrected = out.with_name(f".{out.stem}.corrected.onnx")
        try:
            errors = {node: error for node, error in self.bias_errors.items() if node not in excluded}
            _correct_biases(self.float_model, corrected, errors)
            with atomic_path(out) as tmp:
                quantize_static(
                    str(corrected),
                    str(tmp),
                    _Reader(self.calibration, self.input_name),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    reduce_range=self.reduce_range,
                    activation_type=QuantType.QUInt8 if activation == "uint8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=methods[self.method],
                    nodes_to_exclude=excluded,
                    calibration_cache_path=str(self.ranges),
                )
        finally:
            corrected.unlink(missing_ok=True)
        return out

    def logits(self, model: Path, images: np.ndarray, pre: Preprocessing) -> np.ndarray:
        """`model`'s logits (the float one or a trial) for uint8 crops."""
        return engine_logits(OnnxRuntimeEngine(model, self.threads), images, pre)


def _kept_in_float(graph: onnx.GraphProto, keep_float: list[str] | None, name: str) -> list[str]:
    """The recipe's `keep_float` nodes, checked against the graph; by default the first
    convolution and the first depthwise one (where there is one: not in a ResNet).

    Raises RecipeError naming the nodes the graph does not have.
    """
    convs = [node for node in graph.node if node.op_type == "Conv"]
    if keep_float is None:
        depthwise = [node.name for node in convs[1:] if any(a.name == "group" and a.i > 1 for a in node.attribute)]
        return [node.name for node in convs[:1]] + depthwise[:1]
    unknown = sorted(set(keep_float) - {node.name for node in graph.node})
    if unknown:
        first = [node.name for node in convs[:4]]
        raise RecipeError(
            f"quantize variant {name}: keep_float names {unknown}, which are not nodes of the exported "
            f"model; its convolutions are {first} … (report.json lists every variant's float layers)"
        )
    return list(keep_float)


def weight_rounding_errors(
    float_model: onnx.ModelProto, calibration: list[np.ndarray], reduce_range: bool, input_name: str
) -> dict[str, tuple[str, np.ndarray]]:
    """Per conv with a bias: E[(W_q − W) ∗ x], the mean output shift its quantized weights cause.

    W_q comes from ONNX Runtime's own per-channel symmetric weight quantizer, and E[x] is each
    input channel's mean over the calibration images in the float model (Nagel et al. 2019,
    "Data-Free Quantization", bias correction, with measured instead of BatchNorm-derived
    means; padding borders are ignored). Subtracting it from the bias removes the systematic
    part of the rounding error, the part that adds up layer after layer. Returns conv node →
    (its bias initializer, the shift per output channel).
    """
    from onnx import numpy_helper

    weights = {init.name: init for init in float_model.graph.initializer}
    convs = [
        n
        for n in float_model.graph.node
        if n.op_type == "Conv" and len(n.input) > 2 and n.input[1] in weights and n.input[2] in weights
    ]
    mean_inputs = _mean_channels(float_model, sorted({n.input[0] for n in convs}), calibration, input_name)
    errors = {}
    for node in convs:
        w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float64)
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        out_channels, in_per_group = w.shape[:2]
        # (O, I/g) → the input channel each weight reads
        first = (np.arange(out_channels) // (out_channels // groups))[:, None] * in_per_group
        channel_of = first + np.arange(in_per_group)[None]
        mean_x = mean_inputs[node.input[0]]
        shift = ((_rounded(w, reduce_range) - w).sum(axis=(2, 3)) * mean_x[channel_of]).sum(axis=1)
        errors[node.name] = (node.input[2], shift)
    return errors


def _rounded(weight: np.ndarray, reduce_range: bool) -> np.ndarray:
    """(O, I/g, kH, kW) conv weights through ONNX Runtime's symmetric int8 quantizer, per output channel, and back."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data

    channels = []
    for channel in weight:
        zero_point, scale, values = quantize_data(channel.ravel(), TensorProto.INT8, True, reduce_range)
        channels.append(((values.astype(np.float64) - float(zero_point)) * float(scale)).reshape(channel.shape))
    return np.stack(channels)


def _mean_channels(
    float_model: onnx.ModelProto, tensors: list[str], calibration: list[np.ndarray], input_name: str
) -> dict[str, np.ndarray]:
    """Each of `tensors`' per-channel mean over the calibration images, in the float model."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto

    model = onnx.ModelProto()
    model.CopyFrom(float_model)  # its outputs are replaced below
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in tensors)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def channel_sums(batch: np.ndarray) -> list[np.ndarray]:  # summed per batch: the activations are not kept
        values = session.run(tensors, {input_name: batch})
        return [value.astype(np.float64).mean(axis=(2, 3)).sum(0) for value in values]

    images = np.concatenate(calibration)
    sums = dict.fromkeys(tensors, 0.0)
    for batch_sums in in_batches(channel_sums, images, _STATISTICS_BATCH):
        for name, value in zip(tensors, batch_sums):
            sums[name] = sums[name] + value
    return {name: total / len(images) for name, total in sums.items()}


def _correct_biases(float_model: onnx.ModelProto, out: Path, errors: dict[str, tuple[str, np.ndarray]]) -> None:
    """Save `float_model` to `out` with each bias in `errors` minus its conv's mean output shift."""
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(float_model)
    by_name = {init.name: init for init in model.graph.initializer}
    for bias, error in errors.values():
        corrected = numpy_helper.to_array(by_name[bias]).astype(np.float64) - error
        by_name[bias].CopyFrom(numpy_helper.from_array(corrected.astype(np.float32), bias))
    onnx.save(model, str(out))


def _faster_activation_type(
    quantizer: _OrtQuantizer, file: Path, example: np.ndarray, kept: list[str]
) -> tuple[str, Note]:
    """Quantize with uint8 and int8 activations and keep the faster here, at `file` (without VNNI: uint8)."""
    trials = {a: file.with_name(f".{file.stem}.{a}.onnx") for a in ("uint8", "int8")}
    try:
        engines = {
            a: open_engine(quantizer(path, a, kept), "onnxruntime", quantizer.threads) for a, path in trials.items()
        }
        calls = {a: (lambda e=e: e.run(example)) for a, e in engines.items()}
        timings = interleaved_latency(calls, rounds=5, runs_per_round=10, warmup=5)
        chosen = min(timings, key=lambda a: timings[a]["p50"])
        trials[chosen].replace(file)
    finally:
        for path in trials.values():
            path.unlink(missing_ok=True)
    measured = {"uint8_ms": timings["uint8"]["p50"], "int8_ms": timings["int8"]["p50"], "kept": chosen}
    return chosen, Note("activation_type", measured)


def _exclude_sensitive_nodes(
    quantizer: _OrtQuantizer,
    file: Path,
    activation: str,
    kept: list[str],
    val: Split,
    pre: Preprocessing,
    max_drop: float,
) -> tuple[list[str], Note]:
    """Beyond `kept`, leave the most sensitive nodes in float, 1, 2, 4, … of them, until the val drop is within
    `max_drop`; returns the nodes left in float and the note saying how far it got."""
    float_logits = quantizer.logits(quantizer.prepared, val.images, pre)
    float_accuracy = accuracy(float_logits, val.labels)
    trial = file.with_name(f".{file.stem}.trial.onnx")

    def drop_with(excluded: list[str]) -> float:
        quantizer(trial, activation, excluded)
        return float_accuracy - accuracy(quantizer.logits(trial, val.images, pre), val.labels)

    try:
        drop = drop_with(kept)
        if drop <= max_drop:
            return kept, Note("accuracy_control_all", {"drop": drop, "max_drop": max_drop})
        ranking = _sensitivity_ranking(
            quantizer, trial, activation, kept, val.images[:_RANKING_IMAGES], pre, float_logits[:_RANKING_IMAGES]
        )
        count = 1
        while True:
            excluded = kept + ranking[:count]
            drop = drop_with(excluded)
            if drop <= max_drop or count == len(ranking):
                values = {"count": count, "ranked": len(ranking), "drop": drop, "max_drop": max_drop}
                if drop <= max_drop:
                    return excluded, Note("accuracy_control_met", values)
                missed = Note("accuracy_control_missed", values)
                log.warning("%s: %s", file.stem, render(missed))
                return excluded, missed
            count = min(count * 2, len(ranking))
    finally:
        trial.unlink(missing_ok=True)


def _sensitivity_ranking(
    quantizer: _OrtQuantizer,
    trial: Path,
    activation: str,
    kept: list[str],
    images: np.ndarray,
    pre: Preprocessing,
    float_logits: np.ndarray,
) -> list[str]:
    """Every quantized node (convs, but also residual Adds and pooling, whose activation noise
    adds up too), most sensitive first: how close to the float logits the model gets when
    that node also stays in float (NNCF ranks its quantizers the same way). `trial` holds
    the model quantized but for `kept` when called."""
    import onnx

    nodes = quantized_nodes(onnx.load(str(trial)).graph)
    error = {}
    for node in track(nodes, total=len(nodes), description="ranking nodes by quantization sensitivity"):
        quantizer(trial, activation, [*kept, node])
        error[node] = float(np.mean((quantizer.logits(trial, images, pre) - float_logits) ** 2))
    return sorted(nodes, key=error.__getitem__)


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over in-memory batches (quantize_static
    calls `get_next`; the qdq_loss_debug tools iterate)."""

    def __init__(self, batches: list[np.ndarray], input_name: str) -> None:
        self._items = iter([{input_name: b} for b in batches])

    def get_next(self) -> dict | None:
        return next(self._items, None)

    def __iter__(self):
        return self._items
