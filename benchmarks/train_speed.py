"""Training speed and accuracy of each strategy against a plain PyTorch tutorial loop.

Usage: python benchmarks/train_speed.py [--data DIR] [--size 224] [--epochs 10] [--tutorial-epochs 2]

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
import platform
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


def edgetl_run(name: str, data: dict, size: int, epochs: int, workdir: Path) -> dict:
    train, augment = STRATEGIES[name]
    recipe = Recipe.model_validate(
        {
            "name": f"bench-{name}",
            "seed": 0,
            "data": {**data, "image_size": size, "augment": augment},
            "model": {"backbone": "efficientnet_lite0", "weights": "pretrained"},
            "train": {"epochs": epochs, "batch_size": 32, **train},
            "quantize": [],
        }
    )
    started = time.monotonic()
    metrics = train_model(recipe, workdir / name)
    wall = time.monotonic() - started
    train_images = metrics["dataset"]["counts"]["train"]["total"]
    return {
        "strategy": name,
        "augment": augment,
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
    parser.add_argument("--out", default="train_speed.json", help="file name under benchmarks/results/")
    args = parser.parse_args()
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
        for name in args.strategies:
            results["runs"].append(edgetl_run(name, data, args.size, args.epochs, Path(workdir)))
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


if __name__ == "__main__":
    main()
