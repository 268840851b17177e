"""Distillation and domain adaptation, on tiny real photo crops (two classes, 32-48 px)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_folder, write_recipe
from PIL import Image, ImageOps

from edgetl import data, models, pipeline, train
from edgetl.adapt import DomainAdversary, adabn
from edgetl.distill import Distiller, Teacher, kd_loss
from edgetl.errors import DataError, RecipeError
from edgetl.infer import model_logits
from edgetl.recipe import load_recipe
from edgetl.runtime.preprocess import normalize
from edgetl.train import LossTerm, TrainBatch

pytestmark = pytest.mark.slow  # whole builds: `pytest -m 'not slow'` skips them

FAST = """
measure: {latency_rounds: 2, latency_runs: 3, warmup: 2, throughput_batch: 4}
quantize: []
"""


def _recipe(
    tmp_path: Path,
    images: Path,
    body: str,
    student_train: str = "{strategy: linear_probe, epochs: 3, batch_size: 8, lr: 0.01}",
    augment: str = "none",
) -> Path:
    return write_recipe(
        tmp_path / "recipe.yaml",
        f"""
name: transfer
data: {{path: {images}, val_split: 0.2, test_split: 0.2, image_size: 32, augment: {augment}}}
model: {{backbone: efficientnet_lite0}}
train: {student_train}
{body}
{FAST}""",
    )


def _head(checkpoint: Path) -> torch.Tensor:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]["head.weight"]


def _inverted(source: Path, target: Path) -> Path:
    """The same classes under a different sensor look: colour-inverted, lower contrast."""
    for path in source.rglob("*.*"):
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        ImageOps.invert(Image.open(path).convert("RGB")).point(lambda v: 64 + v // 2).save(out)
    return target


def test_distillation_trains_the_teacher_first_and_reports_teacher_alone_and_distilled(
    tmp_path: Path, image_folder: Path
) -> None:
    teacher = (
        "{backbone: efficientnet_lite0, image_size: 48, "
        "train: {strategy: linear_probe, epochs: 3, batch_size: 8, lr: 0.01}}"
    )
    recipe = _recipe(tmp_path, image_folder, f"distill: {{teacher: {teacher}, temperature: 2.0, alpha: 0.9}}")
    result = pipeline.build(load_recipe(recipe), tmp_path / "run")

    distill = result.report.transfer["distillation"]
    assert distill["teacher"]["backbone"] == "efficientnet_lite0" and distill["teacher"]["input_size"] == 48
    assert distill["teacher_logits"] == "cached"  # linear probe: fixed inputs, one teacher pass
    assert set(distill["student_alone"]) == set(distill["student_distilled"]) == {"val_accuracy", "test_accuracy"}
    stages = result.report.stages
    assert stages["teacher efficientnet_lite0"] == stages["train"] == stages["train distilled"] == "built"
    (teacher_checkpoint,) = (tmp_path / "run" / "stages").glob("teacher-*/checkpoint.pt")
    alone_checkpoint = next(
        p
        for p in (tmp_path / "run" / "stages").glob("train-*/checkpoint.pt")
        if not torch.equal(_head(p), _head(tmp_path / "run" / "checkpoint.pt"))
    )
    assert alone_checkpoint.is_file()  # the shipped student is the distilled one, not the student alone
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert (
        "| teacher efficientnet_lite0 @ 48 px |" in markdown
        and "| student distilled efficientnet_lite0 @ 32 px |" in markdown
    )
    assert "Distillation (T = 2.0, alpha = 0.9" in (tmp_path / "run" / "report.html").read_text()

    # Another run's checkpoint as the teacher; an augmenting student gets online teacher logits.
    other = tmp_path / "other"
    other.mkdir()
    recipe = _recipe(
        other,
        image_folder,
        f"distill: {{teacher: {{checkpoint: {teacher_checkpoint}}}, compare: false}}",
        "{strategy: partial, unfreeze: 1, epochs: 1, batch_size: 8, lr: 0.01}",
        augment="default",
    )
    distill = pipeline.build(load_recipe(recipe), other / "run").report.transfer["distillation"]
    assert distill["teacher_logits"] == "online" and distill["student_alone"] is None
    assert distill["teacher"]["source"] == str(teacher_checkpoint) and distill["teacher"]["input_size"] == 48
    assert distill["teacher"]["test_accuracy"] == pytest.approx(
        json.loads((teacher_checkpoint.parent / "train.json").read_text())["test_accuracy"]
    )


def test_a_teacher_checkpoint_with_other_classes_is_refused(tmp_path: Path, image_folder: Path) -> None:
    checkpoint = tmp_path / "teacher.pt"
    spec = models.REGISTRY.get("efficientnet_lite0")
    models.save_checkpoint(
        checkpoint,
        models.build(spec, "none", 3),
        spec,
        spec.preprocessing(32),
        ("cat", "dog", "owl"),
        load_recipe(_recipe(tmp_path, image_folder, "")),
    )
    recipe = _recipe(tmp_path, image_folder, f"distill: {{teacher: {{checkpoint: {checkpoint}}}}}")
    with pytest.raises(RecipeError, match=r"predicts classes \['cat', 'dog', 'owl'\].*china"):
        pipeline.build(load_recipe(recipe), tmp_path / "run")
    assert not (tmp_path / "run" / "report.json").exists()


def test_kd_loss_is_zero_at_the_teacher_and_its_gradient_pulls_the_student_there() -> None:
    teacher_logits = torch.tensor([[4.0, 0.0, -2.0], [0.0, 3.0, 1.0]])
    # softmax ignores shifts
    assert kd_loss(teacher_logits + 5.0, teacher_logits, 3.0).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.zeros(2, 3, requires_grad=True)
    kd_loss(student, teacher_logits, 3.0).backward()
    assert (torch.sign(-student.grad) == torch.sign(teacher_logits - teacher_logits.mean(1, keepdim=True))).all()


def test_the_distiller_looks_up_the_teachers_logits_of_the_batch_images_and_weighs_the_label_loss(
    tmp_path: Path,
) -> None:
    spec = models.REGISTRY.get("efficientnet_lite0")
    pre = spec.preprocessing(32)
    torch.manual_seed(0)
    teacher = models.build(spec, "none", 3).eval()
    with torch.no_grad():
        teacher.head.weight.mul_(100)  # apart enough that another image's logits would not pass for these
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    distiller = Distiller(Teacher(teacher, pre, images, tmp_path), pre, temperature=3.0, alpha=0.25)
    distiller.prepare(cached=True)  # fixed student inputs: one teacher pass over the train images
    table = torch.from_numpy(model_logits(teacher, images, pre))
    batch = TrainBatch(index=torch.tensor([3, 0]), inputs=torch.zeros(2, 8), labels=torch.tensor([0, 1]))
    assert distiller.label_weight == 0.75
    assert distiller.loss(batch, table[[3, 0]] + 5.0, torch.zeros(2, 8), 0.0).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.zeros(2, 3)
    expected = 0.25 * kd_loss(student, table[[3, 0]], 3.0).item()
    assert distiller.loss(batch, student, torch.zeros(2, 8), 0.0).item() == pytest.approx(expected)


def test_adabn_sets_batchnorm_statistics_to_the_target_images_and_leaves_the_source_model_alone() -> None:
    spec = models.REGISTRY.get("efficientnet_lite0")
    pre = spec.preprocessing(32)
    model = models.build(spec, "pretrained", 2).eval()
    target = np.random.default_rng(0).integers(150, 256, (40, 32, 32, 3), dtype=np.uint8)  # bright, low contrast
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = adabn(model, target, pre)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    stem_bn = adapted.stages[0][1]  # conv_stem → bn1
    with torch.no_grad():
        stem_out = adapted.stages[0][0](torch.from_numpy(normalize(target, pre)))
    assert torch.allclose(stem_bn.running_mean, stem_out.mean((0, 2, 3)), atol=1e-4)
    assert not adapted.training and stem_bn.momentum == 0.1


def test_gradient_reversal_flips_the_domain_gradient_with_the_dann_ramp() -> None:
    adversary = DomainAdversary(
        4, 8, weight=0.5, target_images=np.zeros((1, 8, 8, 3), np.uint8)
    ).eval()  # no dropout: compare one function
    assert adversary.reversal_weight(0.0) == 0.0 and adversary.reversal_weight(1.0) == pytest.approx(0.5, abs=1e-4)
    assert 0 < adversary.reversal_weight(0.1) < adversary.reversal_weight(0.3) < 0.5
    source, target = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    adversary.domain_loss(source, target, progress=1.0).backward()
    reversed_grad = source.grad.clone()
    source.grad = None
    plain = torch.nn.functional.binary_cross_entropy_with_logits(
        adversary.classifier(torch.cat([source, target.detach()])).squeeze(1),
        torch.cat([torch.zeros(3), torch.ones(3)]),
    )
    plain.backward()
    assert torch.allclose(reversed_grad, -adversary.reversal_weight(1.0) * source.grad, atol=1e-6)


@pytest.mark.parametrize("method", ["adabn", "dann"])
def test_adaptation_reports_source_only_and_adapted_accuracy_on_the_labeled_target(
    tmp_path: Path, image_folder: Path, method: str
) -> None:
    target = _inverted(image_folder, tmp_path / "target")
    student = "{strategy: partial, unfreeze: 1, epochs: 2, batch_size: 8, lr: 0.01}"
    recipe = _recipe(
        tmp_path,
        image_folder,
        f"adapt: {{target: {target}, target_labeled: {target}, method: {method}, domain_hidden: 16}}",
        student,
    )
    result = pipeline.build(load_recipe(recipe), tmp_path / "run")

    adaptation = result.report.transfer["adaptation"]
    assert (
        adaptation["method"] == method
        and adaptation["target_images"] == 24
        and adaptation["target_accuracy"]["images"] == 24
    )
    accuracies = [adaptation["target_accuracy"][k] for k in ("source_only", "adapted")] + list(
        adaptation["source_test_accuracy"].values()
    )
    assert all(0.0 <= a <= 1.0 for a in accuracies)
    shipped = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=False)["state_dict"]
    (source_only,) = (
        p
        for p in (tmp_path / "run" / "stages").glob("train-*/checkpoint.pt")
        if method == "adabn" or not torch.equal(_head(p), shipped["head.weight"])
    )
    source_state = torch.load(source_only, map_location="cpu", weights_only=False)["state_dict"]
    bn_mean = "stages.0.1.running_mean"
    if method == "adabn":  # same weights, target statistics
        assert torch.equal(source_state["head.weight"], shipped["head.weight"]) and not torch.allclose(
            source_state[bn_mean], shipped[bn_mean]
        )
    else:  # trained against a domain classifier: different weights
        assert not torch.equal(source_state["head.weight"], shipped["head.weight"])
    assert (
        f"Domain adaptation ({method}, 24 unlabeled target images, 24 labeled)"
        in (tmp_path / "run" / "report.md").read_text()
    )


def test_a_target_labeled_class_the_training_data_lacks_is_an_error(tmp_path: Path, image_folder: Path) -> None:
    target = write_folder(tmp_path / "target", count=2)
    (target / "zebra").mkdir()
    Image.new("RGB", (32, 32)).save(target / "zebra" / "z.png")
    recipe = _recipe(tmp_path, image_folder, f"adapt: {{target: {target}, target_labeled: {target}}}")
    with pytest.raises(DataError, match=r"adapt.target_labeled.*\['zebra'\]"):
        pipeline.build(load_recipe(recipe), tmp_path / "run")


@pytest.mark.parametrize("teacher", ["{}", "{backbone: efficientnet_lite2, checkpoint: run/checkpoint.pt}"])
def test_a_teacher_needs_exactly_one_of_backbone_or_checkpoint(
    tmp_path: Path, image_folder: Path, teacher: str
) -> None:
    with pytest.raises(RecipeError, match=r"distill.teacher.*exactly one of `distill.teacher.backbone`"):
        load_recipe(_recipe(tmp_path, image_folder, f"distill: {{teacher: {teacher}}}"))


class _Interrupted(Exception):
    pass


class _StopAt(LossTerm):
    """Adds nothing; stops training at the first step at `progress` (as a kill after the last snapshot would)."""

    name = "stop"

    def __init__(self, progress: float) -> None:
        super().__init__()
        self.at = progress

    def loss(self, batch: TrainBatch, logits: torch.Tensor, features: torch.Tensor, progress: float) -> torch.Tensor:
        if progress >= self.at:
            raise _Interrupted
        return logits.new_zeros(())


def test_a_dann_run_resumed_from_its_snapshot_ends_where_an_uninterrupted_one_does(
    tmp_path: Path, image_folder: Path
) -> None:
    target = _inverted(image_folder, tmp_path / "target")
    student = "{strategy: partial, unfreeze: 1, epochs: 2, batch_size: 8, lr: 0.01}"
    adapt = f"adapt: {{target: {target}, method: dann}}"
    recipe = load_recipe(_recipe(tmp_path, image_folder, adapt, student, augment="default"))
    spec = models.REGISTRY.get("efficientnet_lite0")
    pre = spec.preprocessing(32)
    job = train.TrainJob(data.run(recipe.data, pre, 0), pre, recipe.train, "default", seed=0)
    target_images = data.load_unlabeled(target, pre, recipe.data, "adapt.target").images

    def fresh(*more: LossTerm) -> tuple[models.TransferModel, list[LossTerm]]:
        torch.manual_seed(0)
        model = models.build(spec, "pretrained", 2)
        return model, [DomainAdversary(model.head.in_features, 16, 1.0, target_images), *more]

    model, reference_terms = fresh()
    reference = train.run(model, job, reference_terms)
    snapshot = tmp_path / "state.pt"
    model, terms = fresh(_StopAt(0.5))
    with pytest.raises(_Interrupted):
        train.run(model, job, terms, snapshot)  # at the first step of epoch 2
    assert torch.load(snapshot, weights_only=False)["epoch"] == 1
    model, terms = fresh()
    resumed = train.run(model, job, terms, snapshot, resume=True)

    def without_seconds(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert len(resumed.history) == 2 and without_seconds(resumed.history) == without_seconds(reference.history)
    assert resumed.best_epoch == reference.best_epoch and resumed.test_accuracy == reference.test_accuracy
    assert torch.equal(resumed.model.head.weight, reference.model.head.weight)
    # the domain classifier's weights came back from the snapshot and trained on as they did uninterrupted
    assert torch.equal(terms[0].classifier[0].weight, reference_terms[0].classifier[0].weight)
    assert not torch.equal(terms[0].classifier[0].weight, fresh()[1][0].classifier[0].weight)
