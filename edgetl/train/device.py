"""Where one training process runs: its device (`train.device`) and mixed precision (`train.precision`).

Training runs on the device; export, quantization and validation stay on the CPU (the deployment
targets are CPUs), so the trainer hands back a CPU FP32 model and its CPU FP32 logits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from edgetl.errors import RecipeError


def resolve_device(setting: str, local_rank: int = 0, launched: bool = False) -> torch.device:
    """`train.device` as a torch device: auto is CUDA when available, else the CPU. Under torchrun (`launched`)
    each process takes the GPU of its `local_rank`.

    Raises RecipeError for a device this machine lacks, or `cuda:N` under torchrun (each rank takes its own GPU).

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cpu":
        return torch.device("cpu")
    if setting == "mps":
        if not torch.backends.mps.is_available():
            raise RecipeError("`train.device` is mps, but this machine has no Apple GPU; use auto or cpu.")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise RecipeError(
            f"`train.device` is {setting}, but CUDA is not available here (no GPU, or a CPU-only torch); "
            "use auto or cpu, or install a CUDA build of torch."
        )
    index = local_rank if setting == "cuda" else int(setting.split(":")[1])
    if setting != "cuda" and launched:
        raise RecipeError(
            f"`train.device` is {setting}, but under torchrun each rank takes the GPU of its LOCAL_RANK; use cuda "
            "or auto, and choose GPUs with CUDA_VISIBLE_DEVICES."
        )
    if index >= torch.cuda.device_count():
        raise RecipeError(
            f"`train.device` asks for GPU {index}, but this machine has {torch.cuda.device_count()}; use 0.."
            f"{torch.cuda.device_count() - 1} (or --nproc-per-node at most the GPU count)."
        )
    return torch.device("cuda", index)


def resolve_precision(setting: str, device: torch.device) -> str:
    """`train.precision` on `device`: auto is bf16 on CUDA GPUs that support it, fp16 (with a grad scaler) on
    those that do not, fp32 elsewhere. Raises RecipeError for fp16 on the CPU (no fast fp16 kernels there).

    >>> resolve_precision("auto", torch.device("cpu"))
    'fp32'
    """
    if setting == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if setting == "fp16" and device.type == "cpu":
        raise RecipeError("`train.precision` is fp16, which the CPU does not speed up; use bf16, fp32 or auto.")
    return setting


@dataclass(frozen=True)
class Placement:
    """The device and mixed precision one training process runs in."""

    device: torch.device
    precision: str  # fp32 | bf16 | fp16

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for forward passes (a no-op in fp32): matmuls and convs in bf16/fp16, reductions fp32."""
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.precision != "fp32")

    def scaler(self) -> torch.amp.GradScaler:
        """fp16's loss scaler (fp16 gradients underflow without it); disabled, a pass-through, otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` on the device: from pinned memory without blocking on CUDA (the copy overlaps the work queued)."""
        if self.device.type != "cuda":
            return tensor.to(self.device)
        if not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    @property
    def exact(self) -> bool:
        """Whether the training's own logits are the CPU FP32 ones that export parity and validation compare with."""
        return self.device.type == "cpu" and self.precision == "fp32"


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's weights in host memory (a GPU's memory holds the training, not old epochs)."""
    return {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}


def get_rng(device: torch.device) -> dict:
    """This process's global random state: CPU, and the device's (its dropout) on CUDA."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda, "device": str(device)}


def set_rng(state: dict) -> None:
    """Restore what `get_rng` returned."""
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():  # a GPU snapshot resumed on a CPU-only machine
        torch.cuda.set_rng_state(state["cuda"], state["device"])
