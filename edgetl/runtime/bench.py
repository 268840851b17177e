"""Latency measurement that survives a noisy shared machine.

Variants are timed round-robin (interleaved), so a slow spell on the machine hits every
variant alike and their ratios stay meaningful (FACTS.md: absolute milliseconds drift by
up to 1.6× between runs here).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np


def interleaved_latency(calls: dict[str, Callable[[], object]], rounds: int = 10, runs_per_round: int = 10, warmup: int = 5) -> dict[str, dict[str, float]]:
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
    return {"p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90)), "p99": float(np.percentile(values, 99)), "mean": float(values.mean())}
