"""The training half of a build: the student, with distillation from a teacher and domain adaptation.

Each model is a cached train stage (`teacher`, `train`, `adabn`), keyed by everything it
depends on. The student trained alone is the plain train stage, so a build without
`distill`/`adapt` reuses it, and one with them reuses it for the side-by-side comparison.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from edgetl import __version__, data, infer, models, train
from edgetl.adapt import DomainAdversary, adabn_stage
from edgetl.cache import file_digest, key
from edgetl.context import BuildContext, seed_everything
from edgetl.distill import Distiller, Teacher
from edgetl.errors import RecipeError
from edgetl.recipe import TrainConfig
from edgetl.runtime.preprocess import Preprocessing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Transferred:
    """The model the later stages ship, its stage key (a different model means a different export)
    and the report's `transfer` section ({} without distill/adapt)."""

    trained: train.TrainedModel
    key: str
    section: dict


@dataclass(frozen=True)
class _Job:
    """One model to train: the student, the student alone (for comparison) or the teacher."""

    stage: str  # cache stage name: train | teacher
    spec: models.BackboneSpec
    weights: str
    dropout: float
    config: TrainConfig
    augment: str
    pre: Preprocessing
    dataset: data.Dataset


def transfer(ctx: BuildContext) -> Transferred:
    """Train the student, with distillation and domain adaptation when the recipe asks for them.

    Raises RecipeError (a teacher for other classes, a diverging training), DataError, ModelError.
    """
    recipe = ctx.recipe
    train_key = key(
        __version__,
        # the task's kind and the tasks' loss weights shape the model as much as the train section does
        recipe.model_dump(mode="json", include={"seed", "model", "train", "task", "tasks"}),
        recipe.data.augment,
        ctx.dataset.content_hash,
    )
    student = _Job(
        "train",
        ctx.spec,
        recipe.model.weights,
        recipe.model.dropout,
        recipe.train,
        recipe.data.augment,
        ctx.pre,
        ctx.dataset,
    )
    distill, adapt = recipe.distill, recipe.adapt
    target = data.load_unlabeled(adapt.target, ctx.pre, recipe.data, "adapt.target") if adapt else None
    dann = target if adapt and adapt.method == "dann" else None
    section: dict = {}
    distiller, transfer_key = None, train_key
    if distill:
        teacher, teacher_key, section["distillation"] = _teacher(ctx, student)
        distiller = Distiller(teacher, ctx.pre, distill.temperature, distill.alpha)
        transfer_key = key(transfer_key, distill.model_dump(mode="json", exclude={"compare", "teacher"}), teacher_key)
    if dann is not None:
        dann_config = adapt.model_dump(mode="json", include={"method", "dann_weight", "domain_hidden"})
        transfer_key = key(transfer_key, dann_config, dann.fingerprint())
    needs_alone = (distill and distill.compare) or (adapt and adapt.target_labeled and dann is not None)
    shipped_alone = transfer_key == train_key  # no distillation or DANN: the student alone is the model
    alone = _train_stage(ctx, train_key, student, reports=shipped_alone) if needs_alone or shipped_alone else None
    trained = alone if shipped_alone else _train_stage(ctx, transfer_key, student, distiller, dann, reports=True)
    if distill:
        section["distillation"] |= {
            "student": student.spec.name,
            "input_size": ctx.pre.input_size,
            "temperature": distill.temperature,
            "alpha": distill.alpha,
            "teacher_logits": "cached" if train.caches_inputs(recipe.train, recipe.data.augment) else "online",
            "student_alone": _accuracies(alone) if distill.compare else None,
            "student_distilled": _accuracies(trained),
        }
    if adapt:
        trained, transfer_key, section["adaptation"] = _adaptation(ctx, trained, alone, target, transfer_key)
    return Transferred(trained, transfer_key, section)


def _train_stage(
    ctx: BuildContext,
    stage_key: str,
    job: _Job,
    distiller: Distiller | None = None,
    target: data.Split | None = None,
    reports: bool = False,
) -> train.TrainedModel:
    """Train `job` (or reuse its stage); `reports`: this is the model the build ships, whose epochs go to
    `ctx.on_epoch` (a sweep's early stopping must not see the teacher's or the discarded student's)."""
    recipe = ctx.recipe
    state_path = ctx.snapshot_path(job.stage, stage_key)
    if ctx.resume and ctx.dist.is_main and not state_path.is_file():
        log.warning(
            "--resume: no interrupted %s stage of this recipe and data in %s; starting from epoch 1",
            job.stage,
            ctx.run_dir,
        )

    def make(out: Path) -> None:
        seed_everything(recipe.seed)  # the head's init must not depend on how much data loading drew
        model = models.build(job.spec, job.weights, len(job.dataset.classes), job.dropout)
        terms: list[train.LossTerm] = [distiller] if distiller is not None else []
        if target is not None:  # built after the model: the head's init draws from the global RNG first
            adapt = recipe.adapt
            terms.append(DomainAdversary(model.head.in_features, adapt.domain_hidden, adapt.dann_weight, target.images))
        on_epoch = ctx.on_epoch if reports else None
        train_job = train.TrainJob(
            job.dataset,
            job.pre,
            job.config,
            job.augment,
            recipe.seed,
            ctx.dist,
            data.cache_root(recipe.data),
            recipe.data.workers,
            on_epoch,
        )
        result = train.run(model, train_job, terms, state_path, ctx.resume)
        log.info(
            "%s %s: best epoch %d, val accuracy %.4f, test accuracy %.4f (%.1fs)",
            job.stage,
            job.spec.name,
            result.best_epoch,
            result.val_accuracy,
            result.test_accuracy,
            result.seconds,
        )
        train.save_result(out, result, job.spec, train_job, recipe)

    label = (
        job.stage
        + f" {job.spec.name}" * (job.stage == "teacher")
        + " distilled" * (distiller is not None)
        + " with DANN" * (target is not None)
    )
    folder = ctx.cache.run(job.stage, stage_key, make, label=label)
    if ctx.dist.is_main:  # rank 0 owns the run folder
        state_path.unlink(missing_ok=True)  # the finished stage supersedes the resumable snapshot
    return train.TrainedModel.load(folder)


def _teacher(ctx: BuildContext, student: _Job) -> tuple[Teacher, str, dict]:
    """The teacher model, its own preprocessing of the student's training images, its cache key and its report line."""
    recipe, config = ctx.recipe, ctx.recipe.distill.teacher
    if config.checkpoint is not None:
        loaded = models.load_checkpoint(config.checkpoint)
        if tuple(loaded.labels) != student.dataset.classes:
            raise RecipeError(
                f"`distill.teacher.checkpoint` {config.checkpoint} predicts classes {list(loaded.labels)}, but the "
                "data "
                f"has {list(student.dataset.classes)}; use a teacher trained on these classes."
            )
        spec, pre, model = loaded.spec, loaded.preprocessing, loaded.model
        teacher_data = _teacher_data(ctx, pre, frames=False)
        teacher_key = key(file_digest(config.checkpoint), recipe.seed, teacher_data.content_hash)
        line = {
            "source": str(config.checkpoint),
            "val_accuracy": _accuracy(model, teacher_data.val, pre),
            "test_accuracy": _accuracy(model, teacher_data.test, pre),
        }
    else:
        spec = models.REGISTRY.get(config.backbone)
        # the data's framing and decoding, at the teacher's size
        pre = spec.preprocessing(config.image_size, recipe.data.crop_pct, recipe.data.decode)
        augment = config.augment or recipe.data.augment
        teacher_data = _teacher_data(ctx, pre, train.augments_images(config.train, augment))
        job = _Job("teacher", spec, config.weights, recipe.model.dropout, config.train, augment, pre, teacher_data)
        teacher_key = key(
            __version__,
            config.model_dump(mode="json", exclude={"augment"}),
            recipe.seed,
            augment,
            teacher_data.content_hash,
        )
        trained = _train_stage(ctx, teacher_key, job)
        model = trained.model
        line = {"source": "trained in this build", **_accuracies(trained), "train_seconds": trained.train_seconds}
    log.info("teacher %s at %d px: test accuracy %.4f", spec.name, pre.input_size, line["test_accuracy"])
    teacher = Teacher(model.eval(), pre, teacher_data.train.images, data.cache_root(recipe.data))
    return teacher, teacher_key, {"teacher": {"backbone": spec.name, "input_size": pre.input_size, **line}}


def _teacher_data(ctx: BuildContext, pre: Preprocessing, frames: bool) -> data.Dataset:
    """The same splits at the teacher's size (with train frames when the teacher augments); the same seed
    and listing give the same images in the same order."""
    teacher_data = data.run(ctx.recipe.data, pre, ctx.recipe.seed, frames)
    if teacher_data.train.sources != ctx.dataset.train.sources:
        raise RecipeError(
            "The teacher's and the student's training images differ (an image decoded at one size but not "
            "the other); fix or remove the unreadable images listed above."
        )
    return teacher_data


def _adaptation(
    ctx: BuildContext,
    trained: train.TrainedModel,
    alone: train.TrainedModel | None,
    target: data.Split,
    transfer_key: str,
) -> tuple[train.TrainedModel, str, dict]:
    """AdaBN's stage (dann trained already), and the report's `adaptation` section: source-only vs adapted."""
    adapt = ctx.recipe.adapt
    source_only = trained if adapt.method == "adabn" else alone  # dann: the student trained without the adversary
    if adapt.method == "adabn":
        transfer_key = key(transfer_key, "adabn", target.fingerprint())

        def make(out: Path) -> None:
            adabn_stage(out, trained, target.images, ctx.dataset, ctx.recipe)

        trained = train.TrainedModel.load(
            ctx.cache.run("adabn", transfer_key, make, label="adapt BatchNorm statistics")
        )
    section = {
        "method": adapt.method,
        "target_images": len(target.labels),
        "source_test_accuracy": {
            "source_only": source_only.test_accuracy if source_only else None,
            "adapted": trained.test_accuracy,
        },
    }
    if adapt.target_labeled:
        labeled = data.load_labeled(
            adapt.target_labeled, ctx.dataset.classes, ctx.pre, ctx.recipe.data, "adapt.target_labeled"
        )
        section["target_accuracy"] = {
            "images": len(labeled.labels),
            "source_only": _accuracy(source_only.model, labeled, ctx.pre),
            "adapted": _accuracy(trained.model, labeled, ctx.pre),
        }
    log.info("adaptation %s: %s", adapt.method, section)
    return trained, transfer_key, section


def _accuracies(trained: train.TrainedModel) -> dict:
    return {"val_accuracy": trained.val_accuracy, "test_accuracy": trained.test_accuracy}


def _accuracy(model: models.TransferModel, split: data.Split, pre: Preprocessing) -> float:
    return infer.accuracy(infer.model_logits(model, split.images, pre), split.labels)
