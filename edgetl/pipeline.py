"""The build, stage by stage: data → train → export (+ parity) → quantize → validate → gates → report → bundle.

Each stage is a function with typed inputs and outputs; this module only wires them
together, keys each expensive stage in the stage cache (`edgetl.cache`) and writes the
run folder. The outputs that say "this build is done" are removed when a build starts
(with the temporaries a killed build left) and written last, each atomically, in this
order: bundle/, the archive, report.md, report.html and report.json, so no report says
"passed" before the bundle and archive are complete, and report.json means "done".
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from edgetl import __version__, bundle, data, environment, export, gates, models, quantize, report, train, validate
from edgetl.adapt import DomainAdversary, adabn
from edgetl.cache import StageCache, file_digest, key
from edgetl.distill import Distiller, Teacher
from edgetl.errors import GateFailure, RecipeError
from edgetl.fileio import atomic_path, remove_temporaries, write_json
from edgetl.recipe import QuantVariant, Recipe, TrainConfig
from edgetl.runtime.engines import RUNTIMES, is_installed
from edgetl.runtime.preprocess import Preprocessing

log = logging.getLogger(__name__)
REPORT_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class BuildResult:
    run_dir: Path
    metrics: dict
    report: dict  # {} when built with train_only


@dataclass(frozen=True)
class _Trained:
    """The train stage's folder; the model is loaded only when a later stage needs it."""

    folder: Path
    summary: dict  # history, best_epoch, val/test accuracy, train_seconds, notes
    key: str  # later stages key on it: a different model means a different export

    @cached_property
    def model(self) -> models.TransferModel:
        return models.load_checkpoint(self.checkpoint).model

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoint.pt"

    def saved_logits(self, split: str) -> np.ndarray | None:
        """The model's PyTorch logits on `split` (val, test), saved by the stage that made it."""
        file = self.folder / f"{split}_logits.npy"
        return np.load(file) if file.is_file() else None


def build(recipe: Recipe, run_dir: Path, resume: bool = False, force: bool = False, train_only: bool = False) -> BuildResult:
    """Run every stage of `recipe` into `run_dir`; raise GateFailure (after writing the report) when no variant passes the gates.

    Raises RecipeError, DataError, ModelError, ExportError, InferenceError, OutputError (a write the disk refused).

    >>> build(load_recipe(Path("recipes/quickstart.yaml")), Path("runs/quickstart")).report["selected"]["name"]
    'ort-int8'
    """
    started = time.monotonic()
    run_dir.mkdir(parents=True, exist_ok=True)
    runtimes, skipped = _available_runtimes(recipe)  # before training: a missing runtime fails fast
    variants, skipped_variants = _runnable_variants(recipe, runtimes)
    _check_device_runtimes(recipe, runtimes)
    _remove_outputs(run_dir, recipe.name)
    cache = StageCache(run_dir / "stages", force)
    spec = models.REGISTRY.get(recipe.model.backbone)
    pre = spec.preprocessing(recipe.data.image_size, recipe.data.crop_pct, recipe.data.decode)
    log.info("backbone %s (%s), input %d px, weights %s", spec.name, spec.arch, pre.input_size, recipe.model.weights)

    _seed_everything(recipe.seed)
    dataset = data.run(recipe.data, pre, recipe.seed)
    log.info("data %s: %s images (train/val/test), %d classes, %d skipped", dataset.origin, "/".join(str(len(dataset.split(s).labels)) for s in data.SPLITS), len(dataset.classes), len(dataset.skipped))

    train_key = key(__version__, recipe.model_dump(mode="json", include={"seed", "model", "train"}), recipe.data.augment, dataset.content_hash)
    student = _TrainJob("train", spec, recipe.model.weights, recipe.model.dropout, recipe.train, recipe.data.augment, pre, dataset)
    trained, transfer = _transfer(cache, train_key, student, recipe, run_dir, resume)
    metrics = _metrics(recipe, spec, pre, dataset, trained.summary, started) | {"transfer": transfer}
    write_json(run_dir / "metrics.json", metrics)
    with atomic_path(run_dir / "checkpoint.pt") as tmp:
        shutil.copyfile(trained.checkpoint, tmp)
    if train_only:  # benchmarks and tests of the training stage alone
        return BuildResult(run_dir, metrics, {})

    timings: dict[str, float] = {}
    transfer_sections = [name for name in ("distill", "adapt") if getattr(recipe, name) is not None]  # unset: the hash of a plain recipe stays as it was
    recipe_hash = recipe.section_hash("seed", "data", "model", "train", "export", *transfer_sections)
    export_key = key(trained.key, recipe.export.model_dump(mode="json"), runtimes)
    exported, parity = _export_stage(cache, export_key, trained, pre, dataset, recipe, runtimes, recipe_hash, timings)
    quantized = [_quantize_stage(cache, key(export_key, v.model_dump(mode="json"), recipe.seed), v, exported, trained, dataset, pre, recipe, timings) for v in variants]

    fp32 = [validate.Artifact("onnx-fp32", "onnxruntime", "fp32", exported.onnx)]
    if exported.openvino is not None:
        fp32.append(validate.Artifact("ov-fp32", "openvino", "fp32", exported.openvino))
    artifacts = fp32 + [validate.Artifact(q.name, q.runtime, q.precision, q.file, q.float_layers, q.notes) for q in quantized]
    validate_key = key(export_key, [a.file.parent.name + "/" + a.file.name for a in artifacts], recipe.measure.model_dump(mode="json"), dataset.content_hash)
    measured = _validate_stage(cache, validate_key, trained, artifacts, dataset, pre, recipe, timings)

    decision = gates.run(measured, recipe.gates, recipe.select, recipe.device.runtimes)
    content = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "edgetl_version": __version__,
        "name": recipe.name,
        "passed": decision.passed,
        "recipe_hash": recipe_hash,
        "recipe": recipe.model_dump(mode="json"),
        "dataset": metrics["dataset"],
        "training": {"strategy": recipe.train.strategy, **trained.summary},
        "transfer": transfer,
        "export": {"opset": exported.opset, "onnx_nodes": exported.node_count, "files": [a.file.name for a in fp32], "parity": parity},
        "quantize": [{k: v for k, v in asdict(q).items() if k != "file"} | {"file": q.file.name} for q in quantized],
        "variants": measured,
        **decision.to_dict(),
        "skipped": skipped + skipped_variants,
        "stages": cache.status,
        "timings": timings,
        "environment": metrics["environment"],
    }
    if decision.passed:  # bundle and archive first: no report may say "passed" before they are complete
        selected = next(a for a in artifacts if a.name == decision.selected)
        row = next(v for v in measured if v["name"] == decision.selected)
        packed = bundle.run(recipe.name, row, selected.file, dataset.classes, pre, content["recipe"],
                            content["environment"]["packages"], run_dir)
        content["selected"]["bundle_sha256"] = packed.digest  # what a device pins with --expect-sha256
        log.info("selected %s (%s); bundle %s (sha256 %s); the device needs `%s`", decision.selected, decision.reason,
                 packed.archive, packed.digest, content["selected"]["install"])
    content["build_seconds"] = round(time.monotonic() - started, 2)
    report.write_reports(content, run_dir)
    write_json(run_dir / "report.json", content)  # last: a report.json means the build is done
    if not decision.passed:
        failures = "\n".join(decision.failures() + [decision.reason])
        raise GateFailure(f"gates failed, no variant can be deployed; report in {run_dir / 'report.html'}:\n{failures}")
    return BuildResult(run_dir, metrics, content)


@dataclass(frozen=True)
class _TrainJob:
    """One model to train: the student, the student alone (for comparison) or the teacher."""

    stage: str  # cache stage name: train | teacher
    spec: models.BackboneSpec
    weights: str
    dropout: float
    config: TrainConfig
    augment: str
    pre: Preprocessing
    dataset: data.Dataset


def _train_stage(cache: StageCache, stage_key: str, job: _TrainJob, recipe: Recipe, run_dir: Path, resume: bool,
                 distiller: Distiller | None = None, target: data.Split | None = None) -> _Trained:
    state_path = run_dir / "state" / f"{job.stage}-{stage_key}.pt"
    if resume and not state_path.is_file():
        log.warning("--resume: no interrupted %s stage of this recipe and data in %s; starting from epoch 1", job.stage, run_dir)

    def make(out: Path) -> None:
        _seed_everything(recipe.seed)  # the head's init must not depend on how much data loading drew
        model = models.build(job.spec, job.weights, len(job.dataset.classes), job.dropout)
        adversary = None
        if target is not None:
            adversary = DomainAdversary(model.head.in_features, recipe.adapt.domain_hidden, recipe.adapt.dann_weight, target.images)
        result = train.run(model, job.dataset, job.config, job.pre, job.augment, recipe.seed, state_path, resume, distiller, adversary)
        log.info("%s %s: best epoch %d, val accuracy %.4f, test accuracy %.4f (%.1fs)", job.stage, job.spec.name, result.best_epoch, result.val_accuracy, result.test_accuracy, result.seconds)
        models.save_checkpoint(out / "checkpoint.pt", result.model, job.spec, job.pre, job.dataset.classes, recipe)
        np.save(out / "test_logits.npy", result.test_logits)
        if result.val_logits is not None:  # None after resuming a snapshot written before they were kept
            np.save(out / "val_logits.npy", result.val_logits)
        summary = {"history": result.history, "best_epoch": result.best_epoch, "val_accuracy": result.val_accuracy, "test_accuracy": result.test_accuracy, "train_seconds": round(result.seconds, 2), "notes": result.notes}
        write_json(out / "train.json", summary)

    label = job.stage + f" {job.spec.name}" * (job.stage == "teacher") + " distilled" * (distiller is not None) + " with DANN" * (target is not None)
    folder = cache.run(job.stage, stage_key, make, label=label)
    state_path.unlink(missing_ok=True)  # the finished stage supersedes the resumable snapshot
    return _Trained(folder, json.loads((folder / "train.json").read_text()), stage_key)


def _transfer(cache: StageCache, train_key: str, student: _TrainJob, recipe: Recipe, run_dir: Path, resume: bool) -> tuple[_Trained, dict]:
    """Train the student, with distillation and domain adaptation when the recipe asks for them.

    Returns the model the later stages ship, and the report's `transfer` section: the
    teacher, student-alone and distilled student side by side, and source-only vs adapted
    accuracy on the target domain. The student alone is the plain train stage, so a build
    without `distill`/`adapt` reuses it from the cache.
    """
    distill, adapt = recipe.distill, recipe.adapt
    target = data.load_unlabeled(adapt.target, student.pre, recipe.data, "adapt.target") if adapt else None
    dann = target if adapt and adapt.method == "dann" else None
    section: dict = {}
    distiller = None
    transfer_key = train_key
    if distill:
        teacher, teacher_key, section["distillation"] = _teacher(cache, recipe, student, run_dir, resume)
        distiller = Distiller(teacher, student.pre, distill.temperature, distill.alpha)
        transfer_key = key(transfer_key, distill.model_dump(mode="json", exclude={"compare", "teacher"}), teacher_key)
    if dann is not None:
        transfer_key = key(transfer_key, adapt.model_dump(mode="json", include={"method", "dann_weight", "domain_hidden"}), dann.fingerprint())
    needs_alone = (distill and distill.compare) or (adapt and adapt.target_labeled and dann is not None)
    alone = _train_stage(cache, train_key, student, recipe, run_dir, resume) if needs_alone or transfer_key == train_key else None
    trained = alone if transfer_key == train_key else _train_stage(cache, transfer_key, student, recipe, run_dir, resume, distiller, dann)
    if distill:
        section["distillation"] |= {
            "student": student.spec.name, "input_size": student.pre.input_size, "temperature": distill.temperature, "alpha": distill.alpha,
            "teacher_logits": "cached" if train.caches_inputs(recipe.train, recipe.data.augment) else "online",
            "student_alone": _accuracies(alone) if distill.compare else None, "student_distilled": _accuracies(trained),
        }
    if adapt:
        source_only = trained if adapt.method == "adabn" else alone  # dann: the student trained without the adversary
        if adapt.method == "adabn":
            trained = _adabn_stage(cache, key(trained.key, "adabn", target.fingerprint()), trained, target, student, recipe)
        section["adaptation"] = {"method": adapt.method, "target_images": len(target.labels), "source_test_accuracy": {"source_only": source_only.summary["test_accuracy"] if source_only else None, "adapted": trained.summary["test_accuracy"]}}
        if adapt.target_labeled:
            labeled = data.load_labeled(adapt.target_labeled, student.dataset.classes, student.pre, recipe.data, "adapt.target_labeled")
            section["adaptation"]["target_accuracy"] = {"images": len(labeled.labels), "source_only": _mean_correct(source_only.model, labeled, student.pre), "adapted": _mean_correct(trained.model, labeled, student.pre)}
        log.info("adaptation %s: %s", adapt.method, section["adaptation"])
    return trained, section


def _teacher(cache: StageCache, recipe: Recipe, student: _TrainJob, run_dir: Path, resume: bool) -> tuple[Teacher, str, dict]:
    """The teacher model, its own preprocessing of the student's training images, its cache key and its report line."""
    config = recipe.distill.teacher
    if config.checkpoint is not None:
        loaded = models.load_checkpoint(config.checkpoint)
        if tuple(loaded.labels) != student.dataset.classes:
            raise RecipeError(f"`distill.teacher.checkpoint` {config.checkpoint} predicts classes {list(loaded.labels)}, but the data has {list(student.dataset.classes)}; use a teacher trained on these classes.")
        spec, pre, model = loaded.spec, loaded.preprocessing, loaded.model
        teacher_data = _teacher_data(recipe, pre, student.dataset)
        teacher_key = key(file_digest(config.checkpoint), recipe.seed, teacher_data.content_hash)
        line = {"source": str(config.checkpoint), "val_accuracy": _mean_correct(model, teacher_data.val, pre), "test_accuracy": _mean_correct(model, teacher_data.test, pre)}
    else:
        spec = models.REGISTRY.get(config.backbone)
        pre = spec.preprocessing(config.image_size, recipe.data.crop_pct, recipe.data.decode)  # the data's framing, at the teacher's size
        teacher_data = _teacher_data(recipe, pre, student.dataset)
        augment = config.augment or recipe.data.augment
        job = _TrainJob("teacher", spec, config.weights, recipe.model.dropout, config.train, augment, pre, teacher_data)
        teacher_key = key(__version__, config.model_dump(mode="json", exclude={"augment"}), recipe.seed, augment, teacher_data.content_hash)
        trained = _train_stage(cache, teacher_key, job, recipe, run_dir, resume)
        model = trained.model
        line = {"source": "trained in this build", **_accuracies(trained), "train_seconds": trained.summary["train_seconds"]}
    log.info("teacher %s at %d px: test accuracy %.4f", spec.name, pre.input_size, line["test_accuracy"])
    return Teacher(model.eval(), pre, teacher_data.train.images), teacher_key, {"teacher": {"backbone": spec.name, "input_size": pre.input_size, **line}}


def _teacher_data(recipe: Recipe, pre: Preprocessing, student_data: data.Dataset) -> data.Dataset:
    """The same splits at the teacher's size; the same seed and listing give the same images in the same order."""
    teacher_data = data.run(recipe.data, pre, recipe.seed)
    if teacher_data.train.sources != student_data.train.sources:
        raise RecipeError("The teacher's and the student's training images differ (an image decoded at one size but not the other); fix or remove the unreadable images listed above.")
    return teacher_data


def _adabn_stage(cache: StageCache, stage_key: str, trained: _Trained, target: data.Split, student: _TrainJob, recipe: Recipe) -> _Trained:
    def make(out: Path) -> None:
        adapted = adabn(trained.model, target.images, student.pre)
        models.save_checkpoint(out / "checkpoint.pt", adapted, student.spec, student.pre, student.dataset.classes, recipe)
        accuracies = {}
        for name in ("val", "test"):
            split = student.dataset.split(name)
            logits = train.predict_logits(adapted, split.images, student.pre)
            np.save(out / f"{name}_logits.npy", logits)
            accuracies[f"{name}_accuracy"] = train.accuracy(logits, split.labels)
        summary = trained.summary | accuracies
        write_json(out / "train.json", summary)

    folder = cache.run("adabn", stage_key, make, label="adapt BatchNorm statistics")
    return _Trained(folder, json.loads((folder / "train.json").read_text()), stage_key)


def _accuracies(trained: _Trained) -> dict:
    return {"val_accuracy": trained.summary["val_accuracy"], "test_accuracy": trained.summary["test_accuracy"]}


def _mean_correct(model: models.TransferModel, split: data.Split, pre: Preprocessing) -> float:
    return train.accuracy(train.predict_logits(model, split.images, pre), split.labels)


def _export_stage(cache: StageCache, stage_key: str, trained: _Trained, pre: Preprocessing, dataset: data.Dataset, recipe: Recipe, runtimes: list[str], recipe_hash: str, timings: dict) -> tuple[export.ExportResult, list[dict]]:
    def make(out: Path) -> None:
        result = export.run(trained.model, pre, dataset.classes, out, recipe.export.opset, recipe_hash, want_openvino="openvino" in runtimes)
        fp32 = [validate.Artifact("onnx-fp32", "onnxruntime", "fp32", result.onnx)]
        if result.openvino is not None:
            fp32.append(validate.Artifact("ov-fp32", "openvino", "fp32", result.openvino))
        parity = validate.parity(trained.model, fp32, dataset.val, pre, recipe.export.parity_tolerance, recipe.measure.threads, trained.saved_logits("val"))
        write_json(out / "export.json", {"opset": result.opset, "node_count": result.node_count, "seconds": round(result.seconds, 2), "parity": parity})

    started = time.monotonic()
    folder = cache.run("export", stage_key, make)
    timings["export_seconds"] = round(time.monotonic() - started, 2)
    facts = json.loads((folder / "export.json").read_text())
    xml = folder / "model.xml"
    return export.ExportResult(folder / "model.onnx", xml if xml.is_file() else None, facts["node_count"], facts["opset"], facts["seconds"]), facts["parity"]


def _quantize_stage(cache: StageCache, stage_key: str, variant: QuantVariant, exported: export.ExportResult, trained: _Trained, dataset: data.Dataset, pre: Preprocessing, recipe: Recipe, timings: dict) -> quantize.QuantizedArtifact:
    def make(out: Path) -> None:
        (made,) = quantize.run(exported, dataset, pre, [variant], out, recipe.seed, recipe.measure.threads, trained.model if variant.method == "qat" else None)
        write_json(out / "quantize.json", {k: v for k, v in asdict(made).items() if k != "file"} | {"file": made.file.name})

    started = time.monotonic()
    folder = cache.run("quantize", stage_key, make, label=f"quantize {variant.display_name}")
    timings[f"quantize_{variant.display_name}_seconds"] = round(time.monotonic() - started, 2)
    facts = json.loads((folder / "quantize.json").read_text())
    return quantize.QuantizedArtifact(**{**facts, "file": folder / facts["file"]})


def _validate_stage(cache: StageCache, stage_key: str, trained: _Trained, artifacts: list[validate.Artifact], dataset: data.Dataset, pre: Preprocessing, recipe: Recipe, timings: dict) -> list[dict]:
    def make(out: Path) -> None:
        write_json(out / "variants.json", validate.run(trained.model, artifacts, dataset.test, pre, recipe.measure, trained.checkpoint, trained.saved_logits("test")))

    started = time.monotonic()
    folder = cache.run("validate", stage_key, make)
    timings["validate_seconds"] = round(time.monotonic() - started, 2)
    return json.loads((folder / "variants.json").read_text())


def _metrics(recipe: Recipe, spec: models.BackboneSpec, pre: Preprocessing, dataset: data.Dataset, summary: dict, started: float) -> dict:
    return {
        "edgetl_version": __version__,
        "recipe": recipe.model_dump(mode="json"),
        "backbone": {"name": spec.name, "arch": spec.arch, "weights": recipe.model.weights, "weights_source": spec.weights},
        "preprocessing": pre.to_dict(),
        "dataset": dataset.summary(),
        "strategy": recipe.train.strategy,
        **summary,
        "build_seconds": round(time.monotonic() - started, 2),
        "environment": {**environment.describe(), "torch_threads": torch.get_num_threads()},
    }


def _remove_outputs(run_dir: Path, name: str) -> None:
    """A build in progress must not show the last build's report or bundle as its own, and the
    temporaries of a killed build (bundle, archive, stage folders, snapshots) go with them."""
    outputs = ("report.json", "report.md", "report.html", f"{name}.tar.gz", "metrics.json", "checkpoint.pt")
    for output in outputs:
        (run_dir / output).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "bundle", ignore_errors=True)
    leftovers = [*remove_temporaries(run_dir, [*outputs, "bundle"]), *remove_temporaries(run_dir / "stages"),
                 *remove_temporaries(run_dir / "state")]
    if leftovers:
        names = ", ".join(p.name for p in leftovers)
        log.info("removed %d temporary file(s) a killed build left: %s", len(leftovers), names)


def _available_runtimes(recipe: Recipe) -> tuple[list[str], list[str]]:
    """Runtimes to validate on. Listed in the recipe: required. Otherwise: the installed ones."""
    if recipe.export.runtimes is not None:
        missing = [r for r in recipe.export.runtimes if not is_installed(r)]
        if missing:
            raise RecipeError(f"`export.runtimes` asks for {missing}, which is not installed; install it (`pip install 'edgetl[train]'`) or remove it from the list.")
        return list(recipe.export.runtimes), []
    skipped = [f"{r} is not installed: its variants were skipped (install it with `pip install 'edgetl[train]'`)" for r in RUNTIMES if not is_installed(r)]
    for line in skipped:
        log.warning(line)
    return [r for r in RUNTIMES if is_installed(r)], skipped


def _check_device_runtimes(recipe: Recipe, runtimes: list[str]) -> None:
    """Before training: the device must have a runtime this build measures variants on.

    Raises RecipeError. The FP32 ONNX file is always measured on ONNX Runtime, so only an
    OpenVINO-only device with OpenVINO missing here (or left out of `export.runtimes`) fails.
    """
    if "onnxruntime" not in recipe.device.runtimes and "openvino" not in runtimes:
        raise RecipeError("`device.runtimes` is [openvino], but this build measures no variant on OpenVINO (not "
                          "installed here, or not in `export.runtimes`); install it (`pip install 'edgetl[train]'`) "
                          "or add onnxruntime to `device.runtimes`.")


def _runnable_variants(recipe: Recipe, runtimes: list[str]) -> tuple[list[QuantVariant], list[str]]:
    """A default variant for a missing runtime is skipped with a line; one the recipe lists is an error."""
    explicit = "quantize" in recipe.model_fields_set
    runnable, skipped = [], []
    for variant in recipe.quantize:
        if variant.runtime in runtimes:
            runnable.append(variant)
        elif explicit:
            raise RecipeError(f"quantize variant {variant.display_name} needs {variant.runtime}, which is not installed or not in `export.runtimes`; install it or remove the variant.")
        else:
            skipped.append(f"quantize variant {variant.display_name} skipped: {variant.runtime} is not available")
            log.warning(skipped[-1])
    return runnable, skipped


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
