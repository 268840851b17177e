"""Quantization-aware training: when post-training INT8 loses too much, fine-tune with the
quantization noise in the loop and let the weights adapt to it.

NNCF's recipe: post-training quantization of the PyTorch model (calibrated on real training
images), then a few epochs at a small learning rate with fake quantization. BatchNorm stays
frozen (eval mode): its statistics are folded into the quantized convs, and small QAT
batches would only make them noisy. The epoch with the best val accuracy is kept, counting
the calibrated start, so QAT never ends worse on val than its own PTQ starting point.
Export: OpenVINO IR straight from the PyTorch model (int8 weights). ONNX Runtime is not a
target: the QDQ ONNX from `nncf.strip` kept float weights (14 MB) and ran at 2.2× FP32 latency.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgetl.data import Dataset
from edgetl.export import save_openvino, static_same_padding
from edgetl.models import TransferModel
from edgetl.progress import track
from edgetl.recipe import QuantVariant
from edgetl.runtime.preprocess import Preprocessing, normalize

log = logging.getLogger(__name__)
BATCH = 32


def run(model: TransferModel, dataset: Dataset, pre: Preprocessing, variant: QuantVariant,
        calibration: list[np.ndarray], out_dir: Path, seed: int, metadata: dict[str, str]) -> tuple[Path, list[str]]:
    """Calibrate on `calibration` (real training images), fine-tune with fake quantization, export; returns the file and notes for the report.

    `metadata` (the exported ONNX file's) goes into the IR, which, converted from PyTorch, would lack the
    labels and contract the runtime checks edgetl.json against.
    """
    import nncf

    _use_native_quantize_functions()
    torch.manual_seed(seed)
    example = torch.zeros(1, 3, pre.input_size, pre.input_size)
    float_model = static_same_padding(copy.deepcopy(model).eval(), pre.input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NNCF's tracing chatter
        quantized = nncf.quantize(float_model, nncf.Dataset(calibration, torch.from_numpy), subset_size=len(calibration))
    start_accuracy = _accuracy(quantized, dataset.val.images, dataset.val.labels, pre)
    best = (start_accuracy, 0, copy.deepcopy(quantized.state_dict()))
    optimizer = torch.optim.AdamW([p for p in quantized.parameters() if p.requires_grad], lr=variant.qat_lr, weight_decay=0.0)
    criterion = nn.CrossEntropyLoss()
    labels = torch.from_numpy(dataset.train.labels)
    generator = torch.Generator().manual_seed(seed)
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
        accuracy = _accuracy(quantized, dataset.val.images, dataset.val.labels, pre)
        log.info("QAT epoch %d/%d: val accuracy %.4f (PTQ start %.4f)", epoch, variant.qat_epochs, accuracy, start_accuracy)
        if accuracy > best[0]:
            best = (accuracy, epoch, copy.deepcopy(quantized.state_dict()))
    quantized.load_state_dict(best[2])
    quantized.eval()
    notes = [f"QAT: val accuracy {start_accuracy:.4f} after calibration, {best[0]:.4f} after fine-tuning (best epoch {best[1]} of {variant.qat_epochs}, {time.monotonic() - started:.0f}s)"]
    import openvino as ov

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = ov.convert_model(quantized, example_input=example)
    file = save_openvino(converted, out_dir / f"{variant.display_name}.xml", compress_to_fp16=False, metadata=metadata)
    return file, notes


def _train_mode_frozen_bn(model: nn.Module) -> None:
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, pre: Preprocessing) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), 64):
            correct += int((model(torch.from_numpy(normalize(images[i : i + 64], pre))).argmax(1).numpy() == labels[i : i + 64]).sum())
    return correct / max(len(labels), 1)


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
