"""Quantization-aware training: when post-training INT8 loses too much, fine-tune with the
quantization noise in the loop and let the weights adapt to it.

NNCF's recipe: post-training quantization of the PyTorch model (calibrated on real training
images), then a few epochs at a small learning rate with fake quantization. BatchNorm stays
frozen (eval mode): its statistics are folded into the quantized convs, and small QAT
batches would only make them noisy. The epoch with the best val accuracy is kept, counting
the calibrated start, so QAT never ends worse on val than its own PTQ starting point.
Export: for OpenVINO, an IR straight from the PyTorch model (int8 weights); for ONNX Runtime,
a QDQ ONNX with int8 weight initialisers and the BatchNorms folded (`nncf_onnx`), its
activations quantized per tensor (ONNX Runtime fuses no per-channel activation quantizer).
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgetl.export import save_openvino, static_same_padding
from edgetl.infer import accuracy, model_logits
from edgetl.models import TransferModel
from edgetl.notes import Note
from edgetl.progress import track
from edgetl.quantize.artifact import Inputs
from edgetl.quantize.nncf_onnx import export_qdq
from edgetl.quantize.nncf_ptq import options
from edgetl.recipe import QuantVariant
from edgetl.runtime.preprocess import normalize

log = logging.getLogger(__name__)
BATCH = 32  # training batch of the fine-tuning


def run(
    model: TransferModel,
    variant: QuantVariant,
    calibration: list[np.ndarray],
    out_dir: Path,
    inputs: Inputs,
    metadata: dict[str, str],
    opset: int,
) -> tuple[Path, list[Note]]:
    """Calibrate on `calibration` (real training images), fine-tune with fake quantization, export (an IR for
    openvino, a QDQ ONNX at `opset` for onnxruntime); returns the file and the notes for the report.

    `metadata` (the exported ONNX file's) goes into the file, which, made from PyTorch, would lack the
    labels and contract the runtime checks edgetl.json against.
    """
    import nncf

    _use_native_quantize_functions()
    torch.manual_seed(inputs.seed)
    float_model = static_same_padding(copy.deepcopy(model).eval(), inputs.pre.input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NNCF's tracing chatter
        calibration_set = nncf.Dataset(calibration, torch.from_numpy)
        quantized = nncf.quantize(float_model, calibration_set, subset_size=len(calibration), **options(variant))
    outcome = _fine_tune(quantized, variant, inputs)
    values = {
        "start": outcome.start_accuracy,
        "best": outcome.best_accuracy,
        "best_epoch": outcome.best_epoch,
        "epochs": variant.qat_epochs,
        "seconds": outcome.seconds,
    }
    if variant.runtime == "onnxruntime":
        file = export_qdq(quantized, inputs.pre.input_size, out_dir / f"{variant.display_name}.onnx", opset, metadata)
        return file, [Note("qat", values)]
    import openvino as ov

    example = torch.zeros(1, 3, inputs.pre.input_size, inputs.pre.input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = ov.convert_model(quantized, example_input=example)
    file = save_openvino(converted, out_dir / f"{variant.display_name}.xml", compress_to_fp16=False, metadata=metadata)
    return file, [Note("qat", values)]


@dataclass(frozen=True)
class _FineTuned:
    start_accuracy: float  # val accuracy after calibration
    best_accuracy: float
    best_epoch: int  # 0: the calibrated start
    seconds: float  # of the epochs


def _fine_tune(quantized: nn.Module, variant: QuantVariant, inputs: Inputs) -> _FineTuned:
    """`variant.qat_epochs` epochs of AdamW on the training split; `quantized` ends with the weights of its best
    val epoch, counting the calibrated start, in eval mode."""
    dataset, pre = inputs.dataset, inputs.pre
    start_accuracy = _val_accuracy(quantized, inputs)
    best = (start_accuracy, 0, copy.deepcopy(quantized.state_dict()))
    trainable = [p for p in quantized.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=variant.qat_lr, weight_decay=0.0)
    criterion = nn.CrossEntropyLoss()
    labels = torch.from_numpy(dataset.train.labels)
    generator = torch.Generator().manual_seed(inputs.seed)
    started = time.monotonic()
    for epoch in range(1, variant.qat_epochs + 1):
        _train_mode_frozen_bn(quantized)
        batches = torch.randperm(len(labels), generator=generator).split(BATCH)
        for index in track(batches, total=len(batches), description=f"QAT epoch {epoch}/{variant.qat_epochs}"):
            x = torch.from_numpy(normalize(dataset.train.images[index.numpy()], pre))
            loss = criterion(quantized(x), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        val_accuracy = _val_accuracy(quantized, inputs)
        log.info(
            "QAT epoch %d/%d: val accuracy %.4f (PTQ start %.4f)",
            epoch,
            variant.qat_epochs,
            val_accuracy,
            start_accuracy,
        )
        if val_accuracy > best[0]:
            best = (val_accuracy, epoch, copy.deepcopy(quantized.state_dict()))
    quantized.load_state_dict(best[2])
    quantized.eval()
    return _FineTuned(start_accuracy, best[0], best[1], time.monotonic() - started)


def _val_accuracy(model: nn.Module, inputs: Inputs) -> float:
    val = inputs.dataset.val
    return accuracy(model_logits(model, val.images, inputs.pre), val.labels)


def _train_mode_frozen_bn(model: nn.Module) -> None:
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _use_native_quantize_functions() -> None:
    """Use NNCF's pure-PyTorch fake-quantize functions instead of its C++ extension.

    NNCF compiles that extension with the system compiler on first use: minutes on a laptop,
    a timeout on a busy 2-core machine, impossible without g++. When compiling fails NNCF
    falls back to these same functions; edgetl goes there directly. The speed difference is
    immaterial next to the convolutions of a compact backbone.
    """
    from nncf.torch.quantization import extensions
    from nncf.torch.quantization.reference import ReferenceQuantizedFunctions

    if getattr(extensions.QuantizedFunctionsCPU, "_loaded_namespace", "missing") is None:
        extensions.QuantizedFunctionsCPU._loaded_namespace = ReferenceQuantizedFunctions
