"""`python -m edgetl.probe RUNTIME FILE SIZE THREADS`: load one artifact in a fresh process,
predict a few times, print JSON {load_seconds, peak_rss_mb}.

A separate process, so the memory figure is that of a process that only runs inference,
not of the build that has torch, the dataset and every other variant loaded.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from edgetl.runtime.bench import peak_rss_kb


def main(runtime: str, target: str, size: int, threads: int) -> dict:
    batch = np.zeros((1, 3, size, size), np.float32)
    if runtime == "pytorch":
        import torch

        from edgetl.models import load_checkpoint

        torch.set_num_threads(threads or torch.get_num_threads())
        started = time.perf_counter()
        model = load_checkpoint(Path(target)).model
        loaded = time.perf_counter()
        with torch.inference_mode():
            for _ in range(5):
                model(torch.from_numpy(batch))
    else:
        from edgetl.runtime.engines import open_engine

        started = time.perf_counter()
        engine = open_engine(Path(target), runtime, threads or None)
        loaded = time.perf_counter()
        for _ in range(5):
            engine.run(batch)
    return {"load_seconds": round(loaded - started, 4), "peak_rss_mb": round(peak_rss_kb() / 1024, 1)}


if __name__ == "__main__":
    runtime, target, size, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(main(runtime, target, size, threads)))
