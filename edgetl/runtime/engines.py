"""Inference engines behind one small protocol: ONNX Runtime and OpenVINO.

The build validates artifacts through these same classes that the device runtime uses,
so a latency or an accuracy in the report is what the device gets. numpy only.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

RUNTIMES = ("onnxruntime", "openvino")


class RuntimeMissing(RuntimeError):
    """The runtime's Python package is not installed; the message says how to add it."""


class Engine(Protocol):
    """Safe to call from several threads at once (the server runs predictions in a pool)."""

    runtime: str
    metadata: dict[str, str]  # the file's own edgetl.* facts: ONNX metadata_props, or an IR's rt_info "framework"
    input_shape: tuple[int | None, ...]  # None where a dimension is dynamic (the batch)
    output_shape: tuple[int | None, ...]

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, S, S) → float32 logits (N, classes)."""


def is_installed(runtime: str) -> bool:
    try:
        return importlib.util.find_spec(runtime) is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as missing
        return False


class OnnxRuntimeEngine:
    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        if not is_installed("onnxruntime"):
            raise RuntimeMissing("ONNX Runtime is not installed; install it with `pip install onnxruntime`.")
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads busy-wait for the next call (5-8% faster here than parking
        # them), but only until Run() returns: left spinning, they steal the CPU from the
        # other sessions of the build's validation matrix (measured: one of four identical
        # lite0 sessions ran at 10 ms instead of 6). Alone it costs under 1%.
        options.add_session_config_entry("session.force_spinning_stop", "1")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.input_shape = _static(self.session.get_inputs()[0].shape)
        outputs = self.session.get_outputs()
        self.output_names = [o.name for o in outputs]
        self.output_shape = _joined([_static(o.shape) for o in outputs])

    def run(self, batch: np.ndarray) -> np.ndarray:
        return join_outputs(self.session.run(None, {self.input_name: batch}))


class OpenVinoEngine:
    runtime = "openvino"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        if not is_installed("openvino"):
            raise RuntimeMissing("OpenVINO is not installed; install it with `pip install 'edgetl[openvino]'`.")
        import openvino as ov

        config = {
            "INFERENCE_NUM_THREADS": threads or os.cpu_count() or 1,
            "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY",
        }
        core = ov.Core()
        model = core.read_model(str(path))
        # OpenVINO's ONNX reader puts metadata_props under "framework"; edgetl's IRs carry them there too
        keys = model.get_rt_info()["framework"] if model.has_rt_info(["framework"]) else {}
        self.metadata = {key: model.get_rt_info(["framework", key]).astype(str) for key in keys}
        self.input_shape = _static(model.inputs[0].get_partial_shape())
        # a QAT IR's output tensor can have no name: "" then (only the count matters for one output)
        self.output_names = [o.get_any_name() if o.get_names() else "" for o in model.outputs]
        self.output_shape = _joined([_static(o.get_partial_shape()) for o in model.outputs])
        self.compiled = core.compile_model(model, "CPU", config)
        self._local = threading.local()  # an infer request serves one call at a time: one per thread

    def run(self, batch: np.ndarray) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        results = request.infer({0: batch})
        return join_outputs([results[i].copy() for i in range(len(self.output_names))])


def join_outputs(outputs: list[np.ndarray]) -> np.ndarray:
    """A multi-task model's outputs (one (N, classes) per task) side by side; one output as it is."""
    return outputs[0] if len(outputs) == 1 else np.concatenate(outputs, axis=1)


def _joined(shapes: list[tuple[int | None, ...]]) -> tuple[int | None, ...]:
    """The shape `join_outputs` gives: the outputs' class counts summed."""
    if len(shapes) == 1:
        return shapes[0]
    classes = [s[-1] for s in shapes]
    return (*shapes[0][:-1], None if None in classes else sum(classes))


def _static(shape) -> tuple[int | None, ...]:
    """ONNX Runtime's dimensions (an int, or a name or None when dynamic) or OpenVINO's → ints, None where dynamic."""
    return tuple(d if isinstance(d, int) else d.get_length() if getattr(d, "is_static", False) else None for d in shape)


_ENGINES = {"onnxruntime": OnnxRuntimeEngine, "openvino": OpenVinoEngine}


def open_engine(path: Path, runtime: str, threads: int | None = None) -> Engine:
    """Load `path` (.onnx for onnxruntime, .xml for openvino) on the CPU.

    >>> open_engine(Path("model.onnx"), "onnxruntime").run(batch).argmax(1)
    """
    return _ENGINES[runtime](Path(path), threads)
