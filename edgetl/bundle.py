"""Bundle stage: the one thing the device needs — the selected model, its contract, its proof.

`RUN_DIR/bundle/` and `RUN_DIR/<name>.tar.gz` hold the selected variant's model file(s),
`edgetl.json` (labels, preprocessing contract, input shape, precision, runtime, the
sha256 of every file, the variant's measured metrics, the recipe, versions) and a short
README. Both are written under temporary names and renamed into place, so a killed build
never leaves a bundle that looks complete.

`edgetl.json` records the sha256 and size of every other file, so the sha256 of its own
bytes covers the whole bundle: `BundleResult.digest`, which a device pins with
`--expect-sha256`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from edgetl import __version__
from edgetl.export import INPUT_NAME, model_files
from edgetl.fileio import atomic_dir, atomic_path
from edgetl.gates import install_command
from edgetl.runtime.bundle import MANIFEST, sha256
from edgetl.runtime.manifest import MULTILABEL_SCHEMA, MULTITASK_SCHEMA
from edgetl.runtime.metrics import VariantMetrics
from edgetl.runtime.preprocess import Preprocessing


@dataclass(frozen=True)
class BundleResult:
    folder: Path
    archive: Path
    manifest: dict
    digest: str  # sha256 of edgetl.json's bytes (the same in the folder and the archive): the bundle's digest


def run(
    variant: VariantMetrics,
    file: Path,
    labels: tuple[str, ...],
    pre: Preprocessing,
    recipe: dict,
    versions: dict,
    run_dir: Path,
) -> BundleResult:
    """Pack the selected `variant` (its artifact is `file`) into `run_dir/bundle` and `run_dir/<name>.tar.gz`,
    where `name` is the recipe's. Raises OutputError when the disk refuses a write.

    >>> row = report.selected_variant()
    >>> run(row, Path("stages/quantize-ab/ort-int8.onnx"), labels, pre, report.recipe, versions, run_dir).archive
    PosixPath('runs/quickstart/quickstart.tar.gz')
    """
    name = recipe["name"]
    folder, archive = run_dir / "bundle", run_dir / f"{name}.tar.gz"
    with atomic_dir(folder) as staging:
        for source in model_files(file):
            shutil.copyfile(source, staging / f"model{source.suffix}")
        model = staging / f"model{file.suffix}"
        manifest = {
            "schema_version": _schema(variant),
            "name": name,
            "model": model.name,
            "runtime": variant.runtime,
            "precision": variant.precision,
            "variant": variant.name,
            "labels": list(labels),
            **_task(variant, labels),
            "preprocessing": pre.to_dict(),
            "input": {"name": INPUT_NAME, "shape": ["batch", 3, pre.input_size, pre.input_size], "dtype": "float32"},
            "metrics": _metrics(variant),
            "recipe": recipe,
            "versions": {"edgetl": __version__, **versions},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (staging / "README.md").write_text(_readme(manifest, variant))
        files = sorted(staging.iterdir())  # every file but the manifest
        manifest["files"] = {p.name: sha256(p) for p in files}
        manifest["sizes"] = {p.name: p.stat().st_size for p in files}  # the device bounds each file before unpacking it
        raw = (json.dumps(manifest, indent=2) + "\n").encode()
        (staging / MANIFEST).write_bytes(raw)
        with atomic_path(archive) as tmp, tarfile.open(tmp, "w:gz") as tar:
            for path in sorted(staging.iterdir()):
                tar.add(path, arcname=f"{name}/{path.name}")
    return BundleResult(folder, archive, manifest, hashlib.sha256(raw).hexdigest())


def _schema(variant: VariantMetrics) -> int:
    """The manifest's schema: 1 for a single-label bundle (as before label sets existed, so older runtimes read
    it), 2 with a multi-label `task`, 3 with several `tasks`."""
    if variant.tasks:
        return MULTITASK_SCHEMA
    return 1 if variant.multilabel is None else MULTILABEL_SCHEMA


def _task(variant: VariantMetrics, labels: tuple[str, ...]) -> dict:
    """A multi-label bundle's `task`: its per-label thresholds, which the runtime applies to the sigmoid of each
    logit (a single-label bundle has none: its manifest is as before multi-label existed); a multi-task bundle's
    `tasks`: each task's name (its model output), kind, labels (`labels` are `task:label`) and thresholds."""
    if variant.tasks:
        return {"tasks": [_one_task(name, row, labels) for name, row in variant.tasks.items()]}
    if variant.multilabel is None:
        return {}
    return {"task": {"kind": "multilabel", "thresholds": variant.multilabel["thresholds"]}}


def _one_task(name: str, row: dict, labels: tuple[str, ...]) -> dict:
    own = [label.removeprefix(f"{name}:") for label in labels if label.startswith(f"{name}:")]
    thresholds = row["multilabel"]["thresholds"] if row["kind"] == "multilabel" else []
    return {"name": name, "kind": row["kind"], "labels": own, "thresholds": thresholds}


def _metrics(variant: VariantMetrics) -> dict:
    """The variant's metrics without its file and confusion matrices (each task's too): they do not serve the
    device, and a matrix grows with the square of the classes (the manifest is bounded)."""
    tasks = variant.tasks and {
        name: {k: v for k, v in row.items() if k != "confusion_matrix"} for name, row in variant.tasks.items()
    }
    return replace(variant, confusion_matrix=None, file=None, tasks=tasks).to_dict()  # None fields are left out


def _readme(manifest: dict, metrics: VariantMetrics) -> str:
    model = f"`{manifest['model']}` ({manifest['variant']}: {manifest['precision']} for {manifest['runtime']})"
    if metrics.multilabel is None:
        kind, measured = "classes", f"accuracy {metrics.accuracy:.4f}, top-1 agreement"
    else:  # the logits' sigmoid against `task.thresholds`, as the runtime applies them
        kind, measured = (
            "labels (multi-label: a sigmoid per label, thresholds in `task`)",
            (f"mAP {metrics.accuracy:.4f}, label-set agreement"),
        )
    return f"""# {manifest["name"]}: edgetl deploy bundle

{model}, {len(manifest["labels"])} {kind}.
Measured at build time on the test split: {measured} with PyTorch FP32
{metrics.agreement:.4f}, p50 latency {metrics.latency_ms.p50:.2f} ms at batch 1, {metrics.size_mb:.2f} MB.

On the device: `{install_command(manifest["runtime"])}` (Python 3.10+), then
`edgetl predict <this bundle> image.jpg` or `edgetl serve <this bundle>`; in Python,
`edgetl.runtime.predictor.Predictor.load(<this bundle>)`.

The model takes `{manifest["input"]["name"]}`, float32 {manifest["input"]["shape"]}, preprocessed as `edgetl.json` says
(`edgetl.runtime.preprocess.preprocess` applies it with numpy and Pillow only), and returns logits.

`edgetl.json` holds the labels, the preprocessing contract (resize, crop, interpolation, mean,
std) and the sha256 and size of every file; the runtime checks them, and the labels and contract
stored inside the model file, on load. The sha256 of `edgetl.json` is the bundle's digest: pin it
with `edgetl serve|predict|info BUNDLE --expect-sha256 DIGEST`.
"""
