"""Export, quantization and validation of EfficientNet-Lite0: time of each stage, accuracy
drop and latency of each variant, measured in one build.

Usage:
    python benchmarks/export_quantize.py                 # cifar10-dev at 224 px (digits when absent)
    python benchmarks/export_quantize.py --data digits   # the quickstart's digits model (96 px)

cifar10-dev: lite0 at 224 px, trained on train (`--strategy linear_probe` or `finetune`,
the fine-tuned model has the larger margins INT8 needs); cifar10-dev's `val` folder is the test
split the validation matrix reports on, and the recipe's val split (accuracy control) is
carved out of train, so the bound is chosen and checked on different images. Variants:
ONNX Runtime INT8 and OpenVINO INT8, each plain and with `max_accuracy_drop: 0.005`, and an
FP16 IR. Latencies are interleaved in one run, so compare them as ratios.
`--workdir DIR` keeps the run folder, so a rerun reuses the trained model from the stage cache.
Results: benchmarks/results/export_quantize[-digits].json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import tempfile
from pathlib import Path

from edgetl.pipeline import build
from edgetl.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parent
CIFAR = ROOT.parent.parent / "shared" / "datasets" / "cifar10-dev"
# --variants budget: the time budget (two INT8 variants, 300 calibration images)
BUDGET_VARIANTS = [{"runtime": "onnxruntime"}, {"runtime": "openvino"}]
VARIANTS = [
    {"runtime": "onnxruntime"},
    {"runtime": "onnxruntime", "name": "ort-int8-ac", "max_accuracy_drop": 0.005},
    {"runtime": "openvino"},
    {"runtime": "openvino", "name": "ov-int8-ac", "max_accuracy_drop": 0.005},
    {"runtime": "openvino", "precision": "fp16"},
]


# (train section, data.augment) per --strategy
TRAINING = {
    "linear_probe": ({"strategy": "linear_probe", "lr": 0.001}, "none"),
    "finetune": ({"strategy": "finetune", "lr": 0.001, "backbone_lr_mult": 0.3, "warmup_epochs": 0.5}, "default"),
}


def cifar_recipe(workdir: Path, strategy: str, epochs: int, variants: list[dict] = VARIANTS) -> Recipe:
    """train → train (val carved from it), cifar10-dev val → test."""
    layout = workdir / "cifar10-dev"
    layout.mkdir(exist_ok=True)
    for split, source in (("train", "train"), ("test", "val")):
        if not (layout / split).exists():
            (layout / split).symlink_to(CIFAR / source)
    train, augment = TRAINING[strategy]
    return Recipe.model_validate(
        {
            "name": "bench-export-cifar",
            "seed": 0,
            "data": {"path": str(layout), "val_split": 0.15, "image_size": 224, "augment": augment},
            "model": {"backbone": "efficientnet_lite0", "weights": "pretrained"},
            "train": {**train, "epochs": epochs},
            "quantize": variants,
        }
    )


def digits_recipe(variants: list[dict] = VARIANTS) -> Recipe:
    quickstart = load_recipe(ROOT.parent / "recipes" / "quickstart.yaml")
    return Recipe.model_validate(
        {**quickstart.model_dump(mode="json"), "name": "bench-export-digits", "quantize": variants}
    )


def forget_all_but_training(run_dir: Path) -> None:
    """Drop the cached export, quantize and validate stages: their times are what is measured."""
    for stage in (run_dir / "stages").glob("*"):
        if not stage.name.startswith(("train-", "teacher-")):
            shutil.rmtree(stage)


def summary(report: dict) -> dict:
    rows = {v["name"]: v for v in report["variants"]}
    # an "int8" variant whose weights all stayed float (accuracy control gave up) is not INT8
    int8 = [
        v for v in report["variants"] if v["precision"] == "int8" and v["size_mb"] < 0.5 * rows["onnx-fp32"]["size_mb"]
    ]
    p50 = {name: row["latency_ms"]["p50"] for name, row in rows.items()}
    best_int8 = min(int8, key=lambda v: v["latency_ms"]["p50"])
    controls = {q["name"]: q.get("agreement_control") or {} for q in report["quantize"]}
    agreement = {
        v["name"]: {
            "test_agreement": v["agreement"],
            "test_accuracy_drop_points": round(100 * v["accuracy_drop"], 2),
            "latency_vs_ort_fp32": round(p50[v["name"]] / p50["onnx-fp32"], 3),
            "float_layers": v["float_layers"],
            "control": {k: controls.get(v["name"], {}).get(k) for k in ("met", "float_layers_added", "start", "reached",
                                                                        "latency_ms", "trials", "checks")},
        }
        for v in report["variants"]
        if v["precision"] == "int8"
    }  # fmt: skip
    return {
        "agreement_control": agreement,
        "parity": [
            {k: p[k] for k in ("name", "agreement", "max_abs_logit_delta", "images")}
            for p in report["export"]["parity"]
        ],
        "best_int8": best_int8["name"],
        "best_int8_latency_vs_ort_fp32": round(p50[best_int8["name"]] / p50["onnx-fp32"], 3),
        "ort_fp32_latency_vs_pytorch": round(p50["onnx-fp32"] / p50["pytorch-fp32"], 3),
        "min_int8_accuracy_drop_points": {
            rt: round(100 * min(v["accuracy_drop"] for v in int8 if v["runtime"] == rt), 2)
            for rt in ("onnxruntime", "openvino")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["cifar", "digits"], default="cifar" if CIFAR.is_dir() else "digits")
    parser.add_argument(
        "--strategy", choices=list(TRAINING), default="linear_probe", help="cifar: how lite0 is trained"
    )
    parser.add_argument("--epochs", type=int, default=10, help="cifar: training epochs")
    parser.add_argument("--workdir", type=Path, help="keep the run here (default: a temporary folder)")
    parser.add_argument(
        "--variants",
        choices=["all", "budget"],
        default="all",
        help="budget: only ort-int8 and ov-int8, timed end to end (issue #3's 2-minute budget)",
    )
    args = parser.parse_args()
    variants = BUDGET_VARIANTS if args.variants == "budget" else VARIANTS
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("edgetl").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        recipe = (
            cifar_recipe(workdir, args.strategy, args.epochs, variants)
            if args.data == "cifar"
            else digits_recipe(variants)
        )
        forget_all_but_training(workdir / "run")
        report = build(recipe, workdir / "run").report.to_dict()
    columns = (
        "name",
        "runtime",
        "precision",
        "size_mb",
        "accuracy",
        "accuracy_ci95",
        "agreement",
        "accuracy_drop",
        "accuracy_drop_ci95",
        "latency_ms",
        "throughput_ips",
        "load_seconds",
        "peak_rss_mb",
        "float_layers",
        "notes",
    )
    results = {
        "machine": {
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "threads": report["environment"]["torch_threads"],
            "cpu_model": report["environment"]["cpu_model"],
            "cpu_flags": report["environment"]["cpu_flags"],
        },
        "data": args.data,
        "strategy": report["recipe"]["train"]["strategy"],
        "test_images": report["variants"][0]["test_images"],
        "val_images": report["dataset"]["counts"]["val"]["total"],
        "image_size": report["recipe"]["data"]["image_size"],
        "train_test_accuracy": report["training"]["test_accuracy"],
        "timings": report["timings"],
        "onnx_nodes": report["export"]["onnx_nodes"],
        "quantize_seconds": {q["name"]: q["seconds"] for q in report["quantize"]},
        "variants": [{k: v[k] for k in columns} for v in report["variants"]],
        "summary": summary(report),
    }
    if args.variants == "budget":
        timings = report["timings"]
        results["export_quantize_validate_seconds"] = round(
            timings["export_seconds"]
            + sum(v for k, v in timings.items() if k.startswith("quantize_"))
            + timings["validate_seconds"],
            1,
        )
    for row in results["variants"]:
        print(
            f"{row['name']:14s} acc {row['accuracy']:.4f} drop {100 * row['accuracy_drop']:+.2f} pts agree "
            f"{row['agreement']:.4f} p50 {row['latency_ms']['p50']:.2f} ms {row['throughput_ips']:.0f} img/s "
            f"{row['size_mb']:.2f} MB"
        )
    print(json.dumps(results["summary"], indent=2))
    suffix = ("" if args.data == "cifar" else "-digits") + ("-budget" if args.variants == "budget" else "")
    out = ROOT / "results" / f"export_quantize{suffix}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
