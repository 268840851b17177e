"""Agreement control for OpenVINO INT8 (NNCF's post-training quantization): `control.search` with
trials that revert operations of NNCF's INT8 IR to float.

A trial is the IR NNCF made with the chosen operations reading float inputs again: each
FakeQuantize in front of them bypassed, their int8 weights (a decompression chain) and
their bias (which NNCF's bias correction changed) replaced by the FP32 IR's constants.
That is what NNCF's own accuracy control does to revert a layer
(`revert_operations_to_floating_point_precision`), without quantizing again; the chosen
trial is the file. NNCF's `quantize_with_accuracy_control` itself, with agreement as its
metric, took 200 s on a 32-px lite0 on 2 cores (it compiles a model per quantizer group
and re-ranks after every reverted layer), far over the 2-minute budget at 224 px.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgetl.export import save_openvino
from edgetl.infer import in_batches
from edgetl.quantize.control import MAX_FLOAT_LAYERS, ControlSet, latency_cost, search, verify
from edgetl.runtime.engines import join_outputs, open_engine

_WEIGHTS = "/fq_weights_"  # NNCF names the decompression chain of an operation's int8 weights <op>/fq_weights_<port>


def control(file: Path, fp32: Path, control_set: ControlSet, bound: float, threads: int | None) -> dict:
    """Leave the fewest operations of NNCF's INT8 IR `file` in float for agreement ≥ `bound` on the control
    images (`fp32`: the FP32 IR it was quantized from); `file` is rewritten with them. Returns the record."""
    import openvino as ov

    core = ov.Core()
    quantized, original = core.read_model(str(file)), core.read_model(str(fp32))
    # f32 as the engines run it: OpenVINO computes in bf16 by default on CPUs that have AVX-512 BF16
    config = {"INFERENCE_PRECISION_HINT": "f32"} | ({"INFERENCE_NUM_THREADS": threads} if threads else {})

    def trial(float_ops: list[str], x: np.ndarray) -> np.ndarray:
        compiled = core.compile_model(with_float_ops(quantized, original, float_ops), "CPU", config)
        outputs = range(len(compiled.outputs))  # a multi-task model's: one per task, side by side

        def run(batch: np.ndarray) -> np.ndarray:
            result = compiled(batch)
            return join_outputs([result[i] for i in outputs])

        return np.concatenate(in_batches(run, x))

    inputs, reference, readout = control_set.inputs, control_set.reference, control_set.readout
    found = search(trial, quantized_ops(quantized), inputs, reference, bound, MAX_FLOAT_LAYERS, readout)
    if not found.float_layers:
        return found.record(control_set, {})
    found, checks = verify(found, lambda float_ops: trial(float_ops, inputs), reference, readout=readout)
    trial_file = file.with_name(f".{file.stem}.trial.xml")
    try:
        save_openvino(with_float_ops(quantized, original, found.float_layers), trial_file, compress_to_fp16=False)
        latency = latency_cost(open_engine(file, "openvino", threads), open_engine(trial_file, "openvino", threads),
                               control_set.inputs[:1])  # fmt: skip
        trial_file.replace(file)
        trial_file.with_suffix(".bin").replace(file.with_suffix(".bin"))
    finally:
        trial_file.unlink(missing_ok=True)
        trial_file.with_suffix(".bin").unlink(missing_ok=True)
    return found.record(control_set, latency) | {"checks": checks}  # [count, agreement] on every control image


def quantized_ops(model) -> list[str]:
    """The friendly names of the operations that read a FakeQuantize output or int8 weights, in graph order."""
    names = []
    for op in model.get_ordered_ops():
        sources = [value.get_node() for value in op.input_values()]
        if any(_is_quantizer(source) for source in sources) and op.get_type_name() != "FakeQuantize":
            names.append(op.get_friendly_name())
    return names


def _is_quantizer(node) -> bool:
    return node.get_type_name() == "FakeQuantize" or _WEIGHTS in node.get_friendly_name()


def with_float_ops(quantized, original, names: list[str]):
    """A clone of `quantized` whose operations `names` read float inputs: FakeQuantize bypassed, int8 weights and
    the corrected bias of the Add that follows a convolution replaced by `original`'s (the FP32 model's) constants."""
    import openvino as ov

    model = quantized.clone()
    ops = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
    float_ops = {op.get_friendly_name(): op for op in original.get_ordered_ops()}
    for name in names:
        op = ops[name]
        for port, value in enumerate(op.input_values()):
            source = value.get_node()
            if source.get_type_name() == "FakeQuantize":
                op.input(port).replace_source_output(source.input_value(0))
            elif _WEIGHTS in source.get_friendly_name():
                weights = float_ops[name].input_value(port).get_node().get_data()
                op.input(port).replace_source_output(ov.op.Constant(np.array(weights)).output(0))
        bias = name.removesuffix("/WithoutBiases")
        if bias != name and bias in ops and bias in float_ops:  # the conv's bias Add (NNCF's bias correction)
            original_bias = float_ops[bias].input_value(1).get_node()
            if original_bias.get_type_name() == "Constant":
                ops[bias].input(1).replace_source_output(ov.op.Constant(np.array(original_bias.get_data())).output(0))
    model.validate_nodes_and_infer_types()
    return model
