"""The agreement search (`control.search`) for ONNX Runtime INT8: trials on the QDQ graph that
`quantize_static` made, with the chosen nodes reading float inputs again (`graph.with_float_nodes`),
then the file quantized again with those nodes excluded, and checked."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from edgetl.infer import in_batches
from edgetl.quantize.control import MAX_FLOAT_LAYERS, ControlSet, fidelity, latency_cost, search
from edgetl.quantize.graph import quantized_nodes, with_float_nodes
from edgetl.runtime.engines import OnnxRuntimeEngine


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
        return np.concatenate(in_batches(lambda batch: session.run(None, {quantizer.input_name: batch})[0], x))

    candidates = [node for node in quantized_nodes(quantized.graph) if node not in kept]
    found = search(trial, candidates, control.inputs, control.reference, bound, MAX_FLOAT_LAYERS)
    if not found.float_layers:
        return found.record(control, {})
    trial_file = file.with_name(f".{file.stem}.trial.onnx")
    try:  # the file from quantize_static, measured: the trials approximate it (activations clipped, not float),
        # so while it misses the bound, the next ranked node joins (at most _VERIFIED more)
        count, checks = len(found.float_layers), []
        while True:
            quantizer(trial_file, activation, kept + found.ranking[:count])
            engine = OnnxRuntimeEngine(trial_file, quantizer.threads)
            logits = np.concatenate(in_batches(engine.run, control.inputs))
            final = replace(found, float_layers=found.ranking[:count], logits=logits,
                            reached=fidelity(logits, control.reference))  # fmt: skip
            checks.append([count, final.reached.agreement])
            if final.met or count >= min(len(found.ranking), len(found.float_layers) + _VERIFIED):
                break
            count += 1
        latency = latency_cost(OnnxRuntimeEngine(file, quantizer.threads), engine, control.inputs[:1])
        trial_file.replace(file)
    finally:
        trial_file.unlink(missing_ok=True)
    return final.record(control, latency) | {"file_checks": checks}  # (count, agreement) of the file itself


_VERIFIED = 4  # ranked nodes the quantized file may need beyond the search's trials
