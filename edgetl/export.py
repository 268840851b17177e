"""Export stage: the trained model to ONNX (with its metadata) and to an exact FP32 OpenVINO IR.

The input size is fixed, so timm's dynamic TF-"SAME" padding is resolved into explicit
pads first, and ONNX Runtime's basic optimizer folds them into the convs: the graph has no
shape arithmetic (lite0: 95 nodes, against 585 exported as is), and every runtime — and
every quantizer — sees plain convs.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from edgetl import __version__
from edgetl.build_report import ParityOutcome
from edgetl.errors import ExportError
from edgetl.fileio import atomic_path, write_json
from edgetl.models import TransferModel
from edgetl.runtime.preprocess import Preprocessing

log = logging.getLogger(__name__)
INPUT_NAME, OUTPUT_NAME = "image", "logits"
FACTS_FILE = "export.json"


@dataclass(frozen=True)
class ExportResult:
    """The export stage's files (`model.onnx`, `model.xml`) and facts, which save themselves to the stage folder
    (`export.json`) and load back from it."""

    onnx: Path
    openvino: Path | None  # the .xml (its .bin beside it); None when OpenVINO is not installed
    node_count: int
    opset: int
    seconds: float
    parity: list[ParityOutcome] = field(default_factory=list)  # validate.parity's outcome per FP32 file

    def save(self, folder: Path) -> None:
        """Write `folder/export.json`; the model files are already in `folder` (`run` wrote them there).

        Raises OutputError when the disk refuses the write.
        """
        facts = {"opset": self.opset, "node_count": self.node_count, "seconds": round(self.seconds, 2)}
        write_json(folder / FACTS_FILE, facts | {"parity": [p.to_dict() for p in self.parity]})

    @classmethod
    def load(cls, folder: Path) -> ExportResult:
        """The result `save` wrote to `folder`.

        Raises OSError (no export.json) or ValueError (not JSON): the stage cache only hands over
        complete folders, so either means the folder was changed by hand.
        """
        facts = json.loads((folder / FACTS_FILE).read_text())
        xml = folder / "model.xml"
        return cls(
            folder / "model.onnx",
            xml if xml.is_file() else None,
            facts["node_count"],
            facts["opset"],
            facts["seconds"],
            [ParityOutcome.from_dict(p) for p in facts["parity"]],
        )


def run(
    model: TransferModel,
    pre: Preprocessing,
    labels: tuple[str, ...],
    out_dir: Path,
    opset: int,
    recipe_hash: str,
    want_openvino: bool,
) -> ExportResult:
    """Write `out_dir/model.onnx` and, when wanted and installed, `out_dir/model.xml`.

    >>> run(checkpoint.model, checkpoint.preprocessing, checkpoint.labels, run_dir / "export", 17, "ab12", True).onnx
    """
    import onnx

    started = time.monotonic()
    exportable = static_same_padding(copy.deepcopy(model).eval(), pre.input_size)
    onnx_path = out_dir / "model.onnx"
    with atomic_path(onnx_path) as tmp:
        try:
            torch_to_onnx(exportable, pre.input_size, tmp, opset)
        except Exception as exc:  # the exporter raises many types; all mean "this model does not export"
            raise ExportError(
                f"torch.onnx.export failed for this model at opset {opset}: {type(exc).__name__}: {exc}"
            ) from None
        graph = optimize(tmp)
        onnx.helper.set_model_props(graph, metadata(pre, labels, recipe_hash))
        try:
            onnx.checker.check_model(graph, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"The exported ONNX graph is invalid: {exc}") from None
        onnx.save(graph, str(tmp))
    node_count = len(graph.graph.node)
    log.info("exported ONNX opset %d: %d nodes", opset, node_count)

    xml_path = None
    if want_openvino:
        xml_path = out_dir / "model.xml"
        to_openvino(onnx_path, xml_path, compress_to_fp16=False)
    return ExportResult(onnx_path, xml_path, node_count, opset, time.monotonic() - started)


def torch_to_onnx(module: torch.nn.Module, input_size: int, file: Path, opset: int) -> None:
    """`module` (eval mode) as ONNX at `file`: TorchScript exporter, (batch, 3, S, S) float input `INPUT_NAME`,
    output `OUTPUT_NAME` (a multi-task model's: one per task, `module.output_names`), dynamic batch. Raises what
    torch.onnx.export raises."""
    outputs = getattr(module, "output_names", [OUTPUT_NAME])
    example = torch.zeros(1, 3, input_size, input_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's constant-folding chatter
        torch.onnx.export(
            module,
            (example,),
            str(file),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *outputs)},
        )


def optimize(path: Path):
    """Constant-fold and fuse the pads into the convs with ONNX Runtime's *basic* level, whose
    rewrites are all standard ONNX (the extended levels add com.microsoft ops)."""
    import onnx
    import onnxruntime as ort

    optimized = path.with_name(path.name + ".opt")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(optimized)
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(str(optimized))
    finally:
        optimized.unlink(missing_ok=True)
    used = {node.domain or "" for node in graph.graph.node}
    kept = [o for o in graph.opset_import if (o.domain or "") in used or o.domain in ("", "ai.onnx")]
    del graph.opset_import[:]
    graph.opset_import.extend(kept)
    return graph


def model_files(file: Path) -> list[Path]:
    """The files one artifact is made of: an .onnx alone, or an IR's .xml and .bin."""
    return [file, file.with_suffix(".bin")] if file.suffix == ".xml" else [file]


def metadata(pre: Preprocessing, labels: tuple[str, ...], recipe_hash: str) -> dict[str, str]:
    """What a runtime needs to use the file alone, as JSON strings (read back with json, never eval)."""
    return {
        "edgetl.labels": json.dumps(list(labels)),
        "edgetl.preprocessing": json.dumps(pre.to_dict()),
        "edgetl.version": __version__,
        "edgetl.recipe_hash": recipe_hash,
    }


def to_openvino(onnx_path: Path, xml_path: Path, compress_to_fp16: bool) -> Path:
    """Convert ONNX → IR. `compress_to_fp16=False` keeps it exact (save_model defaults to FP16)."""
    import openvino as ov

    return save_openvino(ov.convert_model(str(onnx_path)), xml_path, compress_to_fp16)


def save_openvino(model, xml_path: Path, compress_to_fp16: bool, metadata: dict[str, str] | None = None) -> Path:
    """Save an IR under staging names, then move it into place, the .xml last.

    `metadata` (`metadata()`'s strings) goes into the IR's rt_info "framework" section, where
    OpenVINO's ONNX reader puts an ONNX file's metadata_props: the runtime reads one place.
    """
    import openvino as ov

    for key, value in (metadata or {}).items():
        model.set_rt_info(value, ["framework", key])
    staging = xml_path.with_name(f".{xml_path.stem}.staging.xml")
    ov.save_model(model, str(staging), compress_to_fp16=compress_to_fp16)
    staging.with_suffix(".bin").replace(xml_path.with_suffix(".bin"))
    staging.replace(xml_path)  # the .xml last: it is what marks the IR complete
    return xml_path


def static_same_padding(model: nn.Module, size: int) -> nn.Module:
    """Replace timm's dynamic-SAME convs with ZeroPad2d + Conv2d for a `size`×`size` input."""
    from timm.layers.conv2d_same import Conv2dSame

    inputs: dict[str, tuple[int, int]] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda _m, args, name=name: inputs.__setitem__(name, tuple(args[0].shape[-2:]))
        )
        for name, module in model.named_modules()
        if isinstance(module, Conv2dSame)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    for name, (height, width) in inputs.items():
        conv = model.get_submodule(name)
        pad_h = _same_pad(height, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
        pad_w = _same_pad(width, conv.kernel_size[1], conv.stride[1], conv.dilation[1])
        plain = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            0,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
        )
        plain.load_state_dict(conv.state_dict())
        padded = nn.Sequential(nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)), plain)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, padded)
    return model


def _same_pad(size: int, kernel: int, stride: int, dilation: int) -> int:
    return max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
