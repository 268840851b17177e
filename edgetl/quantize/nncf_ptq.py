"""INT8 with NNCF's post-training quantization: for OpenVINO (measured 0.84–0.98 top-1 agreement),
and for ONNX Runtime when a variant asks for `engine: nncf`. With `max_accuracy_drop`, NNCF's
accuracy-controlled quantization reverts the most sensitive layers to float until the drop on
the validation split is within bound. The variant's NNCF options (bias correction, preset,
activation ranges, overflow fix) become `nncf.quantize`'s arguments in
`options`, which QAT's calibration shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgetl.export import ExportResult, save_openvino
from edgetl.fileio import atomic_path
from edgetl.quantize.artifact import Inputs
from edgetl.recipe import QuantVariant
from edgetl.runtime.preprocess import normalize


def quantize(
    export: ExportResult, out_dir: Path, calibration: list[np.ndarray], variant: QuantVariant, inputs: Inputs
) -> Path:
    """Quantize the exported model for `variant.runtime` into `out_dir/<name>.xml|.onnx`; returns the file."""
    import nncf

    if variant.runtime == "openvino":
        import openvino as ov

        model = ov.Core().read_model(str(export.openvino))
        to_input = lambda batch: batch  # noqa: E731 - NNCF wants a transform function
    else:
        import onnx

        model = onnx.load(str(export.onnx))
        input_name = model.graph.input[0].name
        to_input = lambda batch: {input_name: batch}  # noqa: E731
    calibration_set = nncf.Dataset(calibration, to_input)
    if variant.max_accuracy_drop is None:
        quantized = nncf.quantize(model, calibration_set, subset_size=len(calibration), **options(variant))
    else:
        val = inputs.dataset.val
        val_images = normalize(val.images, inputs.pre)
        val_items = [(val_images[i : i + 1], int(label)) for i, label in enumerate(val.labels)]
        settings = options(variant)
        settings["advanced_quantization_parameters"] = settings.pop("advanced_parameters")
        quantized = nncf.quantize_with_accuracy_control(
            model,
            calibration_set,
            nncf.Dataset(val_items, lambda item: to_input(item[0])),
            _accuracy,
            max_drop=variant.max_accuracy_drop,
            subset_size=len(calibration),
            **settings,
        )
    if variant.runtime == "openvino":
        return save_openvino(quantized, out_dir / f"{variant.display_name}.xml", compress_to_fp16=False)
    import onnx

    file = out_dir / f"{variant.display_name}.onnx"
    with atomic_path(file) as tmp:
        onnx.save(quantized, str(tmp))
    return file


def options(variant: QuantVariant) -> dict[str, Any]:
    """`nncf.quantize`'s keyword arguments for `variant`: preset, fast_bias_correction, advanced_parameters.

    For ONNX Runtime the activations are quantized per tensor: NNCF's CPU configuration quantizes the
    depthwise convs' inputs per channel, which OpenVINO runs in int8 but ONNX Runtime cannot fuse
    into a QLinearConv (lite0 at 96 px ran 8× slower than FP32).
    """
    from nncf import QuantizationPreset
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        OverflowFix,
        QuantizationParameters,
    )
    from nncf.quantization.range_estimator import RangeEstimatorParameters, RangeEstimatorParametersSet

    ranges = {
        "default": RangeEstimatorParameters(),
        "minmax": RangeEstimatorParametersSet.MINMAX,
        "mean_minmax": RangeEstimatorParametersSet.MEAN_MINMAX,
        "quantile": RangeEstimatorParametersSet.MEAN_QUANTILE,
        "histogram": RangeEstimatorParametersSet.HISTOGRAM,
    }
    advanced = AdvancedQuantizationParameters(
        overflow_fix=OverflowFix(variant.overflow_fix.replace("first_layer", "first_layer_only")),
        activations_range_estimator_params=ranges[variant.activation_ranges],
        activations_quantization_params=QuantizationParameters(per_channel=False)
        if variant.runtime == "onnxruntime"
        else None,
    )
    return {
        "preset": QuantizationPreset(variant.preset),
        "fast_bias_correction": variant.bias_correction == "fast",
        "advanced_parameters": advanced,
    }


def _accuracy(model, items) -> float:
    """NNCF's validation_fn: top-1 accuracy. It passes an OpenVINO compiled model or an ONNX ModelProto."""
    if hasattr(model, "SerializeToString"):
        import onnxruntime as ort

        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        predict = lambda x: session.run(None, {name: x})[0]  # noqa: E731
    else:
        predict = lambda x: model(x)[0]  # noqa: E731
    hits = [int(np.argmax(predict(image)) == label) for image, label in items]
    return float(np.mean(hits))
