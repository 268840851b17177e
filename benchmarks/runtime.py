"""The device runtime on this machine: what decoding, preprocessing and postprocessing add to
the bare model call, cold start, and the memory of a predicting process.

Usage: python benchmarks/runtime.py BUNDLE [--image photo.jpg] [--runs 300] [--against DIR]

The default image is a real photo (sklearn's china.jpg) resized to 500×375 and saved as a
JPEG in memory, so the end-to-end figure includes a real ~500 px JPEG decode. End-to-end
(`Predictor.predict(jpeg_bytes)`) and bare (`session.run` on a ready tensor) calls are timed
interleaved. Cold start and peak RSS come from a fresh process in which torch cannot be
imported, as on a device. Results: benchmarks/results/runtime.json (`--output`).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# Runs in a fresh process: the device's view of a cold start, without torch.
FRESH_PROCESS = """
import json, sys, time
for name in ("torch", "torchvision", "timm", "nncf"):
    sys.modules[name] = None
started = time.perf_counter()
from edgetl.runtime.predictor import Predictor
from edgetl.runtime.bench import peak_rss_kb
imported = time.perf_counter()
predictor = Predictor.load(sys.argv[1])
image = open(sys.argv[2], "rb").read()
predictor.predict(image)
first = time.perf_counter()
for _ in range(50):
    predictor.predict(image)
figures = {"import_seconds": imported - started, "cold_start_seconds": first - imported}
print(json.dumps(figures | {"peak_rss_mb": peak_rss_kb() / 1024}))
"""

# Runs in a fresh process from one checkout (PYTHONPATH): median end-to-end ms over `runs` calls.
SIDE_BY_SIDE = """
import json, sys, time
from edgetl.runtime.predictor import Predictor
predictor = Predictor.load(sys.argv[1])
image = open(sys.argv[2], "rb").read()
for _ in range(20):
    predictor.predict(image)
samples = []
for _ in range(int(sys.argv[3])):
    started = time.perf_counter()
    predictor.predict(image)
    samples.append((time.perf_counter() - started) * 1000)
print(json.dumps(sorted(samples)[len(samples) // 2]))
"""


def side_by_side(bundle: Path, image_path: Path, checkouts: dict[str, Path], rounds: int = 6, runs: int = 100) -> dict:
    """p50 of each round's median, per checkout; the checkouts alternate round by round."""
    import os

    medians: dict[str, list[float]] = {name: [] for name in checkouts}
    for _ in range(rounds):
        for name, source in checkouts.items():
            env = {**os.environ, "PYTHONPATH": str(source)}
            done = subprocess.run(
                [sys.executable, "-c", SIDE_BY_SIDE, str(bundle), str(image_path), str(runs)],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            )
            medians[name].append(json.loads(done.stdout))
    return {
        name: {"p50_ms": round(sorted(values)[len(values) // 2], 3), "round_medians_ms": [round(v, 3) for v in values]}
        for name, values in medians.items()
    }


def photo_jpeg() -> bytes:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    buffer = io.BytesIO()
    Image.fromarray(load_sample_images().images[0]).resize((500, 375), Image.Resampling.LANCZOS).save(
        buffer, "JPEG", quality=90
    )
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--image", type=Path)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--against", type=Path, help="another edgetl checkout to time end to end side by side")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "runtime.json")
    args = parser.parse_args()

    from edgetl.runtime.bench import interleaved_latency
    from edgetl.runtime.predictor import Predictor
    from edgetl.runtime.preprocess import crop_uint8, load_rgb, normalize, preprocess

    image = args.image.read_bytes() if args.image else photo_jpeg()
    predictor = Predictor.load(args.bundle)
    pre = predictor.bundle.preprocessing
    tensor = preprocess(image, pre)
    decoded, crop = load_rgb(image), crop_uint8(load_rgb(image), pre)
    logits = predictor.engine.run(tensor)
    timings = interleaved_latency(
        {
            "bare_model": lambda: predictor.engine.run(tensor),
            "end_to_end": lambda: predictor.predict(image),
            # the end-to-end call's parts, to show where the overhead goes
            "decode": lambda: load_rgb(image),
            "resize_crop": lambda: crop_uint8(decoded, pre),
            "normalize": lambda: normalize(crop[None], pre),
            "postprocess": lambda: predictor.predictions(logits, 5),
        },
        rounds=max(1, args.runs // 10),
        runs_per_round=10,
        warmup=20,
    )
    image_path = ROOT / "results" / ".runtime-bench.jpg"
    image_path.parent.mkdir(exist_ok=True)
    image_path.write_bytes(image)
    try:
        fresh = [
            json.loads(
                subprocess.run(
                    [sys.executable, "-c", FRESH_PROCESS, str(args.bundle), str(image_path)],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )
            for _ in range(3)
        ]
        against = (
            side_by_side(args.bundle, image_path, {"this": ROOT.parent, "against": args.against.resolve()})
            if args.against
            else None
        )
    finally:
        image_path.unlink(missing_ok=True)
    manifest = predictor.bundle.manifest
    result = {
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
        "bundle": {
            "variant": manifest.get("variant"),
            "runtime": manifest["runtime"],
            "precision": manifest.get("precision"),
            "input_size": predictor.bundle.preprocessing.input_size,
        },
        "image_bytes": len(image),
        "latency_ms": {name: {k: round(v, 3) for k, v in t.items()} for name, t in timings.items()},
        "pre_post_overhead": round(timings["end_to_end"]["p50"] / timings["bare_model"]["p50"] - 1, 3),
        "overhead_parts_vs_bare_model": {
            part: round(timings[part]["p50"] / timings["bare_model"]["p50"], 3)
            for part in ("decode", "resize_crop", "normalize", "postprocess")
        },
        "fresh_process_runs": [{k: round(v, 3) for k, v in run.items()} for run in fresh],
        "cold_start_seconds_median": round(sorted(r["cold_start_seconds"] for r in fresh)[1], 3),
        "peak_rss_mb_max": round(max(r["peak_rss_mb"] for r in fresh), 1),
    }
    if against is not None:
        result["side_by_side_end_to_end"] = {"against": str(args.against), **against}
    print(json.dumps(result, indent=2))
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
