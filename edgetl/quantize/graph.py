"""Reading quantized graphs: which weighted layers stayed in float, which nodes were quantized, and
the metadata an ONNX file carries; and a QDQ graph with some nodes reading float inputs again."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

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
    """A copy of the QDQ model `quantized` in which `nodes` read float inputs: each input a DequantizeLinear
    made is replaced by the tensor the node reads in `float_model` (the activation before its QuantizeLinear,
    the float weight and bias). What `quantize_static` with these nodes excluded computes, without
    quantizing again (a lite0 trial: one session instead of ~2 s of quantize_static).
    """
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(quantized)
    dequantized = dequantized_tensors(model.graph)
    float_nodes = {node.name: node for node in float_model.graph.node}
    float_weights = {init.name: init for init in float_model.graph.initializer}
    present = {init.name for init in model.graph.initializer}
    wanted = set(nodes)
    for node in model.graph.node:
        if node.name not in wanted:
            continue
        for i, name in enumerate(node.input):
            if name not in dequantized:
                continue
            source = float_nodes[node.name].input[i]
            if source in float_weights:  # a weight or bias; its DequantizeLinear may output its float name
                node.input[i] = f"{source}.float"
                if node.input[i] not in present:
                    model.graph.initializer.append(onnx.numpy_helper.from_array(
                        onnx.numpy_helper.to_array(float_weights[source]), node.input[i]))  # fmt: skip
                    present.add(node.input[i])
            else:
                node.input[i] = source
    return model


def onnx_metadata(path: Path) -> dict[str, str]:
    """The metadata_props of an ONNX file (what export wrote), for artifacts made from the model, not the file."""
    import onnx

    return {prop.key: prop.value for prop in onnx.load(str(path), load_external_data=False).metadata_props}
