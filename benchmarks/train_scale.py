"""Training at scale (issue 18): a dataset larger than memory, and several training processes on the CPU.

Usage: python benchmarks/train_scale.py data [--train DIR] [--test DIR] [--size 224] [--epochs 10]
                                              [--baseline-code DIR] [--skip-new] [--data-only] [--out FILE]
       python benchmarks/train_scale.py ddp [--train DIR] [--test DIR] [--size 128] [--epochs 3]
                                             [--strategy finetune] [--seed 0] [--no-kill] [--out FILE]
       python benchmarks/train_scale.py gpu [--train DIR] [--test DIR] [--size 224] [--epochs 4] [--repeat 8]
                                             [--batch-size 256] [--workers N] [--device cuda] [--out FILE]

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

`gpu`: images/s of a lite0 fine-tune at 224 px in bf16 on CUDA (`--device`) from the disk cache, through
`edgetl.pipeline.train_model` in a child process. cifar10-dev/train is small for a GPU (one
epoch would be over in about a second, DataLoader start-up included), so the train root links
each image `--repeat` times (distinct files to the data stage, decoded and cached once each).
Per epoch: training images/s (from the loader's first batch request to its last batch), and the
seconds the training loop spent blocked waiting for the DataLoader's next batch: a large share
means data loading limits the rate. Then the model alone: forward, backward and AdamW steps of
the same model, batch and precision on a batch already on the GPU, the ceiling with free data.
The val split is carved from the repeated images (so its accuracy is not a held-out figure);
the test split, cifar10-dev/val, is.

Results: benchmarks/results/<--out> (default train_scale-data.json, train_scale-ddp.json,
train_scale-gpu.json).
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


GPU_CHILD = r"""
import json, logging, resource, sys, time
from pathlib import Path
import torch
import edgetl.train.trainer as trainer
from edgetl import models
from edgetl.pipeline import train_model
from edgetl.recipe import Recipe

epochs, loader = [], trainer.train_loader
def timed_loader(*args, **kwargs):  # the trainer's own DataLoader, timed
    started, waited, images, batches = time.perf_counter(), 0.0, 0, iter(loader(*args, **kwargs))
    while True:
        asked = time.perf_counter()
        try:
            x, index = next(batches)
        except StopIteration:
            break
        waited += time.perf_counter() - asked
        images += len(index)
        yield x, index
    span = time.perf_counter() - started
    epochs.append({"images": images, "seconds": round(span, 3), "images_per_second": round(images / span, 1),
                   "waiting_for_data_seconds": round(waited, 3), "waiting_share": round(waited / span, 3)})
    print("EPOCH " + json.dumps(epochs[-1]), file=sys.stderr, flush=True)
trainer.train_loader = timed_loader

logging.basicConfig(level=logging.INFO, format="%(message)s")
recipe = Recipe.model_validate(json.loads(sys.argv[1]))
started = time.monotonic()
metrics = train_model(recipe, Path(sys.argv[2]))
wall = time.monotonic() - started

def model_only(batch, size, device, steps=30, warmup=10):
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    model = models.build(models.REGISTRY.get("efficientnet_lite0"), "pretrained", 10).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    optim = torch.optim.AdamW(model.parameters(), 1e-4)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    for step in range(warmup + steps):
        if step == warmup:
            sync()
            began = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
    sync()
    return round(batch * steps / (time.perf_counter() - began), 1)

train, device = recipe.train, torch.device(recipe.train.device)
workers = trainer.default_workers() if recipe.data.workers is None else recipe.data.workers
print("RESULT " + json.dumps({
    "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None, "torch": torch.__version__,
    "device": metrics["device"], "precision": metrics["precision"], "dataloader_workers": workers,
    "wall_seconds": round(wall, 1), "train_seconds": round(metrics["train_seconds"], 1),
    "test_accuracy": metrics["test_accuracy"], "val_accuracy_not_held_out": metrics["val_accuracy"],
    "counts": {s: c["total"] for s, c in metrics["dataset"]["counts"].items()},
    "epochs": epochs,
    "model_only_images_per_second": model_only(train.batch_size, recipe.data.image_size, device),
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
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
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))}
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


# ---- gpu: a fine-tune on one GPU from the disk cache ------------------------------------------------------


def repeated_root(work: Path, train: Path, test: Path, repeat: int) -> Path:
    """An ImageFolder root in `work`: train/ holds `repeat` links to each image of `train`, test/ links to `test`."""
    root = work / "data"
    for folder in sorted(p for p in train.iterdir() if p.is_dir()):
        (root / "train" / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir()):
            for copy in range(repeat):
                (root / "train" / folder.name / f"{image.stem}-{copy}{image.suffix}").symlink_to(image.resolve())
    (root / "test").symlink_to(test.resolve())
    return root


def gpu(args: argparse.Namespace, work: Path) -> dict:
    """The `gpu` sub-command's results."""
    root = repeated_root(work, args.train, args.test, args.repeat)
    body = data_recipe(root, args.size, args.epochs, work / "cache")
    body["data"] |= {"augment": "default", "workers": args.workers}
    body["train"] = {
        **DDP_TRAIN["finetune"],
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "device": args.device,
        "precision": "bf16",
    }
    result = data_build(ROOT.parent, body, work / "run", "lite0 fine-tune on the GPU", GPU_CHILD)
    steady = result["epochs"][1:] or result["epochs"]  # the first also pays one-time GPU start-up
    rate = sum(e["images"] for e in steady) / sum(e["seconds"] for e in steady)
    waiting = sum(e["waiting_for_data_seconds"] for e in steady) / sum(e["seconds"] for e in steady)
    return {
        "machine": machine(),
        "train": f"{args.train} (each image {args.repeat} times)",
        "test": str(args.test),
        "recipe": {"backbone": "efficientnet_lite0", "size": args.size, "epochs": args.epochs}
        | body["train"]
        | {"augment": "default"},
        "images_per_second_after_first_epoch": round(rate, 1),
        "waiting_for_data_share_after_first_epoch": round(waiting, 3),
        **result,
    }


def _command(commands, name: str, help_: str, dataset: str, size: int, epochs: int) -> argparse.ArgumentParser:
    """A sub-command with the options every one has: its data, size, epochs and results file."""
    sub = commands.add_parser(name, help=help_)
    sub.add_argument("--train", type=Path, default=SHARED / dataset / "train")
    sub.add_argument("--test", type=Path, default=SHARED / "cifar10-dev" / "val")
    sub.add_argument("--size", type=int, default=size)
    sub.add_argument("--epochs", type=int, default=epochs)
    sub.add_argument("--out", default=f"train_scale-{name}.json", help="file name under benchmarks/results/")
    return sub


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    data = _command(
        commands, "data", "peak RSS and data-stage seconds of a 36,000-image linear probe", "cifar10-large", 224, 10
    )
    data.add_argument("--baseline-code", type=Path, default=None, help="a checkout of the code to compare with")
    data.add_argument("--skip-new", action="store_true", help="only the baseline build")
    data.add_argument("--data-only", action="store_true", help="only the data stage: first, then two reruns")
    ddp_ = _command(commands, "ddp", "one process against two gloo processes through torchrun", "cifar10-dev", 128, 3)
    ddp_.add_argument("--strategy", choices=sorted(DDP_TRAIN), default="finetune")
    ddp_.add_argument("--seed", type=int, default=0)
    ddp_.add_argument("--no-kill", action="store_true", help="skip the killed-rank run")
    gpu_ = _command(commands, "gpu", "images/s of a lite0 fine-tune on one CUDA GPU in bf16", "cifar10-dev", 224, 4)
    gpu_.add_argument("--repeat", type=int, default=8, help="links to each train image")
    gpu_.add_argument("--batch-size", type=int, default=256)
    gpu_.add_argument("--workers", type=int, default=None, help="data.workers (default: the recipe's default)")
    gpu_.add_argument("--device", default="cuda", help="train.device (cpu: a smoke test of this script)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=ROOT.parent) as work:
        results = {"data": data_scale, "ddp": ddp, "gpu": gpu}[args.command](args, Path(work))
    out = ROOT / "results" / args.out
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
