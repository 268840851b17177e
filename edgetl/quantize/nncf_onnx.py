"""NNCF-quantized PyTorch models as INT8 QDQ ONNX for ONNX Runtime (the QAT target for onnxruntime).

NNCF's PyTorch quantizers export as QuantizeLinear/DequantizeLinear pairs (its
`ONNX_QUANTIZE_DEQUANTIZE_PAIRS` export mode); ONNX Runtime's basic optimization then folds
each constant QuantizeLinear(weight) into an int8 initializer. What is left is the BatchNorm
NNCF keeps after each quantized conv, which stops ONNX Runtime from fusing the conv into a
QLinearConv: `fold_batchnorm` folds it into the per-channel weight scales and the conv bias,
exactly, without touching the int8 weights (a BatchNorm is a per-output-channel affine map,
and the weights are quantized per output channel).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from edgetl.errors import ExportError
from edgetl.export import optimize, torch_to_onnx
from edgetl.fileio import atomic_path

if TYPE_CHECKING:
    import onnx


def export_qdq(quantized: nn.Module, input_size: int, file: Path, opset: int, metadata: dict[str, str]) -> Path:
    """Write NNCF's quantized `quantized` (eval mode) to `file` as a QDQ ONNX with int8 weight initialisers and
    the BatchNorms folded; `metadata` becomes its metadata_props. Returns `file`; raises ExportError when the
    export or the ONNX checker fails."""
    import onnx
    from nncf.torch.quantization.layers import BaseQuantizer, QuantizerExportMode

    for module in quantized.modules():
        if isinstance(module, BaseQuantizer):
            module.set_export_mode(QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS)
    with atomic_path(file) as tmp:
        try:
            torch_to_onnx(quantized, input_size, tmp, opset)
            graph = fold_batchnorm(optimize(tmp))  # optimize folds Q(weight) into int8 initialisers
            onnx.helper.set_model_props(graph, metadata)
            onnx.checker.check_model(graph, full_check=True)
        except Exception as exc:  # the exporter and the checker raise many types; all mean "no QDQ file"
            raise ExportError(
                f"QAT's QDQ ONNX for ONNX Runtime could not be written at opset {opset}: {type(exc).__name__}: {exc}. "
                "Use `runtime: openvino` for this QAT variant, or PTQ."
            ) from None
        onnx.save(graph, str(tmp))
    return file


def fold_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold every BatchNormalization that alone reads a Conv with per-channel symmetric int8 weights into that
    conv: scale_o ← scale_o·|γ_o/σ_o|, the int8 weights of channels with γ_o < 0 negated, bias ← (bias − μ)·γ/σ
    + β (σ = √(var + ε)). Edits and returns `model`."""
    from onnx import numpy_helper

    graph = model.graph
    tensors = {init.name: init for init in graph.initializer}
    producer = {output: node for node in graph.node for output in node.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    folded = []
    for conv in [node for node in graph.node if node.op_type == "Conv"]:
        dequantize, users = producer.get(conv.input[1]), readers.get(conv.output[0], [])
        if not (dequantize is not None and dequantize.op_type == "DequantizeLinear" and dequantize.input[0] in tensors):
            continue
        if len(users) != 1 or users[0].op_type != "BatchNormalization":
            continue
        norm = users[0]
        # NNCF's weight quantizers are narrow-range ([-127, 127]); ONNX's QuantizeLinear saturates at -128, which
        # the weights QAT pushed past the range reach: clipping gives NNCF's value, and a weight that negates
        weights = np.clip(numpy_helper.to_array(tensors[dequantize.input[0]]), -127, 127)
        scale = numpy_helper.to_array(tensors[dequantize.input[1]]).astype(np.float64)
        zero = numpy_helper.to_array(tensors[dequantize.input[2]]) if len(dequantize.input) > 2 else np.zeros(1)
        if scale.shape != (weights.shape[0],) or zero.any():  # per output channel and symmetric, as NNCF's
            continue
        bias = (
            numpy_helper.to_array(tensors[conv.input[2]]).astype(np.float64)
            if len(conv.input) > 2
            else np.zeros(weights.shape[0])
        )
        gamma, beta, mean, var = (numpy_helper.to_array(tensors[name]).astype(np.float64) for name in norm.input[1:5])
        epsilon = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
        factor = gamma / np.sqrt(var + epsilon)
        weights[factor < 0] = -weights[factor < 0]
        names = (f"{conv.name}.weight_int8", f"{conv.name}.weight_scale", f"{conv.name}.bias")
        graph.initializer.extend(
            [
                numpy_helper.from_array(weights, names[0]),
                numpy_helper.from_array((scale * np.abs(factor)).astype(np.float32), names[1]),
                numpy_helper.from_array(((bias - mean) * factor + beta).astype(np.float32), names[2]),
            ]
        )
        dequantize.input[0], dequantize.input[1] = names[0], names[1]
        del conv.input[2:]
        conv.input.append(names[2])
        conv.output[0] = norm.output[0]
        folded.append(norm)
    for norm in folded:
        graph.node.remove(norm)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model
