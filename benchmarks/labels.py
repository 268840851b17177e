"""Multi-label on real photos: cifar10-dev 2×2 mosaics, EfficientNet-Lite0 at 224 px, one build.

Each mosaic tiles 4 real cifar10-dev photos (32×32 each, drawn at random from one split's pool)
into a 64×64 image labeled with the classes it shows. cifar10-dev/train's photos are split 85/15
into the train and val pools before tiling, so no photo is in both; cifar10-dev/val's photos make
the test mosaics. The mosaics and a CSV manifest (`path,labels,split`, labels `|`-delimited) are
written once into benchmarks/data/ (git-ignored). The build trains `--strategy` (default
partial, 2 stages, cached prefix), exports, quantizes with ONNX Runtime and OpenVINO INT8 (agreement
control on label sets) and validates; the figures: test mAP, micro/macro F1, exact match,
label-set agreement of each INT8 variant with FP32 and its max |Δ probability|, and p50 latency.

`--multitask`: several tasks on one backbone instead: each cifar10-dev photo with two tasks, its
class and its coarse class (animal or vehicle), as a manifest `path,class,coarse,split` (train/val
85/15 from cifar10-dev/train, test cifar10-dev/val); one build at `--size` px; the figures: each
task's test accuracy, each INT8 variant's agreement with FP32 per task (and of both tasks at once),
and the p50 latency of the exported 2-output FP32 model against a single-task model (10 classes)
of the same backbone and size, on each runtime, interleaved in this process.

Usage:
    flock /work/bench.lock nice python benchmarks/labels.py [--strategy linear_probe] [--epochs 8]
    flock /work/bench.lock nice python benchmarks/labels.py --multitask --strategy linear_probe --size 128
Results: benchmarks/results/labels.json, labels-multitask.json (`--results NAME` for another file).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import platform
from pathlib import Path

import numpy as np
from PIL import Image

from edgetl import environment, export, models
from edgetl.pipeline import build
from edgetl.recipe import recipe_from_mapping
from edgetl.runtime.bench import interleaved_latency
from edgetl.runtime.engines import open_engine

ROOT = Path(__file__).resolve().parent
CIFAR = ROOT.parent.parent / "shared" / "datasets" / "cifar10-dev"
DATA = ROOT / "data" / "cifar10-dev-mosaics"


def photos(folder: Path) -> list[tuple[Path, str]]:
    return sorted((path, path.parent.name) for path in folder.glob("*/*.jpg"))


def write_mosaics(out: Path, seed: int = 0) -> Path:
    """The mosaics and their manifest (once); returns the manifest."""
    manifest = out / "labels.csv"
    if manifest.is_file():
        return manifest
    rng = np.random.default_rng(seed)
    train = photos(CIFAR / "train")
    order = rng.permutation(len(train))
    held = round(0.15 * len(train))
    pools = {"val": [train[i] for i in order[:held]], "train": [train[i] for i in order[held:]],
             "test": photos(CIFAR / "val")}  # fmt: skip
    rows = []
    for split, pool in pools.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        for i in range(len(pool)):
            chosen = [pool[j] for j in rng.choice(len(pool), 4, replace=False)]
            mosaic = Image.new("RGB", (64, 64))
            for k, (path, _) in enumerate(chosen):
                mosaic.paste(Image.open(path).convert("RGB").resize((32, 32)), (32 * (k % 2), 32 * (k // 2)))
            name = f"{split}/{i:05d}.png"
            mosaic.save(out / name)
            rows.append({"path": name, "labels": "|".join(sorted({c for _, c in chosen})), "split": split})
    tmp = manifest.with_suffix(".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["path", "labels", "split"])
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(manifest)
    return manifest


def train_section(strategy: str, epochs: int) -> dict:
    train = {"strategy": strategy, "epochs": epochs, "lr": 0.01 if strategy == "linear_probe" else 0.003}
    if strategy != "linear_probe":
        train |= {"backbone_lr_mult": 0.3} | ({"unfreeze": 2} if strategy == "partial" else {"warmup_epochs": 0.5})
    return train


def recipe(manifest: Path, strategy: str, epochs: int):
    raw = {
        "name": "bench-labels",
        "seed": 0,
        "task": "multilabel",
        "data": {"manifest": str(manifest), "image_size": 224, "augment": "none"},
        "model": {"backbone": "efficientnet_lite0", "weights": "pretrained"},
        "train": train_section(strategy, epochs),
        "quantize": [{"runtime": "onnxruntime", "min_agreement": 0.98}, {"runtime": "openvino", "min_agreement": 0.98}],
        "device": {"runtimes": ["onnxruntime", "openvino"]},
    }
    return recipe_from_mapping(raw, manifest.parent / "bench-labels.yaml")


VEHICLES = {"airplane", "automobile", "ship", "truck"}


def write_multitask_manifest(out: Path, seed: int = 0) -> Path:
    """cifar10-dev's photos by absolute path with their class and coarse class (once); returns the manifest."""
    manifest = out / "labels.csv"
    if manifest.is_file():
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    train = photos(CIFAR / "train")
    held = set(np.random.default_rng(seed).permutation(len(train))[: round(0.15 * len(train))].tolist())
    rows = [(p, c, "val" if i in held else "train") for i, (p, c) in enumerate(train)]
    rows += [(p, c, "test") for p, c in photos(CIFAR / "val")]
    tmp = manifest.with_suffix(".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "class", "coarse", "split"])
        writer.writerows([str(p), c, "vehicle" if c in VEHICLES else "animal", split] for p, c, split in rows)
    tmp.replace(manifest)
    return manifest


def multitask_recipe(manifest: Path, strategy: str, epochs: int, size: int):
    raw = {
        "name": "bench-multitask",
        "seed": 0,
        "tasks": [{"name": "class"}, {"name": "coarse"}],
        "data": {"manifest": str(manifest), "image_size": size, "augment": "none"},
        "model": {"backbone": "efficientnet_lite0", "weights": "pretrained"},
        "train": train_section(strategy, epochs),
        "quantize": [{"runtime": "onnxruntime", "min_agreement": 0.98}, {"runtime": "openvino", "min_agreement": 0.98}],
        "device": {"runtimes": ["onnxruntime", "openvino"]},
    }
    return recipe_from_mapping(raw, manifest.parent / "bench-multitask.yaml")


def multitask_latency(workdir: Path, recipe) -> dict:
    """p50 ms at batch 1 of the build's 2-output FP32 files against a single-task export (10 classes) of the same
    backbone and size, each runtime's pair interleaved."""
    spec = models.REGISTRY.get(recipe.model.backbone)
    pre = spec.preprocessing(recipe.data.image_size, recipe.data.crop_pct, recipe.data.decode)
    single_dir = workdir / "single-task"
    single_dir.mkdir(parents=True, exist_ok=True)
    single = export.run(models.build(spec, "pretrained", 10).eval(), pre, tuple(map(str, range(10))), single_dir,
                        recipe.export.opset, "bench", want_openvino=True)  # fmt: skip
    multi = next((workdir / "stages").glob("export-*/model.onnx"))
    x = np.random.default_rng(0).standard_normal((1, 3, pre.input_size, pre.input_size)).astype(np.float32)
    out = {}
    for runtime, multi_file, single_file in (("onnxruntime", multi, single.onnx),
                                              ("openvino", multi.with_suffix(".xml"), single.openvino)):  # fmt: skip
        a, b = open_engine(multi_file, runtime), open_engine(single_file, runtime)
        measured = interleaved_latency(
            {"two_tasks": lambda a=a: a.run(x), "single_task": lambda b=b: b.run(x)}, rounds=20
        )
        p50 = {name: m["p50"] for name, m in measured.items()}
        out[runtime] = {**p50, "ratio": p50["two_tasks"] / p50["single_task"], "outputs": a.output_names}
    return out


def described(report: dict, args: argparse.Namespace, data: str, size: int) -> dict:
    """What every result file starts with: the machine, the data and the training."""
    machine = {"python": platform.python_version(), "cpu_model": environment.describe().get("cpu_model"),
               "threads": report["environment"]["torch_threads"]}  # fmt: skip
    counts = {s: c["total"] for s, c in report["dataset"]["counts"].items()}
    return {"machine": machine, "data": data, "counts": counts, "strategy": args.strategy, "epochs": args.epochs,
            "image_size": size}  # fmt: skip


def write_results(results: dict, name: str) -> None:
    print(json.dumps(results, indent=2))
    out = ROOT / "results" / name
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


def multitask_main(args: argparse.Namespace) -> None:
    manifest = write_multitask_manifest(ROOT / "data" / "cifar10-dev-multitask")
    recipe_ = multitask_recipe(manifest, args.strategy, args.epochs, args.size)
    report = build(recipe_, args.workdir).report.to_dict()
    rows = {v["name"]: v for v in report["variants"]}
    data = "cifar10-dev: class (10) and coarse (animal/vehicle); train/val from cifar10-dev/train, test its val"
    results = {
        **described(report, args, data, args.size),
        "parity": report["export"]["parity"],
        "test_accuracy": {name: t["accuracy"] for name, t in rows["pytorch-fp32"]["tasks"].items()},
        "int8_agreement": {
            name: {"per_task": {t: r["agreement"] for t, r in row["tasks"].items()}, "all_tasks": row["agreement"]}
            for name, row in rows.items()
            if row["precision"] == "int8"
        },
        "latency_ms_p50_batch1": multitask_latency(args.workdir, recipe_),
        "timings": report["timings"],
        "selected": (report.get("selected") or {}).get("name"),
    }
    write_results(results, args.results or "labels-multitask.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=["linear_probe", "partial", "finetune"], default="partial")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--results", default=None, help="file name under benchmarks/results/")
    parser.add_argument("--multitask", action="store_true", help="cifar10-dev class + coarse on one backbone")
    parser.add_argument("--size", type=int, default=128, help="--multitask: input size in px")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("edgetl").setLevel(logging.INFO)
    if args.multitask:
        args.workdir = args.workdir or ROOT / "data" / "multitask-run"
        return multitask_main(args)
    args.workdir = args.workdir or ROOT / "data" / "labels-run"
    args.results = args.results or "labels.json"
    manifest = write_mosaics(DATA)
    report = build(recipe(manifest, args.strategy, args.epochs), args.workdir).report.to_dict()
    rows = {v["name"]: v for v in report["variants"]}
    controls = {q["name"]: q.get("agreement_control") or {} for q in report["quantize"]}
    data = "cifar10-dev 2x2 mosaics (train/val from cifar10-dev/train, test from cifar10-dev/val)"
    results = {
        **described(report, args, data, 224),
        "test": {k: rows["pytorch-fp32"]["multilabel"][k] for k in ("map", "micro_f1", "macro_f1", "exact_match")},
        "per_label_ap": dict(zip(report["dataset"]["classes"], rows["pytorch-fp32"]["multilabel"]["per_label_ap"])),
        "int8": {
            name: {
                "label_set_agreement": row["agreement"],
                "max_abs_prob_delta": row["multilabel"]["max_abs_prob_delta"],
                "map": row["accuracy"],
                "micro_f1": row["multilabel"]["micro_f1"],
                "float_layers_added": len(controls.get(name, {}).get("float_layers_added") or []),
                "control_met": controls.get(name, {}).get("met"),
            }
            for name, row in rows.items()
            if row["precision"] == "int8"
        },
        "latency_ms_p50": {name: row["latency_ms"]["p50"] for name, row in rows.items()},
        "timings": report["timings"],
        "selected": (report.get("selected") or {}).get("name"),
    }
    write_results(results, args.results)


if __name__ == "__main__":
    main()
