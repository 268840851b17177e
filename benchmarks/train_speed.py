"""Training speed and accuracy of each strategy against a plain PyTorch tutorial loop.

Usage: python benchmarks/train_speed.py [--data DIR] [--size 224] [--epochs 10] [--tutorial-epochs 2]
       python benchmarks/train_speed.py --compare DIR [--strategies ...] [--finetune-epochs 1]

With `--compare DIR` (another checkout, e.g. `git worktree add ../wt-base 45ca79b`), each
strategy runs in a fresh process with this checkout's code and with DIR's, interleaved (the
order alternates between strategies; `--swap` flips it, for a second run), each into an empty
disk cache, and the results hold both images/s and their ratio: a regression check measured
side by side in one run.

Data: ../shared/datasets/cifar10-dev (train → val) when present, digits otherwise.
The baseline is the loop of PyTorch's transfer-learning tutorial ("ConvNet as fixed
feature extractor"): torchvision ImageFolder + DataLoader re-decoding and re-augmenting
JPEGs, the frozen backbone run on every image every epoch, val evaluated every epoch. It
costs the same every epoch, so it runs `--tutorial-epochs` and its 10-epoch time is
extrapolated linearly (said in the results). Results: benchmarks/results/train_speed.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from edgetl.models import REGISTRY
from edgetl.models import build as build_model
from edgetl.pipeline import train_model
from edgetl.recipe import Recipe

ROOT = Path(__file__).resolve().parent
CIFAR = ROOT.parent.parent / "shared" / "datasets" / "cifar10-dev"

# (train section, data.augment) per strategy; caching needs augment none.
STRATEGIES = {
    "linear_probe": ({"strategy": "linear_probe", "lr": 0.001}, "none"),
    "partial": ({"strategy": "partial", "unfreeze": 2, "lr": 0.003, "backbone_lr_mult": 0.3}, "none"),
    "finetune": ({"strategy": "finetune", "lr": 0.001, "backbone_lr_mult": 0.3, "warmup_epochs": 0.5}, "default"),
}


def recipe_body(name: str, data: dict, size: int, epochs: int, workers: int | None = None) -> dict:
    train, augment = STRATEGIES[name]
    return {
        "name": f"bench-{name}",
        "seed": 0,
        "data": {**data, "image_size": size, "augment": augment, **({} if workers is None else {"workers": workers})},
        "model": {"backbone": "efficientnet_lite0", "weights": "pretrained"},
        "train": {"epochs": epochs, "batch_size": 32, **train},
        "quantize": [],
    }


def edgetl_run(name: str, data: dict, size: int, epochs: int, workdir: Path, workers: int | None = None) -> dict:
    started = time.monotonic()
    metrics = train_model(Recipe.model_validate(recipe_body(name, data, size, epochs, workers)), workdir / name)
    return figures(name, metrics, epochs, time.monotonic() - started)


_CHILD = """
import json, sys, time
from pathlib import Path
from edgetl.pipeline import train_model
from edgetl.recipe import Recipe
started = time.monotonic()
metrics = train_model(Recipe.model_validate(json.loads(sys.argv[1])), Path(sys.argv[2]))
import edgetl
print("RESULT " + json.dumps({"metrics": metrics, "wall": time.monotonic() - started, "code": edgetl.__file__}))
"""


def compared_run(name: str, data: dict, size: int, epochs: int, workdir: Path, code: Path, label: str) -> dict:
    """One strategy's training with `code` first on the path, in its own process and its own empty disk cache."""
    run_dir = workdir / f"{label}-{name}"
    env = {**os.environ, "PYTHONPATH": str(code), "EDGETL_CACHE_DIR": str(run_dir / "cache")}
    body = json.dumps(recipe_body(name, data, size, epochs))
    # cwd=code: `python -c` puts the working folder first on sys.path, before PYTHONPATH
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, body, str(run_dir)], env=env, capture_output=True, text=True, cwd=code
    )
    if proc.returncode != 0:
        raise SystemExit(f"{label} {name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    imported = str(Path(result["code"]).parent.parent)
    return {
        "code": label,
        "commit": _commit(code),
        "imported_from": imported,
        **figures(name, result["metrics"], epochs, result["wall"]),
    }


def _commit(code: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()


def figures(name: str, metrics: dict, epochs: int, wall: float) -> dict:
    _, augment = STRATEGIES[name]
    train_images = metrics["dataset"]["counts"]["train"]["total"]
    return {
        "strategy": name,
        "augment": augment,
        "data_workers": metrics["recipe"]["data"].get("workers", "n/a"),
        "epochs": epochs,
        "wall_seconds": round(wall, 1),
        "train_seconds": metrics["train_seconds"],
        "images_per_second": round(train_images * len(metrics["history"]) / metrics["train_seconds"], 1),
        "val_accuracy": metrics["val_accuracy"],
        "test_accuracy": metrics["test_accuracy"],
        "best_epoch": metrics["best_epoch"],
        "train_images": train_images,
    }


def tutorial_run(root: Path, size: int, epochs: int) -> dict:
    """The tutorial's fixed-feature-extractor loop with the same backbone, head and batch size."""
    from torchvision import datasets, transforms

    spec = REGISTRY.get("efficientnet_lite0")
    pre = spec.preprocessing(size)
    normalize = transforms.Normalize(pre.mean, pre.std)
    train_tf = transforms.Compose(
        [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]
    )
    val_tf = transforms.Compose(
        [transforms.Resize(pre.resize_size), transforms.CenterCrop(size), transforms.ToTensor(), normalize]
    )
    train_set = datasets.ImageFolder(root / "train", train_tf)
    val_set = datasets.ImageFolder(root / "val", val_tf)
    loaders = {
        "train": torch.utils.data.DataLoader(train_set, batch_size=32, shuffle=True, num_workers=2),
        "val": torch.utils.data.DataLoader(val_set, batch_size=32, shuffle=False, num_workers=2),
    }
    torch.manual_seed(0)
    model = build_model(spec, "pretrained", len(train_set.classes))
    model.freeze_prefix(len(model.stages))
    optimizer = torch.optim.SGD(model.head.parameters(), lr=0.001, momentum=0.9)
    criterion = torch.nn.CrossEntropyLoss()
    epoch_seconds, accuracy = [], 0.0
    for _ in range(epochs):
        started = time.monotonic()
        model.train()
        for x, y in loaders["train"]:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in loaders["val"]:
                correct += (model(x).argmax(1) == y).sum().item()
        accuracy = correct / len(val_set)
        epoch_seconds.append(time.monotonic() - started)
        print(f"tutorial epoch {len(epoch_seconds)}: {epoch_seconds[-1]:.1f}s val {accuracy:.4f}", flush=True)
    per_epoch = sum(epoch_seconds) / len(epoch_seconds)
    return {
        "strategy": "tutorial_fixed_feature_extractor",
        "epochs_measured": epochs,
        "seconds_per_epoch": round(per_epoch, 1),
        "ten_epoch_seconds_extrapolated": round(per_epoch * 10, 1),
        "images_per_second": round(len(train_set) / per_epoch, 1),
        "val_accuracy_after_measured_epochs": accuracy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=CIFAR)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--tutorial-epochs", type=int, default=2)
    parser.add_argument("--strategies", nargs="+", default=["linear_probe", "partial"], choices=list(STRATEGIES))
    parser.add_argument("--workers", type=int, default=None, help="data.workers (default: the recipe default)")
    parser.add_argument("--compare", type=Path, default=None, help="another checkout to measure side by side")
    parser.add_argument("--swap", action="store_true", help="with --compare: the other code goes first each time")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="epochs of finetune (default --epochs)")
    parser.add_argument("--out", default="train_speed.json", help="file name under benchmarks/results/")
    args = parser.parse_args()
    if args.compare is not None:
        return compare(args)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("edgetl").setLevel(logging.INFO)  # per-epoch lines from the build
    data = (
        {"path": str(args.data), "val_split": 0.15, "test_split": 0.15} if args.data.is_dir() else {"builtin": "digits"}
    )
    print(f"data: {data}", flush=True)
    results = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
        },
        "data": data,
        "image_size": args.size,
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as workdir:
        os.environ.setdefault("EDGETL_CACHE_DIR", str(Path(workdir) / "cache"))  # not the user's cache
        for name in args.strategies:
            epochs = args.finetune_epochs if name == "finetune" and args.finetune_epochs else args.epochs
            results["runs"].append(edgetl_run(name, data, args.size, epochs, Path(workdir), args.workers))
            print(json.dumps(results["runs"][-1]), flush=True)
    if "path" in data and args.tutorial_epochs > 0:
        tutorial = tutorial_run(args.data, args.size, args.tutorial_epochs)
        results["runs"].append(tutorial)
        print(json.dumps(tutorial), flush=True)
        probe = next((r for r in results["runs"] if r["strategy"] == "linear_probe"), None)
        if probe:
            results["linear_probe_speedup_vs_tutorial_10_epochs"] = round(
                tutorial["ten_epoch_seconds_extrapolated"] / probe["wall_seconds"], 2
            )
    out = ROOT / "results" / args.out
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


def compare(args: argparse.Namespace) -> None:
    """This checkout against `--compare`, strategy by strategy, alternating which goes first."""
    data = {"path": str(args.data), "val_split": 0.15, "test_split": 0.15}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    results = {"machine": {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__}, "data": data}
    results |= {"image_size": args.size, "runs": [], "ratios": {}}
    here = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as workdir:
        for i, name in enumerate(args.strategies):
            epochs = args.finetune_epochs if name == "finetune" and args.finetune_epochs else args.epochs
            order = [("base", args.compare), ("new", here)][:: 1 if (i + args.swap) % 2 == 0 else -1]
            pair = {
                label: compared_run(name, data, args.size, epochs, Path(workdir), code, label) for label, code in order
            }
            for label in pair:
                results["runs"].append(pair[label])
                print(json.dumps(pair[label]), flush=True)
            results["ratios"][name] = round(pair["new"]["images_per_second"] / pair["base"]["images_per_second"], 3)
            print(f"{name}: new/base images/s = {results['ratios'][name]}", flush=True)
    out = ROOT / "results" / args.out
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
