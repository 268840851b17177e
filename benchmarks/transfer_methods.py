"""Distillation, domain adaptation and QAT, each against the simpler path, on real data.

Usage:
    python benchmarks/transfer_methods.py --part adapt     # digits → shifted digits (minutes)
    python benchmarks/transfer_methods.py --part distill   # cifar10-dev, lite2 teacher → lite0 @ 128 px
    python benchmarks/transfer_methods.py --part qat       # QAT vs PTQ on the fine-tuned cifar lite0
    python benchmarks/transfer_methods.py --part all --workdir /tmp/tm   # keep runs (stage cache)

- distill: cifar10-dev train (val carved from it), cifar10-dev `val` as the test split.
  Teacher efficientnet_lite2 at 224 px (partial, trained in the same build); student
  efficientnet_lite0 at 128 px, alone and distilled with the same schedule. Two student
  set-ups: fine-tuned with augmentation (online teacher logits on the student's view) and
  partial without augmentation (cached teacher logits).
- adapt: sklearn's real digits, split in two disjoint halves. Source: one half as is.
  Target: the other half under another "sensor": low contrast on a grey background, blur and
  Gaussian noise (seeded), at several noise levels (`--noise`). Half of the target is the
  unlabeled `adapt.target`, the other half `target_labeled`. Source-only vs AdaBN vs DANN on
  the target's held-out labels, and the share of the source→target gap each recovers.
- qat: the fine-tuned lite0 of `export_quantize.py --data cifar --strategy finetune` (its
  workdir is reused when given as --eq-workdir), OpenVINO INT8 by PTQ and by QAT.
Results: benchmarks/results/transfer_methods.json (each part updates its own key).
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

import numpy as np
from PIL import Image, ImageFilter

from edgetl.pipeline import build, train_model
from edgetl.recipe import Recipe

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from export_quantize import CIFAR, cifar_recipe  # noqa: E402  (a sibling script, not a package)

RESULTS = ROOT / "results" / "transfer_methods.json"
STUDENT_SETUPS = {
    "finetune_augment": (
        {"strategy": "finetune", "lr": 0.001, "backbone_lr_mult": 0.3, "warmup_epochs": 0.5},
        "default",
    ),
    "partial_cached": ({"strategy": "partial", "unfreeze": 2, "lr": 0.001}, "none"),
}


def distill(
    workdir: Path, epochs: int, teacher_epochs: int, setups: list[str], temperature: float, alpha: float
) -> dict:
    layout = workdir / "cifar10-dev"
    layout.mkdir(parents=True, exist_ok=True)
    for split, source in (("train", "train"), ("test", "val")):
        if not (layout / split).exists():
            (layout / split).symlink_to(CIFAR / source)
    teacher = {
        "backbone": "efficientnet_lite2",
        "image_size": 224,
        "train": {"strategy": "partial", "unfreeze": 2, "epochs": teacher_epochs, "lr": 0.001},
        "augment": "default",
    }
    rows = {}
    for setup in setups:
        train, augment = STUDENT_SETUPS[setup]
        recipe = Recipe.model_validate(
            {
                "name": f"bench-distill-{setup}",
                "seed": 0,
                "data": {"path": str(layout), "val_split": 0.15, "image_size": 128, "augment": augment},
                "model": {"backbone": "efficientnet_lite0"},
                "train": {**train, "epochs": epochs},
                "distill": {"teacher": teacher, "temperature": temperature, "alpha": alpha},
            }
        )
        started = time.monotonic()
        metrics = train_model(recipe, workdir / "distill")
        section = metrics["transfer"]["distillation"]
        gain = section["student_distilled"]["test_accuracy"] - section["student_alone"]["test_accuracy"]
        rows[setup] = {
            **section,
            "student_train": train,
            "augment": augment,
            "epochs": epochs,
            "gain_points": round(100 * gain, 2),
            "seconds": round(time.monotonic() - started, 1),
        }
        print(
            f"distill {setup}: teacher {section['teacher']['test_accuracy']:.4f}  alone "
            f"{section['student_alone']['test_accuracy']:.4f}  distilled "
            f"{section['student_distilled']['test_accuracy']:.4f}  gain {100 * gain:+.2f} pt"
        )
    return {"data": "cifar10-dev (test = its val folder, 1,000 images)", "teacher": teacher, "setups": rows}


def shifted(image: Image.Image, rng: np.random.Generator, noise: float) -> Image.Image:
    """The target "sensor": contrast ×0.35 on a grey background, blur, Gaussian noise of σ `noise` grey levels."""
    low = np.asarray(image, np.float32) * 0.35 + 110
    blurred = np.asarray(Image.fromarray(low.astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2)), np.float32)
    return Image.fromarray(np.clip(blurred + rng.normal(0, noise, blurred.shape), 0, 255).astype(np.uint8))


def digit_folders(root: Path, noise: float, size: int = 32) -> tuple[Path, Path, Path]:
    """source/<class>/, target/ (unlabeled) and target_test/<class>/ from disjoint halves of digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(digits.target))
    half = len(order) // 2
    folders = {
        "source": order[:half],
        "target": order[half : half + half // 2],
        "target_test": order[half + half // 2 :],
    }
    for name, indices in folders.items():
        for i in indices:
            image = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((size, size), Image.BILINEAR)
            if name != "source":
                image = shifted(image, rng, noise)
            folder = root / name / ("" if name == "target" else str(digits.target[i]))
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i:04d}.png")
    return root / "source", root / "target", root / "target_test"


def adapt(workdir: Path, epochs: int, noise_levels: list[float], dann_weight: float) -> dict:
    """Per target noise level: source-only vs AdaBN vs DANN on the target's held-out labels."""
    shifts = {}
    for noise in noise_levels:
        source, target, target_test = digit_folders(workdir / f"digits-shift-noise{noise:g}", noise)
        rows = {}
        for method in ("adabn", "dann"):
            recipe = Recipe.model_validate(
                {
                    "name": f"bench-adapt-{method}",
                    "seed": 0,
                    "data": {
                        "path": str(source),
                        "val_split": 0.15,
                        "test_split": 0.15,
                        "image_size": 64,
                        "augment": "none",
                    },
                    "model": {"backbone": "efficientnet_lite0"},
                    "train": {
                        "strategy": "finetune",
                        "epochs": epochs,
                        "lr": 0.001,
                        "backbone_lr_mult": 0.3,
                        "warmup_epochs": 0.5,
                    },
                    "adapt": {
                        "target": str(target),
                        "target_labeled": str(target_test),
                        "method": method,
                        "dann_weight": dann_weight,
                    },
                }
            )
            started = time.monotonic()
            rows[method] = train_model(recipe, workdir / "adapt")["transfer"]["adaptation"] | {
                "seconds": round(time.monotonic() - started, 1)
            }
        source_accuracy = rows["adabn"]["source_test_accuracy"]["source_only"]
        source_only = rows["adabn"]["target_accuracy"]["source_only"]
        gap = source_accuracy - source_only
        summary = {
            "source_accuracy_on_source_test": source_accuracy,
            "source_only_on_target": source_only,
            "gap_points": round(100 * gap, 2),
        }
        for method, row in rows.items():
            adapted = row["target_accuracy"]["adapted"]
            summary[f"{method}_on_target"] = adapted
            summary[f"{method}_gap_recovered"] = (
                round((adapted - row["target_accuracy"]["source_only"]) / gap, 3) if gap > 0 else None
            )
            print(
                f"adapt noise {noise:g} {method}: source-only {row['target_accuracy']['source_only']:.4f} → "
                f"adapted {adapted:.4f} on target (source {source_accuracy:.4f}); gap recovered "
                f"{summary[f'{method}_gap_recovered']}"
            )
        shifts[f"noise_{noise:g}"] = {"methods": rows, "summary": summary}
    return {
        "data": "sklearn digits, disjoint halves; target = contrast ×0.35 on grey 110, Gaussian blur 1.2 px, "
        "Gaussian noise σ (grey levels) at 32 px; 64 px model input",
        "epochs": epochs,
        "dann_weight": dann_weight,
        "shifts": shifts,
    }


def qat(eq_workdir: Path, epochs: int, qat_epochs: int) -> dict:
    base = cifar_recipe(eq_workdir, "finetune", epochs)
    recipe = Recipe.model_validate(
        {
            **base.model_dump(mode="json"),
            "quantize": [
                {"runtime": "onnxruntime"},
                {"runtime": "openvino"},
                {"runtime": "openvino", "method": "qat", "qat_epochs": qat_epochs},
            ],
        }
    )
    report = build(recipe, eq_workdir / "run").report.to_dict()
    rows = {
        v["name"]: {
            k: v[k] for k in ("accuracy", "accuracy_drop", "accuracy_drop_ci95", "agreement", "latency_ms", "size_mb")
        }
        for v in report["variants"]
    }
    for name, row in rows.items():
        print(
            f"qat: {name:14s} acc {row['accuracy']:.4f} drop {100 * row['accuracy_drop']:+.2f} pt agree "
            f"{row['agreement']:.4f} p50 {row['latency_ms']['p50']:.2f} ms"
        )
    notes = {q["name"]: q["notes"] for q in report["quantize"]}
    return {
        "model": "lite0 224 px fine-tuned on cifar10-dev (export_quantize.py --strategy finetune)",
        "qat_epochs": qat_epochs,
        "variants": rows,
        "quantize_notes": notes,
        "quantize_seconds": {q["name"]: q["seconds"] for q in report["quantize"]},
        "qat_drop_not_worse_than_ptq": rows["ov-int8-qat"]["accuracy_drop"] <= rows["ov-int8"]["accuracy_drop"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["distill", "adapt", "qat", "all"], default="all")
    parser.add_argument("--workdir", type=Path, help="keep runs here (default: a temporary folder)")
    parser.add_argument(
        "--eq-workdir",
        type=Path,
        help="qat: the workdir of export_quantize.py --strategy finetune (default: --workdir/eq)",
    )
    parser.add_argument("--epochs", type=int, default=8, help="student epochs (distill), source epochs (adapt)")
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--setups", nargs="+", choices=list(STUDENT_SETUPS), default=list(STUDENT_SETUPS))
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.7)
    parser.add_argument(
        "--noise", type=float, nargs="+", default=[0.0, 4.0, 12.0], help="adapt: target noise levels (σ, grey levels)"
    )
    parser.add_argument("--dann-weight", type=float, default=1.0, help="adapt: the reversal weight DANN ramps up to")
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument(
        "--finetune-epochs",
        type=int,
        default=8,
        help="qat: epochs of the fine-tuned model (must match its workdir to reuse it)",
    )
    parser.add_argument(
        "--write-shift",
        type=Path,
        metavar="DIR",
        help="only write the digits source/target folders (noise σ 4) for recipes/adapt.yaml",
    )
    args = parser.parse_args()
    if args.write_shift:
        print("wrote", *digit_folders(args.write_shift, noise=4.0))
        return
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("edgetl").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        for part in ["adapt", "distill", "qat"] if args.part == "all" else [args.part]:
            if part == "adapt":
                measured = adapt(workdir, args.epochs, args.noise, args.dann_weight)
            elif part == "distill":
                measured = distill(workdir, args.epochs, args.teacher_epochs, args.setups, args.temperature, args.alpha)
            else:
                measured = qat(args.eq_workdir or workdir / "eq", args.finetune_epochs, args.qat_epochs)
            results = (
                json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
            )  # read late: parts may run in parallel
            results |= {
                "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
                part: measured,
            }
            RESULTS.parent.mkdir(exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
