"""The build, stage by stage: data → train → export (+ parity) → quantize → validate → gates → report → bundle.

`build` reads top to bottom as the list of stages; each stage is a function of the build
context (`edgetl.context`) and of what the stage before it made, keyed in the stage cache
(`edgetl.cache`) and saving its own files (each result type has `save`/`load`). The outputs
that say "this build is done" are removed when a build starts (with the temporaries a killed
build left) and written last, each atomically, in this order: bundle/, the archive,
report.md, report.html and report.json, so no report says "passed" before the bundle and
archive are complete, and report.json means "done".
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from edgetl import (
    __version__,
    bundle,
    data,
    environment,
    export,
    gates,
    models,
    multitask,
    quantize,
    report,
    train,
    validate,
)
from edgetl.build_report import BuildReport, ExportSummary
from edgetl.cache import StageCache, key
from edgetl.context import BuildContext, seed_everything
from edgetl.errors import GateFailure
from edgetl.fileio import atomic_path, remove_temporaries, write_json
from edgetl.plan import Plan, plan
from edgetl.recipe import QuantVariant, Recipe
from edgetl.train import distributed
from edgetl.transfer import Transferred, transfer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildResult:
    run_dir: Path
    metrics: dict
    report: BuildReport


@dataclass(frozen=True)
class _Made:
    """What the stages made, for the report."""

    transferred: Transferred
    metrics: dict
    recipe_hash: str
    exported: export.ExportResult
    quantized: list[quantize.QuantizedArtifact]
    measured: validate.Validation


def build(
    recipe: Recipe,
    run_dir: Path,
    resume: bool = False,
    force: bool = False,
    *,
    stage_root: Path | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> BuildResult | None:
    """Run every stage of `recipe` into `run_dir`; raise GateFailure (after writing the report) when no variant passes.

    Under torchrun every process trains; rank 0 alone goes on to export, quantize, validate, report and
    bundle, and the others return None once training is done. A sweep's trials pass one `stage_root` (a
    stage cache shared between processes, so trials that differ only after training reuse its model) and
    `on_epoch` (called with each training epoch's history row).
    Raises RecipeError, DataError, ModelError, ExportError, InferenceError, OutputError (a write the disk refused),
    DistributedError (another training process died).

    >>> build(load_recipe(Path("recipes/quickstart.yaml")), Path("runs/quickstart")).report.selected.name
    'ort-int8'
    """
    started = time.monotonic()
    dist = distributed.setup(recipe.train.device)
    plan = _plan(recipe, run_dir, dist)  # before training: a missing runtime fails fast
    ctx = _context(recipe, run_dir, resume, _stage_cache(run_dir, force, dist, stage_root), dist, on_epoch)
    transferred = _transfer(ctx)
    if transferred is None:  # a rank other than 0: its part is done
        return None
    metrics = _save_training(ctx, transferred, started)
    recipe_hash = _recipe_hash(recipe)
    export_key = key(transferred.key, recipe.export.model_dump(mode="json"), plan.runtimes)
    exported = _export_stage(ctx, transferred.trained, export_key, plan.runtimes, recipe_hash)
    quantized = [_quantize_stage(ctx, exported, transferred.trained, variant, export_key) for variant in plan.variants]
    artifacts = _artifacts(exported, quantized)
    measured = _validate_stage(ctx, transferred.trained, artifacts, export_key)
    decision = gates.run(
        measured.variants, recipe.gates, recipe.select, recipe.device.runtimes, _agreement_bounds(plan.variants)
    )
    made = _Made(transferred, metrics, recipe_hash, exported, quantized, measured)
    content = _report(ctx, plan, made, decision)
    if decision.passed:  # bundle and archive first: no report may say "passed" before they are complete
        content = _bundle(ctx, content, next(a for a in artifacts if a.name == decision.selected), decision.reason)
    content = replace(content, build_seconds=round(time.monotonic() - started, 2))
    report.write_reports(content, run_dir)
    write_json(run_dir / "report.json", content.to_dict())  # last: a report.json means the build is done
    if not decision.passed:
        failures = "\n".join(decision.failures() + [decision.reason])
        raise GateFailure(f"gates failed, no variant can be deployed; report in {run_dir / 'report.html'}:\n{failures}")
    return BuildResult(run_dir, metrics, content)


def _agreement_bounds(variants: list[QuantVariant]) -> dict[str, tuple[float, bool]]:
    """Each quantized variant's `min_agreement` and whether the recipe lets it be selected below it. The default
    bound holds the variants the agreement search works on; QAT, accuracy-controlled and NNCF-QDQ variants are
    held to a bound the recipe sets on them."""
    return {
        v.display_name: (v.min_agreement, v.allow_below_agreement)
        for v in variants
        if v.min_agreement is not None and (quantize.searches_agreement(v) or "min_agreement" in v.model_fields_set)
    }


def train_model(recipe: Recipe, run_dir: Path, resume: bool = False, force: bool = False) -> dict | None:
    """Only the data and train stages of `recipe` (with its distillation and adaptation): metrics.json and
    checkpoint.pt in `run_dir`, for benchmarks and tests of training. Returns metrics.json's content (None on
    a rank other than 0 under torchrun).

    Raises RecipeError, DataError, ModelError, OutputError (a write the disk refused).

    >>> train_model(load_recipe(Path("recipes/quickstart.yaml")), Path("runs/train-only"))["test_accuracy"]
    """
    started = time.monotonic()
    dist = distributed.setup(recipe.train.device)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _remove_outputs(run_dir, recipe.name)
    ctx = _context(recipe, run_dir, resume, _stage_cache(run_dir, force, dist), dist)
    transferred = _transfer(ctx)
    return None if transferred is None else _save_training(ctx, transferred, started)


def _plan(recipe: Recipe, run_dir: Path, dist: distributed.Dist) -> Plan:
    """What this machine builds of `recipe` (`edgetl.plan`); the last build's outputs removed (by rank 0, which
    owns the run folder)."""
    made = plan(recipe)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _remove_outputs(run_dir, recipe.name)
    return made


def _stage_cache(run_dir: Path, force: bool, dist: distributed.Dist, stage_root: Path | None = None) -> StageCache:
    """RUN_DIR/stages, or a sweep's root shared between processes; under torchrun, one whose reuse rank 0 decides."""
    root = stage_root or run_dir / "stages"
    if dist.enabled:
        return distributed.RankCache(root, force, dist, shared=stage_root is not None)
    return StageCache(root, force, shared=stage_root is not None)


def _context(
    recipe: Recipe,
    run_dir: Path,
    resume: bool,
    cache: StageCache,
    dist: distributed.Dist,
    on_epoch: Callable[[dict], None] | None = None,
) -> BuildContext:
    """The backbone, its preprocessing contract and the decoded data: what every later stage shares."""
    spec = models.REGISTRY.get(recipe.model.backbone)
    pre = spec.preprocessing(recipe.data.image_size, recipe.data.crop_pct, recipe.data.decode)
    log.info("backbone %s (%s), input %d px, weights %s", spec.name, spec.arch, pre.input_size, recipe.model.weights)
    seed_everything(recipe.seed)
    started = time.monotonic()
    # Under torchrun every rank loads the data: the disk cache's per-entry lock makes the ranks of one machine
    # decode each split once and the others wait for it, without a collective's timeout on a long first decode.
    frames, multilabel = train.augments_images(recipe.train, recipe.data.augment), recipe.task == "multilabel"
    dataset = data.run(recipe.data, pre, recipe.seed, frames, multilabel, recipe.tasks)
    seconds = round(time.monotonic() - started, 2)
    counts = "/".join(str(len(dataset.split(s).labels)) for s in data.SPLITS)
    log.info(
        "data %s: %s images (train/val/test), %d classes, %d skipped, %d decoded (%.1fs)",
        dataset.origin,
        counts,
        len(dataset.classes),
        len(dataset.skipped),
        dataset.decoded,
        seconds,
    )
    timings = {"data_seconds": seconds}
    return BuildContext(recipe, run_dir, cache, spec, pre, dataset, resume, dist, timings, on_epoch)


def _transfer(ctx: BuildContext) -> Transferred | None:
    """The training half. Under torchrun every rank trains, then leaves the process group: rank 0 alone goes on
    (the others get None), so nothing after training waits on a collective."""
    try:
        transferred = transfer(ctx)
        distributed.shutdown(ctx.dist)
    finally:
        if isinstance(ctx.cache, distributed.RankCache):
            ctx.cache.close()  # rank 0 goes on alone
    return transferred if ctx.dist.is_main else None


def _save_training(ctx: BuildContext, transferred: Transferred, started: float) -> dict:
    """metrics.json and checkpoint.pt: the training record and the model, in the run folder."""
    recipe, spec = ctx.recipe, ctx.spec
    metrics = {
        "edgetl_version": __version__,
        "recipe": recipe.model_dump(mode="json"),
        "backbone": {
            "name": spec.name,
            "arch": spec.arch,
            "weights": recipe.model.weights,
            "weights_source": spec.weights,
        },
        "preprocessing": ctx.pre.to_dict(),
        "dataset": ctx.dataset.summary(),
        "strategy": recipe.train.strategy,
        **transferred.trained.summary(),
        "build_seconds": round(time.monotonic() - started, 2),
        "data_seconds": ctx.timings["data_seconds"],
        "environment": {**environment.describe(), "torch_threads": torch.get_num_threads()},
        "transfer": transferred.section,
    }
    write_json(ctx.run_dir / "metrics.json", metrics)
    with atomic_path(ctx.run_dir / "checkpoint.pt") as tmp:
        shutil.copyfile(transferred.trained.checkpoint, tmp)
    return metrics


def _recipe_hash(recipe: Recipe) -> str:
    """The hash the exported files carry: the sections that shape the model (unset distill/adapt leave it as it was)."""
    transfer_sections = [name for name in ("distill", "adapt", "tasks") if getattr(recipe, name) is not None]
    return recipe.section_hash("seed", "data", "model", "train", "export", *transfer_sections)


def _export_stage(
    ctx: BuildContext, trained: train.TrainedModel, stage_key: str, runtimes: list[str], recipe_hash: str
) -> export.ExportResult:
    """The FP32 ONNX file and IR, each proven against PyTorch on every validation image (parity)."""
    recipe, tasks = ctx.recipe, ctx.dataset.train.tasks

    def make(out: Path) -> None:
        result = export.run(
            multitask.TaskOutputs(trained.model, tasks) if tasks else trained.model,  # one named output per task
            ctx.pre,
            ctx.dataset.classes,
            out,
            recipe.export.opset,
            recipe_hash,
            want_openvino="openvino" in runtimes,
        )
        parity = validate.parity(
            trained.model,
            _fp32_artifacts(result),
            ctx.dataset.val,
            ctx.pre,
            recipe.export.parity_tolerance,
            recipe.measure.threads,
            trained.val_logits,
        )
        replace(result, parity=parity).save(out)

    with ctx.timed("export_seconds"):
        folder = ctx.cache.run("export", stage_key, make)
    return export.ExportResult.load(folder)


def _quantize_stage(
    ctx: BuildContext,
    exported: export.ExportResult,
    trained: train.TrainedModel,
    variant: QuantVariant,
    export_key: str,
) -> quantize.QuantizedArtifact:
    readout = ctx.readout(trained.val_logits)
    inputs = quantize.Inputs(ctx.dataset, ctx.pre, ctx.recipe.seed, ctx.recipe.measure.threads, readout)

    def make(out: Path) -> None:
        model = trained.model if variant.method == "qat" else None
        quantize.run_variant(exported, variant, out, inputs, model).save(out)

    stage_key = key(export_key, variant.model_dump(mode="json"), ctx.recipe.seed)
    with ctx.timed(f"quantize_{variant.display_name}_seconds"):
        folder = ctx.cache.run("quantize", stage_key, make, label=f"quantize {variant.display_name}")
    return quantize.QuantizedArtifact.load(folder)


def _fp32_artifacts(exported: export.ExportResult) -> list[validate.Artifact]:
    fp32 = [validate.Artifact("onnx-fp32", "onnxruntime", "fp32", exported.onnx)]
    if exported.openvino is not None:
        fp32.append(validate.Artifact("ov-fp32", "openvino", "fp32", exported.openvino))
    return fp32


def _artifacts(exported: export.ExportResult, quantized: list[quantize.QuantizedArtifact]) -> list[validate.Artifact]:
    """Every file × runtime the validation matrix measures: the FP32 files, then the quantized variants."""
    made = [validate.Artifact(q.name, q.runtime, q.precision, q.file, q.float_layers, q.notes) for q in quantized]
    return _fp32_artifacts(exported) + made


def _validate_stage(
    ctx: BuildContext, trained: train.TrainedModel, artifacts: list[validate.Artifact], export_key: str
) -> validate.Validation:
    def make(out: Path) -> None:
        baseline = validate.Baseline(
            trained.model, trained.checkpoint, trained.test_logits, ctx.readout(trained.val_logits)
        )
        validate.measure(baseline, artifacts, ctx.dataset.test, ctx.pre, ctx.recipe.measure).save(out)

    files = [a.file.parent.name + "/" + a.file.name for a in artifacts]
    stage_key = key(export_key, files, ctx.recipe.measure.model_dump(mode="json"), ctx.dataset.content_hash)
    with ctx.timed("validate_seconds"):
        folder = ctx.cache.run("validate", stage_key, make)
    return validate.Validation.load(folder)


def _report(ctx: BuildContext, plan: Plan, made: _Made, decision: gates.Decision) -> BuildReport:
    """report.json's content (without build_seconds, and the bundle's digest until it is packed)."""
    recipe, exported = ctx.recipe, made.exported
    fp32_files = [a.file.name for a in _fp32_artifacts(exported)]
    return BuildReport(
        edgetl_version=__version__,
        name=recipe.name,
        passed=decision.passed,
        recipe_hash=made.recipe_hash,
        recipe=recipe.model_dump(mode="json"),
        dataset=made.metrics["dataset"],
        training={"strategy": recipe.train.strategy, **made.transferred.trained.summary()},
        transfer=made.transferred.section,
        export=ExportSummary(exported.opset, exported.node_count, fp32_files, exported.parity),
        quantize=[q.to_json() for q in made.quantized],
        variants=made.measured.variants,
        gates=decision.outcomes,
        selected=decision.selection,
        skipped=plan.skipped,
        stages=ctx.cache.status,
        timings=ctx.timings,
        environment=made.metrics["environment"],
    )


def _bundle(ctx: BuildContext, content: BuildReport, selected: validate.Artifact, reason: str) -> BuildReport:
    """Pack the selected variant into bundle/ and the archive; the report gains the bundle's digest."""
    packed = bundle.run(
        content.selected_variant(),
        selected.file,
        ctx.dataset.classes,
        ctx.pre,
        content.recipe,
        content.environment["packages"],
        ctx.run_dir,
    )
    log.info(
        "selected %s (%s); bundle %s (sha256 %s); the device needs `%s`",
        selected.name,
        reason,
        packed.archive,
        packed.digest,
        content.selected.install,
    )
    # the digest is what a device pins with --expect-sha256
    return replace(content, selected=replace(content.selected, bundle_sha256=packed.digest))


def _remove_outputs(run_dir: Path, name: str) -> None:
    """A build in progress must not show the last build's report or bundle as its own, and the
    temporaries of a killed build (bundle, archive, stage folders, snapshots) go with them."""
    outputs = ("report.json", "report.md", "report.html", f"{name}.tar.gz", "metrics.json", "checkpoint.pt")
    for output in outputs:
        (run_dir / output).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "bundle", ignore_errors=True)
    leftovers = [
        *remove_temporaries(run_dir, [*outputs, "bundle"]),
        *remove_temporaries(run_dir / "stages"),
        *remove_temporaries(run_dir / "state"),
    ]
    if leftovers:
        names = ", ".join(p.name for p in leftovers)
        log.info("removed %d temporary file(s) a killed build left: %s", len(leftovers), names)
