"""Latency measurement that survives a noisy shared machine.

Variants are timed round-robin (interleaved), so a slow spell on the machine hits every
variant alike and their ratios stay meaningful (absolute milliseconds were measured to drift
by up to 1.6× between runs on the project's shared 2-core machines).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def interleaved_latency(
    calls: dict[str, Callable[[], object]], rounds: int = 10, runs_per_round: int = 10, warmup: int = 5
) -> dict[str, dict[str, float]]:
    """Milliseconds per call: p50, p90, p99 and mean for each named call.

    >>> interleaved_latency({"fp32": lambda: fp32.run(x), "int8": lambda: int8.run(x)})["int8"]["p50"]
    """
    for call in calls.values():
        for _ in range(warmup):
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            for _ in range(runs_per_round):
                started = time.perf_counter()
                call()
                samples[name].append((time.perf_counter() - started) * 1000.0)
    return {name: summarize(values) for name, values in samples.items()}


def summarize(milliseconds: list[float]) -> dict[str, float]:
    values = np.asarray(milliseconds)
    return {
        "p50": float(np.percentile(values, 50)),
        "p90": float(np.percentile(values, 90)),
        "p99": float(np.percentile(values, 99)),
        "mean": float(values.mean()),
    }


def peak_rss_kb() -> int:
    """This process's peak resident memory. Linux's VmHWM starts afresh at exec; getrusage's
    ru_maxrss does not (it carries the forking parent's peak, here the whole build's)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
