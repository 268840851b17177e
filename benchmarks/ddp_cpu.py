"""Two gloo processes through torchrun against one process, on the CPU, on real images.

Usage: python benchmarks/ddp_cpu.py [--data DIR] [--size 96] [--epochs 3] [--strategy finetune] [--seed 0]
                                   [--no-kill] [--output FILE]

Builds the same recipe (same seed) with `edgetl build` in one process and with `torchrun
--nproc-per-node 2 -m edgetl build`, then counts the reports and bundles each left, compares
their test accuracies and training speed, and kills rank 1 of a third 2-process build after
its first epoch to time how long torchrun takes to exit (and with what). Data:
../shared/datasets/cifar10-dev (train → train/val/test, its val/ folder as val).
Results: benchmarks/results/ddp_cpu.json.
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
CIFAR = ROOT.parent.parent / "shared" / "datasets" / "cifar10-dev"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
TRAIN = {
    "finetune": {"strategy": "finetune", "lr": 0.001, "backbone_lr_mult": 0.3, "warmup_epochs": 0.5},
    "linear_probe": {"strategy": "linear_probe", "lr": 0.001},
}


def write_recipe(folder: Path, data: Path, size: int, epochs: int, strategy: str, seed: int) -> Path:
    recipe = {
        "name": "ddp-bench",
        "seed": seed,
        "data": {"path": str(data), "image_size": size, "augment": "default" if strategy == "finetune" else "none"},
        "model": {"backbone": "efficientnet_lite0", "weights": "pretrained"},
        "train": {"epochs": epochs, "batch_size": 32, **TRAIN[strategy]},
        "export": {"runtimes": ["onnxruntime"]},
        "quantize": [],
        "measure": {"latency_rounds": 2, "latency_runs": 5},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def build(command: list[str], run: Path) -> dict:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=CIFAR)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--strategy", choices=sorted(TRAIN), default="finetune")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-kill", action="store_true", help="skip the killed-rank run")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "ddp_cpu.json")
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = str(ROOT.parent)  # this checkout's edgetl in every process
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        recipe = write_recipe(work, args.data, args.size, args.epochs, args.strategy, args.seed)
        base = ["-m", "edgetl", "build", str(recipe)]
        one = build([sys.executable, *base], work / "one")
        print("1 process:", one, flush=True)
        two = build([*TORCHRUN, *base], work / "two")
        print("2 processes:", two, flush=True)
        killed = None if args.no_kill else kill_rank(recipe, work / "killed")
        print("rank 1 killed:", killed, flush=True)
    env = environment.describe()
    result = {
        "cpu_model": env["cpu_model"],
        "cores": env["cores"],
        "data": str(args.data),
        "recipe": {
            "backbone": "efficientnet_lite0",
            "size": args.size,
            "epochs": args.epochs,
            "seed": args.seed,
            **TRAIN[args.strategy],
        },
        "one_process": one,
        "two_processes": two,
        "test_accuracy_difference_points": round(100 * (two["test_accuracy"] - one["test_accuracy"]), 2),
        "rank_killed": killed,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
