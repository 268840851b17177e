"""The agreement search (`control.search`) for ONNX Runtime INT8: trials on the QDQ graph that
`quantize_static` made, with the chosen nodes reading float inputs again (`graph.with_float_nodes`),
then the file quantized again with those nodes excluded, and checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgetl.infer import in_batches
from edgetl.quantize.control import MAX_FLOAT_LAYERS, ControlSet, latency_cost, search, verify
from edgetl.quantize.graph import quantized_nodes, with_float_nodes
from edgetl.runtime.engines import OnnxRuntimeEngine, join_outputs


def agreement_control(
    quantizer, file: Path, activation: str, kept: list[str], control: ControlSet, bound: float
) -> dict:
    """Leave the fewest quantized nodes of `file` in float (beyond `kept`) for agreement ≥ `bound` on the
    control images; `file` is rewritten with them. Returns the search's record.

    `quantizer`: `ort._OrtQuantizer`, called as quantizer(out, activation, excluded nodes); its `float_model`,
    `input_name` and `threads` make the trials.
    """
    import onnx

    quantized = onnx.load(str(file))

    def trial(float_layers: list[str], x: np.ndarray) -> np.ndarray:
        import onnxruntime as ort

        model = with_float_nodes(quantized, quantizer.float_model, float_layers).SerializeToString()
        options = ort.SessionOptions()
        options.intra_op_num_threads = quantizer.threads or 0  # 0: ONNX Runtime's default, the cores
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        return np.concatenate(
            in_batches(lambda batch: join_outputs(session.run(None, {quantizer.input_name: batch})), x)
        )

    candidates = [node for node in quantized_nodes(quantized.graph) if node not in kept]
    found = search(trial, candidates, control.inputs, control.reference, bound, MAX_FLOAT_LAYERS, control.readout)
    if not found.float_layers:
        return found.record(control, {})
    trial_file = file.with_name(f".{file.stem}.trial.onnx")

    def measure(float_layers: list[str]) -> np.ndarray:  # the file itself: the trials approximate it
        quantizer(trial_file, activation, kept + float_layers)  # (activations clipped, not float)
        return np.concatenate(in_batches(OnnxRuntimeEngine(trial_file, quantizer.threads).run, control.inputs))

    try:
        final, checks = verify(found, measure, control.reference, readout=control.readout)
        engines = [OnnxRuntimeEngine(path, quantizer.threads) for path in (file, trial_file)]
        latency = latency_cost(*engines, control.inputs[:1])
        trial_file.replace(file)
    finally:
        trial_file.unlink(missing_ok=True)
    return final.record(control, latency) | {"checks": checks}  # [count, agreement] of the file itself
