"""Training at scale (issue 18): a dataset larger than memory, and several training processes on the CPU.

Usage: python benchmarks/train_scale.py data [--train DIR] [--test DIR] [--size 224] [--epochs 10]
                                              [--baseline-code DIR] [--skip-new] [--data-only] [--out FILE]
       python benchmarks/train_scale.py ddp [--train DIR] [--test DIR] [--size 128] [--epochs 3]
                                             [--strategy finetune] [--seed 0] [--no-kill] [--out FILE]

Both train on `--train` (val carved from it, 15%) and test on `--test`, with lite0.

`data`: peak RSS and data-stage seconds of a linear probe at 224 px on
../shared/datasets/cifar10-large/train (36,000 CIFAR-10 JPEGs), tested on cifar10-dev/val,
through `edgetl.pipeline.train_model` (data + train stages). Each build runs in its own
process, so its peak RSS (`ru_maxrss`, which counts the pages of memory-mapped files it
touched too) is its own. Runs: a first build into an empty disk cache, then a rerun on the same
cache (a new run folder: only the data cache and the cached features are shared); with
`--baseline-code DIR` (e.g. a worktree of 45ca79b, the in-memory design) the same build with
that code first. `--data-only` runs the data stage alone (the baseline's too): first, then two
reruns. The data stage's seconds of a build are measured from the log: from the backbone line
to the data line, which both designs print.

`ddp`: two gloo processes through torchrun against one process, on cifar10-dev (train/ to
train on, val/ as the 1,000-image test split). Builds the same recipe (same seed) with
`edgetl build` in one process and with `torchrun --nproc-per-node 2 -m edgetl build`, counts
the reports and bundles each left, compares their test accuracies and training images/s, and
kills rank 1 of a third 2-process build after its first epoch to time how long torchrun takes
to exit (and with what).

Results: benchmarks/results/<--out> (default train_scale-data.json, train_scale-ddp.json).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from edgetl import environment

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent.parent / "shared" / "datasets"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
DDP_TRAIN = {
    "finetune": {"strategy": "finetune", "lr": 0.001, "backbone_lr_mult": 0.3, "warmup_epochs": 0.5},
    "linear_probe": {"strategy": "linear_probe", "lr": 0.001},
}

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
    "decoded": getattr(ds, "decoded", "all (in memory)"),  # the in-memory design decodes every image every build
    "counts": {s: len(ds.split(s).labels) for s in data.SPLITS},
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    "imported_from": data.__file__,
}), flush=True)
"""


def linked_root(work: Path, train: Path, test: Path) -> Path:
    """An ImageFolder root in `work` whose train/ and test/ are links to `train` and `test`."""
    root = work / "data"
    root.mkdir()
    (root / "train").symlink_to(train.resolve())
    (root / "test").symlink_to(test.resolve())
    return root


def machine() -> dict:
    env = environment.describe()
    return {"cpu": env["cpu_model"], "cores": env["cores"], "python": env["python"]}


# ---- data: a dataset larger than memory ------------------------------------------------------------------


def data_recipe(root: Path, size: int, epochs: int, cache_dir: Path) -> dict:
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


def data_build(code: Path, body: dict, run_dir: Path, label: str, child: str = CHILD) -> dict:
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


def data_scale(args: argparse.Namespace, work: Path) -> dict:
    """The `data` sub-command's results."""
    results = {"machine": machine(), "train": str(args.train), "test": str(args.test)}
    results |= {"image_size": args.size, "epochs": args.epochs, "runs": []}
    body = data_recipe(linked_root(work, args.train, args.test), args.size, args.epochs, work / "cache")
    child = DATA_ONLY if args.data_only else CHILD
    if args.baseline_code is not None:  # the in-memory design knows no data.cache_dir
        baseline = body | {"data": {k: v for k, v in body["data"].items() if k != "cache_dir"}}
        results["runs"].append(data_build(args.baseline_code, baseline, work / "base", "baseline", child))
    if args.skip_new:
        return results
    labels = ("first (empty cache)", "rerun (same cache)") + (("rerun again",) if args.data_only else ())
    new = [data_build(ROOT.parent, body, work / f"run{i}", label, child) for i, label in enumerate(labels)]
    results["runs"] += new
    results["rerun_data_seconds_over_first"] = round(new[1]["data_seconds"] / new[0]["data_seconds"], 3)
    return results


# ---- ddp: one process against two gloo processes -----------------------------------------------------------


def ddp_recipe(folder: Path, root: Path, size: int, epochs: int, strategy: str, seed: int) -> Path:
    recipe = {
        "name": "ddp-bench",
        "seed": seed,
        "data": {
            "path": str(root),
            "val_split": 0.15,
            "image_size": size,
            "augment": "default" if strategy == "finetune" else "none",
        },
        "model": {"backbone": "efficientnet_lite0", "weights": "pretrained"},
        "train": {"epochs": epochs, "batch_size": 32, **DDP_TRAIN[strategy]},
        "export": {"runtimes": ["onnxruntime"]},
        "quantize": [],
        "measure": {"latency_rounds": 2, "latency_runs": 5},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def ddp_build(command: list[str], run: Path) -> dict:
    """One build's wall time, exit code and what it left in `run`."""
    started = time.monotonic()
    done = subprocess.run([*command, "-o", str(run)], capture_output=True, text=True)
    wall = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"build failed ({done.returncode}):\n{done.stderr[-3000:]}")
    report = json.loads((run / "report.json").read_text())
    training = report["training"]
    train_images = report["dataset"]["counts"]["train"]["total"]
    epochs = len(training["history"])
    return {
        "world_size": training["world_size"],
        "device": training["device"],
        "precision": training["precision"],
        "build_wall_seconds": round(wall, 1),
        "train_seconds": training["train_seconds"],
        "train_images_per_second": round(train_images * epochs / training["train_seconds"], 1),
        "val_accuracy": training["val_accuracy"],
        "test_accuracy": training["test_accuracy"],
        "test_images": report["variants"][0]["test_images"],
        "reports": len(list(run.rglob("report.json"))),
        "bundles": len(list(run.glob("*.tar.gz"))),
    }


def kill_rank(recipe: Path, run: Path) -> dict:
    """SIGKILL rank 1 after the first finished epoch; how long until torchrun exits, and its exit code."""
    launcher = subprocess.Popen(
        [*TORCHRUN, "-m", "edgetl", "build", str(recipe), "-o", str(run)], stderr=subprocess.PIPE, text=True
    )
    while not list((run / "state").glob("train-*.pt")) and launcher.poll() is None:
        time.sleep(0.1)
    rank1 = next(p for p in psutil.Process(launcher.pid).children() if p.environ().get("RANK") == "1")
    rank1.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    stderr = launcher.communicate(timeout=900)[1]
    lines = [line for line in stderr.splitlines() if line.startswith("edgetl:")]
    return {
        "seconds_to_exit": round(time.monotonic() - killed, 2),
        "torchrun_exit_code": launcher.returncode,
        "rank0_message": lines[-1] if lines else None,
        "report_written": (run / "report.json").exists(),
    }


def ddp(args: argparse.Namespace, work: Path) -> dict:
    """The `ddp` sub-command's results."""
    os.environ["PYTHONPATH"] = str(ROOT.parent)  # this checkout's edgetl in every process
    root = linked_root(work, args.train, args.test)
    recipe = ddp_recipe(work, root, args.size, args.epochs, args.strategy, args.seed)
    base = ["-m", "edgetl", "build", str(recipe)]
    one = ddp_build([sys.executable, *base], work / "one")
    print("1 process:", one, flush=True)
    two = ddp_build([*TORCHRUN, *base], work / "two")
    print("2 processes:", two, flush=True)
    killed = None if args.no_kill else kill_rank(recipe, work / "killed")
    print("rank 1 killed:", killed, flush=True)
    return {
        "machine": machine(),
        "train": str(args.train),
        "test": str(args.test),
        "recipe": {"backbone": "efficientnet_lite0", "size": args.size, "epochs": args.epochs, "seed": args.seed}
        | DDP_TRAIN[args.strategy],
        "one_process": one,
        "two_processes": two,
        "test_accuracy_difference_points": round(100 * (two["test_accuracy"] - one["test_accuracy"]), 2),
        "rank_killed": killed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="peak RSS and data-stage seconds of a 36,000-image linear probe")
    data.add_argument("--train", type=Path, default=SHARED / "cifar10-large" / "train")
    data.add_argument("--size", type=int, default=224)
    data.add_argument("--epochs", type=int, default=10)
    data.add_argument("--baseline-code", type=Path, default=None, help="a checkout of the code to compare with")
    data.add_argument("--skip-new", action="store_true", help="only the baseline build")
    data.add_argument("--data-only", action="store_true", help="only the data stage: first, then two reruns")
    data.add_argument("--out", default="train_scale-data.json", help="file name under benchmarks/results/")
    ddp_ = commands.add_parser("ddp", help="one process against two gloo processes through torchrun")
    ddp_.add_argument("--train", type=Path, default=SHARED / "cifar10-dev" / "train")
    ddp_.add_argument("--size", type=int, default=128)
    ddp_.add_argument("--epochs", type=int, default=3)
    ddp_.add_argument("--strategy", choices=sorted(DDP_TRAIN), default="finetune")
    ddp_.add_argument("--seed", type=int, default=0)
    ddp_.add_argument("--no-kill", action="store_true", help="skip the killed-rank run")
    ddp_.add_argument("--out", default="train_scale-ddp.json", help="file name under benchmarks/results/")
    for sub in (data, ddp_):
        sub.add_argument("--test", type=Path, default=SHARED / "cifar10-dev" / "val")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=ROOT.parent) as work:
        results = (data_scale if args.command == "data" else ddp)(args, Path(work))
    out = ROOT / "results" / args.out
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
