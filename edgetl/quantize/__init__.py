"""Quantize stage: INT8 (and FP16) variants of the exported model, calibrated on real images.

One entry, `run_variant`, makes one variant of the recipe's `quantize:` list with its engine:
ONNX Runtime's own quantizer for runtime onnxruntime (`ort`: bias correction, float layers,
accuracy control), NNCF for OpenVINO (`nncf_ptq`), quantization-aware training (`qat`, with
`nncf_onnx` for its QDQ ONNX), FP16
by conversion. `graph` reads the result back (the weighted layers left in float). Calibration
always uses real training images through the eval preprocessing. Each engine returns its
notes as records (`edgetl.notes.Note`); the reports render them.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edgetl.errors import RecipeError
from edgetl.export import ExportResult, to_openvino
from edgetl.infer import in_batches
from edgetl.models import TransferModel
from edgetl.notes import Note, render
from edgetl.quantize import nncf_control, nncf_ptq, ort, qat
from edgetl.quantize.artifact import Inputs, QuantizedArtifact
from edgetl.quantize.control import ControlSet
from edgetl.quantize.graph import float_weighted_layers, onnx_metadata
from edgetl.recipe import QuantVariant
from edgetl.runtime.engines import OnnxRuntimeEngine
from edgetl.runtime.preprocess import normalize

__all__ = ["Inputs", "QuantizedArtifact", "float_weighted_layers", "run_variant", "searches_agreement"]
log = logging.getLogger(__name__)


def run_variant(
    export: ExportResult, variant: QuantVariant, out_dir: Path, inputs: Inputs, model: TransferModel | None = None
) -> QuantizedArtifact:
    """Make `variant` into `out_dir/<name>.onnx|.xml`. `model` (the trained PyTorch model) is needed by
    `method: qat` variants only.

    Raises RecipeError: an OpenVINO variant where OpenVINO is not installed, `keep_float` naming nodes
    the exported model does not have.

    >>> run_variant(exported, recipe.quantize[0], run_dir / "quantize", Inputs(dataset, pre, 0, None)).file
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    name = variant.display_name
    if variant.runtime == "openvino" and export.openvino is None:
        raise RecipeError(
            f"quantize variant {name} needs OpenVINO, which is not installed; install it with "
            "`pip install 'edgetl[openvino]'` or remove the variant."
        )
    started = time.monotonic()
    with _temporaries_in(out_dir):
        if variant.precision == "fp16":
            file = to_openvino(export.onnx, out_dir / f"{name}.xml", compress_to_fp16=True)
            return QuantizedArtifact(name, "openvino", "fp16", file, [], time.monotonic() - started, 0)
        calibration, notes = _calibration_batches(inputs, variant.calibration_images, name)
        control = _control_set(export, inputs, calibration) if searches_agreement(variant) else None
        record = None
        if variant.method == "qat":
            metadata = onnx_metadata(export.onnx)  # the labels and contract, for the IR converted from PyTorch
            file, engine_notes = qat.run(model, variant, calibration, out_dir, inputs, metadata, export.opset)
        elif variant.quantizer == "onnxruntime":
            file = out_dir / f"{name}.onnx"
            engine_notes, record = ort.quantize(export.onnx, file, calibration, variant, inputs, control)
        else:
            file, engine_notes = nncf_ptq.quantize(export, out_dir, calibration, variant, inputs), []
            if control is not None:
                record = nncf_control.control(file, export.openvino, control, variant.min_agreement, inputs.threads)
        notes += engine_notes
        if record is not None:
            notes.append(_control_note(record))
        float_layers = float_weighted_layers(file)
        if float_layers:
            shown = ", ".join(float_layers[:8]) + (" …" if len(float_layers) > 8 else "")
            notes.append(Note("float_layers", {"count": len(float_layers), "layers": shown}))
        seconds = time.monotonic() - started
        said = f" ({'; '.join(render(note) for note in notes)})" if notes else ""
        log.info("quantized %s in %.1fs%s", name, seconds, said)
        return QuantizedArtifact(
            name, variant.runtime, "int8", file, float_layers, seconds, len(calibration), notes, record
        )


def searches_agreement(variant: QuantVariant) -> bool:
    """Whether the agreement search runs: an INT8 PTQ variant with `min_agreement`, no `max_accuracy_drop`
    (accuracy control then decides) and not NNCF's QDQ ONNX."""
    nncf_onnx = variant.quantizer == "nncf" and variant.runtime == "onnxruntime"
    return (
        variant.method == "ptq"
        and variant.precision == "int8"
        and variant.min_agreement is not None
        and variant.max_accuracy_drop is None
        and not nncf_onnx
    )


def _control_set(export: ExportResult, inputs: Inputs, calibration: list[np.ndarray]) -> ControlSet:
    """The val split (at most `_CONTROL_VAL_IMAGES`, seeded) and the calibration images, with the FP32
    ONNX file's logits of them (the parity gate proved them PyTorch's)."""
    val = inputs.dataset.val
    chosen = np.sort(np.random.default_rng(inputs.seed).permutation(len(val.labels))[:_CONTROL_VAL_IMAGES])
    images = np.concatenate([normalize(val.images[chosen], inputs.pre), *calibration])  # (N, 3, S, S)
    engine = OnnxRuntimeEngine(export.onnx, inputs.threads)
    return ControlSet(images, np.concatenate(in_batches(engine.run, images)), len(chosen), inputs.readout)


_CONTROL_VAL_IMAGES = 1000  # bounds the control set's memory (4 GB of float32 at 224 px for 7,000 images)


def _control_note(record: dict) -> Note:
    reached = record["reached"]
    values = {
        "count": len(record["float_layers_added"]),
        "bound": record["min_agreement"],
        "start": record["start"]["agreement"],
        "val": reached["val"]["agreement"],
        "calibration": reached["calibration"]["agreement"],
    }
    if record["latency_ms"]:
        values |= {"quantized_ms": record["latency_ms"]["quantized"], "ms": record["latency_ms"]["with_float_layers"]}
        return Note("agreement_control_latency" if record["met"] else "agreement_control_missed_latency", values)
    return Note("agreement_control" if record["met"] else "agreement_control_missed", values)


@contextmanager
def _temporaries_in(out_dir: Path) -> Iterator[None]:
    """Python's temp folder moved under `out_dir` while quantizing, removed afterwards.

    ONNX Runtime's quantize_static (and NNCF) write their working copies of the model
    (13 MB for lite0) to `tempfile`'s folder, without a `dir` argument; a killed build
    left them in /tmp. Under the stage's staging folder they go with it: removed here,
    or by the next build's cleanup of the staging folder after a kill.
    """
    folder = tempfile.mkdtemp(prefix=".quantizer.", suffix=".tmp", dir=out_dir)
    previous, tempfile.tempdir = tempfile.tempdir, folder
    try:
        yield
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(folder, ignore_errors=True)


def _calibration_batches(inputs: Inputs, count: int, name: str) -> tuple[list[np.ndarray], list[Note]]:
    """`count` real training images, seeded, each a float32 (1, 3, S, S) batch; a note when the split has fewer."""
    train = inputs.dataset.train
    available = len(train.labels)
    notes = []
    if available < count:
        notes.append(Note("calibration_short", {"asked": count, "available": available}))
        log.warning("%s: %s", name, render(notes[-1]))
    order = np.random.default_rng(inputs.seed).permutation(available)[:count]
    images = normalize(train.images[np.sort(order)], inputs.pre)
    return [images[i : i + 1] for i in range(len(images))], notes
