"""Reading quantized graphs: which weighted layers stayed in float, which nodes were quantized, and
the metadata an ONNX file carries; and a QDQ graph with some nodes reading float inputs again."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx


def float_weighted_layers(file: Path) -> list[str]:
    """Convolutions and matmuls whose weights are not quantized, by node name (an .onnx file or an IR's .xml)."""
    if file.suffix == ".onnx":
        import onnx

        graph = onnx.load(str(file)).graph
        dequantized = dequantized_tensors(graph)
        weighted = ("Conv", "Gemm", "MatMul")
        return [node.name for node in graph.node if node.op_type in weighted and node.input[1] not in dequantized]
    import openvino as ov

    model = ov.Core().read_model(str(file))
    weighted = ("Convolution", "GroupConvolution", "MatMul")
    return [
        op.get_friendly_name()
        for op in model.get_ordered_ops()
        if op.get_type_name() in weighted and not _has_quantized_weights(op.input_value(1).get_node())
    ]


def _has_quantized_weights(node, depth: int = 4) -> bool:
    """NNCF stores OpenVINO weights as int8 constants with a decompression chain (Convert, Subtract, Multiply)."""
    if node.get_type_name() == "FakeQuantize":
        return True
    if node.get_type_name() == "Constant" and node.get_element_type().get_type_name() in ("i8", "u8", "i4", "u4"):
        return True
    return depth > 0 and any(_has_quantized_weights(value.get_node(), depth - 1) for value in node.input_values())


def dequantized_tensors(graph: onnx.GraphProto) -> set[str]:
    """The tensors a QDQ graph's DequantizeLinear nodes make: the inputs of quantized nodes."""
    return {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}


def quantized_nodes(graph: onnx.GraphProto) -> list[str]:
    """The names of a QDQ graph's nodes that read a dequantized tensor (convs, but also Adds and pooling)."""
    dequantized = dequantized_tensors(graph)
    qdq = ("QuantizeLinear", "DequantizeLinear")
    return [node.name for node in graph.node if node.op_type not in qdq and dequantized & set(node.input)]


def with_float_nodes(quantized: onnx.ModelProto, float_model: onnx.ModelProto, nodes: list[str]) -> onnx.ModelProto:
    """A copy of the QDQ model `quantized` in which `nodes` compute in float: their weights and biases are
    `float_model`'s again, and each activation they read is no longer rounded, only held to its quantized
    range (a Clip instead of QuantizeLinear → DequantizeLinear: ONNX Runtime drops the ReLU6 before a uint8
    quantizer whose range does that clipping). Close to `quantize_static` with these nodes excluded, without
    quantizing again (a lite0 trial: one session instead of ~2 s of quantize_static).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(quantized)
    producer = {name: node for node in model.graph.node for name in node.output}
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    float_nodes = {node.name: node for node in float_model.graph.node}
    float_weights = {init.name: init for init in float_model.graph.initializer}
    wanted, clips = set(nodes), {}
    for node in model.graph.node:
        if node.name not in wanted:
            continue
        # the float node's attributes too: ONNX Runtime stores a quantized Gemm's weight transposed (transB 0)
        del node.attribute[:]
        node.attribute.extend(float_nodes[node.name].attribute)
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            source = float_nodes[node.name].input[i]
            node.input[i] = f"{source}.float.{node.name}"
            if source in float_weights:  # a weight or bias; its DequantizeLinear may output its float name
                weight = numpy_helper.to_array(float_weights[source])
                model.graph.initializer.append(numpy_helper.from_array(weight, node.input[i]))
                continue
            q = producer[dq.input[0]]  # (N, …) activation → QuantizeLinear → DequantizeLinear
            scale, zero = values[q.input[1]].astype(np.float32), values[q.input[2]]
            info = np.iinfo(zero.dtype)
            bounds = [(np.float32(bound) - zero.astype(np.float32)) * scale for bound in (info.min, info.max)]
            names = [f"{node.input[i]}.{side}" for side in ("low", "high")]
            model.graph.initializer.extend(numpy_helper.from_array(np.float32(b), n) for b, n in zip(bounds, names))
            clips.setdefault(node.name, []).append(
                onnx.helper.make_node("Clip", [q.input[0], *names], [node.input[i]], name=node.input[i])
            )
    ordered = [n for node in model.graph.node for n in (*clips.get(node.name, []), node)]  # topological order
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    _unquantize_outputs(model, wanted)
    return model


def _unquantize_outputs(model: onnx.ModelProto, nodes: set[str]) -> None:
    """A graph output that one of `nodes` makes, quantized on its way out (QuantizeLinear → DequantizeLinear →
    output), becomes that node's float output: quantize_static leaves an excluded node's output float when
    nothing quantized reads it."""
    outputs = {output.name for output in model.graph.output}
    producer = {name: node for node in model.graph.node for name in node.output}
    for dq in [node for node in model.graph.node if node.op_type == "DequantizeLinear" and node.output[0] in outputs]:
        q = producer.get(dq.input[0])
        source = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        if source is not None and source.name in nodes:
            source.output[list(source.output).index(q.input[0])] = dq.output[0]
            model.graph.node.remove(q)
            model.graph.node.remove(dq)


def onnx_metadata(path: Path) -> dict[str, str]:
    """The metadata_props of an ONNX file (what export wrote), for artifacts made from the model, not the file."""
    import onnx

    return {prop.key: prop.value for prop in onnx.load(str(path), load_external_data=False).metadata_props}
