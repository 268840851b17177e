"""What each INT8 method buys: agreement with FP32 (test and val), accuracy drop, latency as a
ratio to ONNX Runtime FP32 (interleaved in one run) and quantization seconds, per model.

Usage (each step resumable; heavy, so under the shared lock):
    flock /work/bench.lock nice python benchmarks/int8_ablation.py --model lp --workdir runs/abl-linear_probe --rows ort
    ... --rows ov, then --rows latency (times every made file against ORT FP32 and writes the JSON)

Models: `lp` and `ft` are EfficientNet-Lite0 at 224 px on cifar10-dev, linear probe (10 epochs)
and fine-tuned (3 epochs), trained on `train` (the recipe's val split carved from it) and
tested on cifar10-dev's `val` folder; `digits` is the quickstart recipe (96 px). Each model is
trained once (the build's stage cache under --workdir); the FP32 logits are cached there, and
so is each row (its file and figures), so a row is made once. Rows are QuantVariant options,
run through the product's `run_variant` (one row, `nncf-onnx-perchannel`, calls NNCF with its
CPU defaults, which quantize the depthwise convs' inputs per channel, to show what that costs
in ONNX Runtime). Results: benchmarks/results/int8_ablation.json, one entry per model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from edgetl import data, models
from edgetl.environment import describe
from edgetl.export import ExportResult
from edgetl.infer import accuracy, engine_logits
from edgetl.pipeline import build
from edgetl.quantize import Inputs, QuantizedArtifact, run_variant
from edgetl.recipe import QuantVariant, Recipe
from edgetl.runtime.bench import interleaved_latency
from edgetl.runtime.engines import open_engine
from edgetl.runtime.preprocess import normalize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_quantize import cifar_recipe, digits_recipe  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "int8_ablation.json"
ALL = 1_000_000  # calibration_images: every training image (the quantizer notes the shortfall)
ORT = {"runtime": "onnxruntime"}
NNCF_ORT = {"runtime": "onnxruntime", "engine": "nncf"}
OV = {"runtime": "openvino"}
ROWS = {
    "ort": {
        "ort-qs (baseline)": ORT,
        "ort-qs cal 1000": {**ORT, "calibration_images": 1000},
        "ort-qs cal all": {**ORT, "calibration_images": ALL},
        "ort-qs entropy": {**ORT, "calibration_method": "entropy"},
        "ort-qs percentile": {**ORT, "calibration_method": "percentile"},
        "ort-qs no float layers": {**ORT, "keep_float": []},
        "nncf-onnx": NNCF_ORT,
        "nncf-onnx perchannel-acts": {**NNCF_ORT, "name": "nncf-onnx-perchannel"},
        "nncf-onnx full-bc": {**NNCF_ORT, "bias_correction": "full"},
        "nncf-onnx mixed": {**NNCF_ORT, "preset": "mixed"},
        "nncf-onnx quantile": {**NNCF_ORT, "activation_ranges": "quantile"},
        "nncf-onnx histogram": {**NNCF_ORT, "activation_ranges": "histogram"},
        "nncf-onnx 7-bit weights": {**NNCF_ORT, "overflow_fix": "enable"},
        "nncf-onnx 8-bit weights": {**NNCF_ORT, "overflow_fix": "disable"},
    },
    "ov": {
        "ov (baseline)": OV,
        "ov cal 1000": {**OV, "calibration_images": 1000},
        "ov cal all": {**OV, "calibration_images": ALL},
        "ov full-bc": {**OV, "bias_correction": "full"},
        "ov mixed": {**OV, "preset": "mixed"},
        "ov quantile": {**OV, "activation_ranges": "quantile"},
        "ov histogram": {**OV, "activation_ranges": "histogram"},
        "ov 7-bit weights": {**OV, "overflow_fix": "enable"},
        "ov 8-bit weights": {**OV, "overflow_fix": "disable"},
    },
}


# at 224 px on a shared 2-core machine every row costs a minute: cifar runs the rows that decide
CIFAR_ROWS = [
    "ort-qs (baseline)",
    "ort-qs cal 1000",
    "nncf-onnx",
    "nncf-onnx full-bc",
    "nncf-onnx mixed",
    "nncf-onnx histogram",
    "nncf-onnx 7-bit weights",
    "ov (baseline)",
    "ov cal 1000",
    "ov full-bc",
    "ov mixed",
    "ov histogram",
    "ov 7-bit weights",
]


def recipe_for(model: str, workdir: Path) -> Recipe:
    if model == "digits":
        return digits_recipe([])
    return cifar_recipe(workdir, "linear_probe" if model == "lp" else "finetune", 10 if model == "lp" else 3, [])


def trained(recipe: Recipe, workdir: Path) -> tuple[ExportResult, Inputs, dict]:
    """The build without variants (cached after the first run): its export, the quantizers' inputs, report.json."""
    report = build(recipe, workdir / "run").report.to_dict()
    folders = sorted((workdir / "run" / "stages").glob("export-*"), key=lambda f: f.stat().st_mtime)
    spec = models.REGISTRY.get(recipe.model.backbone)
    pre = spec.preprocessing(recipe.data.image_size, recipe.data.crop_pct, recipe.data.decode)
    return (
        ExportResult.load(folders[-1]),
        Inputs(data.run(recipe.data, pre, recipe.seed), pre, recipe.seed, None),
        report,
    )


def logits_of(file: Path, runtime: str, inputs: Inputs) -> dict[str, np.ndarray]:
    engine = open_engine(file, runtime)
    return {split: engine_logits(engine, inputs.dataset.split(split).images, inputs.pre) for split in ("test", "val")}


def fp32_logits(export: ExportResult, inputs: Inputs, folder: Path) -> dict[str, np.ndarray]:
    cached = folder / "fp32_logits.npz"
    if not cached.exists():
        np.savez(cached, **logits_of(export.onnx, "onnxruntime", inputs))
    return dict(np.load(cached))


def nncf_cpu_defaults(export: ExportResult, out: Path, inputs: Inputs, variant: QuantVariant) -> QuantizedArtifact:
    """NNCF's ONNX quantization with its own CPU activation settings (per-channel depthwise inputs)."""
    import nncf
    import onnx

    from edgetl.quantize.nncf_ptq import options

    model = onnx.load(str(export.onnx))
    name = model.graph.input[0].name
    images = inputs.dataset.train.images[
        np.sort(np.random.default_rng(inputs.seed).permutation(len(inputs.dataset.train.labels))[:300])
    ]
    batches = [normalize(images[i : i + 1], inputs.pre) for i in range(len(images))]
    settings = options(variant)
    settings["advanced_parameters"].activations_quantization_params = None
    started = time.monotonic()
    quantized = nncf.quantize(model, nncf.Dataset(batches, lambda b: {name: b}), subset_size=len(batches), **settings)
    file = out / "nncf-onnx-perchannel.onnx"
    onnx.save(quantized, str(file))
    return QuantizedArtifact("nncf-onnx-perchannel", "onnxruntime", "int8", file, [], time.monotonic() - started, 300)


def make_row(label: str, options: dict, export: ExportResult, inputs: Inputs, folder: Path, reference: dict) -> dict:
    out = folder / label.replace(" ", "_").replace("(", "").replace(")", "")
    if (out / "row.json").exists():
        return json.loads((out / "row.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    variant = QuantVariant.model_validate(options)
    try:
        if variant.name == "nncf-onnx-perchannel":
            artifact = nncf_cpu_defaults(export, out, inputs, variant)
        else:
            artifact = run_variant(export, variant, out, inputs)
    except Exception as exc:  # a method that fails here is a row of the table too
        row = {"row": label, "options": options, "runtime": variant.runtime, "error": f"{type(exc).__name__}: {exc}"}
        (out / "row.json").write_text(json.dumps(row, indent=2))
        print(f"{label:28s} failed: {row['error']}", flush=True)
        return row
    logits = logits_of(artifact.file, variant.runtime, inputs)
    row = {"row": label, "options": options, "runtime": variant.runtime, "file": str(artifact.file)}
    row["quantize_seconds"] = round(artifact.seconds, 1)
    row["calibration_images"] = artifact.calibration_images
    for split in ("test", "val"):
        labels = inputs.dataset.split(split).labels
        row[f"agreement_{split}"] = round(float((logits[split].argmax(1) == reference[split].argmax(1)).mean()), 4)
        row[f"accuracy_drop_{split}_points"] = round(
            100 * (accuracy(reference[split], labels) - accuracy(logits[split], labels)), 2
        )
    row["float_layers"] = artifact.float_layers
    row["notes"] = artifact.notes_text()
    (out / "row.json").write_text(json.dumps(row, indent=2))
    print(
        f"{label:28s} agree test {row['agreement_test']:.4f} val {row['agreement_val']:.4f} drop test "
        f"{row['accuracy_drop_test_points']:+.2f} pt  {row['quantize_seconds']:.0f} s",
        flush=True,
    )
    return row


def latency(rows: list[dict], export: ExportResult, inputs: Inputs) -> dict[str, float]:
    """p50 ms of every row's file and the FP32 files, interleaved in one run, as ratios to ORT FP32."""
    example = normalize(inputs.dataset.test.images[:1], inputs.pre)
    files = {"onnx-fp32": (export.onnx, "onnxruntime"), "ov-fp32": (export.openvino, "openvino")}
    files.update({row["row"]: (Path(row["file"]), row["runtime"]) for row in rows if "error" not in row})
    engines = {name: open_engine(file, runtime) for name, (file, runtime) in files.items()}
    timings = interleaved_latency(
        {n: (lambda e=e: e.run(example)) for n, e in engines.items()}, rounds=10, runs_per_round=10
    )
    base = timings["onnx-fp32"]["p50"]
    return {
        name: {"p50_ms": round(t["p50"], 3), "vs_ort_fp32": round(t["p50"] / base, 3)} for name, t in timings.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["lp", "ft", "digits"], required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument(
        "--rows",
        choices=["ort", "ov", "latency", "table"],
        required=True,
        help="latency: time the made rows and write the JSON; table: write it without timing",
    )
    parser.add_argument("--only", nargs="*", help="row labels to make (default: the group's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for noisy in ("nncf", "edgetl"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args.workdir.mkdir(parents=True, exist_ok=True)
    recipe = recipe_for(args.model, args.workdir)
    export, inputs, report = trained(recipe, args.workdir)
    folder = args.workdir / "ablation"
    folder.mkdir(exist_ok=True)
    reference = fp32_logits(export, inputs, folder)
    if args.rows != "latency":
        for label, options in ROWS[args.rows].items():
            wanted = args.only or (CIFAR_ROWS if args.model != "digits" else list(ROWS[args.rows]))
            if label in wanted:
                make_row(label, options, export, inputs, folder, reference)
        return
    rows = [json.loads(p.read_text()) for p in sorted(folder.glob("*/row.json"))]
    order = [label for group in ROWS.values() for label in group]
    rows.sort(key=lambda r: order.index(r["row"]))
    timed = latency(rows, export, inputs) if args.rows == "latency" else {}
    for row in rows:
        if "error" not in row and timed:
            row.update(latency_p50_ms=timed[row["row"]]["p50_ms"], latency_vs_ort_fp32=timed[row["row"]]["vs_ort_fp32"])
    environment = describe()
    result = {
        "cpu_model": environment["cpu_model"],
        "cpu_flags": {k: v for k, v in environment["cpu_flags"].items() if v},
        "cores": environment["cores"],
        "image_size": recipe.data.image_size,
        "strategy": recipe.train.strategy,
        "epochs": recipe.train.epochs,
        "test_images": len(inputs.dataset.test.labels),
        "val_images": len(inputs.dataset.val.labels),
        "fp32_accuracy": {s: accuracy(reference[s], inputs.dataset.split(s).labels) for s in ("test", "val")},
        "fp32_latency": {k: timed[k] for k in ("onnx-fp32", "ov-fp32") if timed},
        "rows": [{k: v for k, v in row.items() if k != "file"} for row in rows],
    }
    everything = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    everything[args.model] = result
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(everything, indent=2) + "\n")
    for row in rows:
        if "error" in row:
            print(f"{row['row']:28s} failed: {row['error'][:100]}")
            continue
        print(
            f"{row['row']:28s} agree test {row['agreement_test']:.4f} val {row['agreement_val']:.4f} "
            f"drop {row['accuracy_drop_test_points']:+.2f} pt  {row.get('latency_vs_ort_fp32', float('nan')):.2f}x  "
            f"{row['quantize_seconds']:.0f} s"
        )
    print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
