"""Data beyond memory: peak RSS and data-stage seconds of a 36,000-image linear probe at 224 px.

Usage: python benchmarks/data_scale.py [--train DIR] [--test DIR] [--size 224] [--epochs 10]
       [--baseline-code DIR] [--out data_scale.json]

Train on ../shared/datasets/cifar10-large/train (36,000 CIFAR-10 JPEGs; val carved from it,
15%), test on ../shared/datasets/cifar10-dev/val, lite0 linear probe, through
`edgetl.pipeline.train_model` (data + train stages). Each build runs in its own process, so
its peak RSS (`ru_maxrss`, which counts the pages of memory-mapped files it touched too) is its
own. Runs: a first build into an empty disk cache, then a rerun on the same cache (a new run
folder: only the data cache and the cached features are shared); with `--baseline-code DIR`
(e.g. a worktree of 45ca79b, the in-memory design) the same build with that code first.
The data stage's seconds are measured from the log: from the backbone line to the data line,
which both designs print. Results: benchmarks/results/<out>.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent.parent / "shared" / "datasets"

CHILD = r"""
import json, logging, resource, sys, time
from pathlib import Path
from edgetl.pipeline import train_model
from edgetl.recipe import Recipe

marks = {}
class Marks(logging.Handler):
    def emit(self, record):
        text = record.getMessage()
        for mark in ("backbone ", "data "):
            if record.name == "edgetl.pipeline" and text.startswith(mark) and mark not in marks:
                marks[mark] = time.monotonic()
logging.basicConfig(level=logging.WARNING, format="%(message)s")
logging.getLogger("edgetl").setLevel(logging.INFO)
logging.getLogger("edgetl").addHandler(Marks())
recipe = Recipe.model_validate(json.loads(sys.argv[1]))
started = time.monotonic()
metrics = train_model(recipe, Path(sys.argv[2]))
print("RESULT " + json.dumps({
    "wall_seconds": round(time.monotonic() - started, 1),
    "data_seconds": round(marks["data "] - marks["backbone "], 2),
    "train_seconds": round(metrics["train_seconds"], 1),
    "test_accuracy": metrics["test_accuracy"],
    "val_accuracy": metrics["val_accuracy"],
    "counts": {s: c["total"] for s, c in metrics["dataset"]["counts"].items()},
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    "imported_from": __import__("edgetl").__file__,
}), flush=True)
"""


DATA_ONLY = r"""
import json, resource, sys, time
from pathlib import Path
from edgetl import data, models
from edgetl.recipe import Recipe
recipe = Recipe.model_validate(json.loads(sys.argv[1]))
spec, d = models.REGISTRY.get(recipe.model.backbone), recipe.data
pre = spec.preprocessing(d.image_size, d.crop_pct, d.decode)
started = time.monotonic()
ds = data.run(recipe.data, pre, recipe.seed)
print("RESULT " + json.dumps({
    "data_seconds": round(time.monotonic() - started, 2),
    "decoded": ds.decoded,
    "counts": {s: len(ds.split(s).labels) for s in data.SPLITS},
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    "imported_from": data.__file__,
}), flush=True)
"""


def recipe(root: Path, size: int, epochs: int, cache_dir: Path) -> dict:
    return {
        "name": "data-scale",
        "seed": 0,
        "data": {
            "path": str(root),
            "val_split": 0.15,
            "image_size": size,
            "augment": "none",
            "cache_dir": str(cache_dir),
        },
        "model": {"backbone": "efficientnet_lite0", "weights": "pretrained"},
        "train": {"strategy": "linear_probe", "epochs": epochs, "batch_size": 32, "lr": 0.001},
        "quantize": [],
    }


def build(code: Path, body: dict, run_dir: Path, label: str, child: str = CHILD) -> dict:
    """One build (or with `child` DATA_ONLY, its data stage) in its own process with `code` first on the path;
    its RESULT line."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    print(f"== {label}", flush=True)
    proc = subprocess.run(
        [sys.executable, "-c", child, json.dumps(body), str(run_dir)],
        env=env,
        capture_output=True,
        text=True,
        cwd=code,  # `python -c` puts the working folder first on sys.path, before PYTHONPATH
    )
    lines = [line for line in proc.stderr.splitlines() if "decode" not in line and "features" not in line]
    print("\n".join(lines[-8:]), flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    print(json.dumps(result), flush=True)
    return {"run": label, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, default=SHARED / "cifar10-large" / "train")
    parser.add_argument("--test", type=Path, default=SHARED / "cifar10-dev" / "val")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--baseline-code", type=Path, default=None, help="a checkout of the code to compare with")
    parser.add_argument("--skip-new", action="store_true", help="only the baseline build")
    parser.add_argument("--data-only", action="store_true", help="only the data stage: first, then two reruns")
    parser.add_argument("--out", default="data_scale.json", help="file name under benchmarks/results/")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    results = {
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()},
        "train": str(args.train),
        "test": str(args.test),
        "image_size": args.size,
        "epochs": args.epochs,
        "runs": [],
    }
    with tempfile.TemporaryDirectory(dir=ROOT.parent) as work:
        work = Path(work)
        root = work / "data"
        root.mkdir()
        (root / "train").symlink_to(args.train.resolve())
        (root / "test").symlink_to(args.test.resolve())
        cache = work / "cache"
        body = recipe(root, args.size, args.epochs, cache)
        if args.baseline_code is not None:
            results["runs"].append(
                build(
                    args.baseline_code,
                    body | {"data": {k: v for k, v in body["data"].items() if k != "cache_dir"}},
                    work / "base",
                    "baseline",
                )
            )
        if args.data_only:
            for label in ("first (empty cache)", "rerun (same cache)", "rerun again"):
                results["runs"].append(build(ROOT.parent, body, work / "x", f"data stage, {label}", DATA_ONLY))
            results["rerun_data_seconds_over_first"] = round(
                results["runs"][1]["data_seconds"] / results["runs"][0]["data_seconds"], 3
            )
        elif not args.skip_new:
            results["runs"].append(build(ROOT.parent, body, work / "first", "first (empty cache)"))
            results["runs"].append(build(ROOT.parent, body, work / "rerun", "rerun (same cache)"))
            first, rerun = results["runs"][-2:]
            results["rerun_data_seconds_over_first"] = round(rerun["data_seconds"] / first["data_seconds"], 3)
    out = ROOT / "results" / args.out
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
