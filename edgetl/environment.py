"""What machine and software a build measured on: latencies mean nothing without it.

INT8 speed depends on the CPU's instruction sets (measured on lite0: without VNNI, only uint8
activations are faster than FP32 in ONNX Runtime), so the flags go into every report.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

PACKAGES = ("edgetl", "torch", "torchvision", "timm", "onnx", "onnxruntime", "openvino", "nncf", "numpy", "pillow")
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "neon", "asimd")


def describe() -> dict:
    """CPU model, instruction-set flags, cores, Python and package versions.

    >>> describe()["cpu_flags"]["avx2"]
    True
    """
    model, flags = _cpuinfo()
    return {
        "cpu_model": model or platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS},
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
    }


def _cpuinfo() -> tuple[str, set[str]]:
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return "", set()
    model, flags = "", set()
    for line in path.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model") and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def has_vnni() -> bool:
    """Whether the CPU has an int8 dot-product instruction (AVX-512 VNNI, AVX-VNNI or AMX).

    Without one, ONNX Runtime's u8×s8 kernels use VPMADDUBSW, whose 16-bit intermediate
    saturates: measured on lite0 at 224 px, INT8 top-1 agreement with FP32 fell to 0.52.
    """
    _, flags = _cpuinfo()
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
