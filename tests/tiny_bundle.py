"""A real, tiny deploy bundle made without torch, for runtime and server tests.

The model averages each colour channel and scores it (logits = 10 × channel means), so a
red image is "red": predictions are checkable by eye and take microseconds. It is written
with the `onnx` package, carries its labels and contract as metadata_props, and is hashed
and sized like `edgetl build` does, so `Predictor.load` accepts it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgetl.runtime.bundle import MANIFEST, sha256

LABELS = ["red", "green", "blue"]
SIZE = 32
PREPROCESSING = {
    "input_size": SIZE,
    "resize_size": 36,
    "interpolation": "bilinear",
    "mean": [0.5] * 3,
    "std": [0.5] * 3,
    "layout": "NCHW",
}


def write_tiny_bundle(folder: Path, weight: np.ndarray | None = None, decode: str | None = None) -> Path:
    """Write `model.onnx`, `README.md` and `edgetl.json` into `folder`; return `folder`.

    `weight` (3×3, default 10 × identity) maps channel means to logits: NaN gives a model
    whose outputs are NaN, as a diverged training would. `decode` sets the contract's decode
    mode (None: no field, as bundles made before it existed).

    >>> Predictor.load(write_tiny_bundle(tmp_path / "bundle")).predict(red_png).label
    'red'
    """
    folder.mkdir(parents=True, exist_ok=True)
    preprocessing = PREPROCESSING if decode is None else {**PREPROCESSING, "decode": decode}
    onnx.save(
        _colour_model(np.eye(3, dtype=np.float32) * 10.0 if weight is None else weight, preprocessing),
        folder / "model.onnx",
    )
    (folder / "README.md").write_text("# tiny: a colour classifier for tests\n")
    manifest = {
        "schema_version": 1,
        "name": "tiny",
        "model": "model.onnx",
        "runtime": "onnxruntime",
        "precision": "fp32",
        "variant": "onnx-fp32",
        "labels": LABELS,
        "preprocessing": preprocessing,
        "input": {"name": "image", "shape": ["batch", 3, SIZE, SIZE], "dtype": "float32"},
        "metrics": {
            "accuracy": 1.0,
            "agreement": 1.0,
            "latency_ms": {"p50": 1.0, "p90": 1.0, "p99": 1.0},
            "size_mb": 0.01,
        },
    }
    return write_manifest(folder, manifest)


def write_manifest(folder: Path, manifest: dict) -> Path:
    """Record the sha256 and size of every other file of `folder` in `manifest` and write it, as `edgetl build` does."""
    names = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    sizes = {n: (folder / n).stat().st_size for n in names}
    manifest = {**manifest, "files": {n: sha256(folder / n) for n in names}, "sizes": sizes}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def _colour_model(weight: np.ndarray, preprocessing: dict) -> onnx.ModelProto:
    # image (N, 3, S, S) → GlobalAveragePool (N, 3, 1, 1) → Flatten (N, 3) → Gemm (N, 3)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
            helper.make_node("Gemm", ["features", "weight", "bias"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(LABELS)])],
        initializer=[
            numpy_helper.from_array(weight.astype(np.float32), "weight"),
            numpy_helper.from_array(np.zeros(3, np.float32), "bias"),
        ],
    )
    # IR 8 / opset 17: readable by every ONNX Runtime edgetl supports (≥ 1.17).
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    # what edgetl.export.metadata() writes: the file carries its own labels and contract
    metadata = {"edgetl.labels": json.dumps(LABELS), "edgetl.preprocessing": json.dumps(preprocessing)}
    helper.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    return model
