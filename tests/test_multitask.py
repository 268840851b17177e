"""Several tasks on one backbone: the `tasks:` list and what it refuses, manifests with a column per task and
each bad row named, the summed loss and mean metric, the all-tasks readout, and one real 2-task build on digits
(two named ONNX outputs, parity per task, report rows per task, predict and serve answering per task)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgetl import multitask, multitask_data
from edgetl.errors import DataError, RecipeError
from edgetl.recipe import DataConfig, recipe_from_mapping
from edgetl.recipe.multitask import TaskSpec
from edgetl.runtime.readout import Readout
from edgetl.runtime.taskset import TaskReadout, TaskSetReadout
from edgetl.tasks import LabelTask
from tests.conftest import build_cli, write_recipe

TWO = [{"name": "digit"}, {"name": "parity", "loss_weight": 0.5}]
TASKS = (LabelTask("colour", "single", ("blue", "red")), LabelTask("tags", "multilabel", ("a", "b", "c"), 0.5))


def recipe(**changes):
    return recipe_from_mapping({"name": "x", "tasks": TWO, "data": {"builtin": "digits"}} | changes, Path("r.yaml"))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"task": "single"}, "`task`"),
        ({"distill": {"teacher": {"backbone": "efficientnet_lite0"}}}, "`distill`"),
        ({"train": {"class_balance": "weighted_loss"}}, "`train.class_balance`"),
        ({"quantize": [{"runtime": "onnxruntime", "method": "qat"}]}, "`quantize[].method qat`"),
        ({"gates": {"min_map": 0.5}}, "`gates.min_map`"),
        ({"tasks": [{"name": "digit"}, {"name": "digit", "labels": "parity"}]}, "`tasks[].name`"),
        ({"tasks": [{"name": "image"}, {"name": "parity"}]}, "`tasks[].name`"),
        ({"tasks": [{"name": "digit"}, {"name": "size"}]}, "`tasks[].labels`"),
    ],
)
def test_fields_a_multitask_recipe_cannot_use_are_refused_by_name(changes: dict, field: str) -> None:
    with pytest.raises(RecipeError, match="cannot be used with `tasks:`") as error:
        recipe(**changes)
    assert field in str(error.value)


def test_the_task_list_is_validated_and_a_recipe_without_it_is_unchanged() -> None:
    for bad, named in (([{"name": "digit"}], "tasks"), ([{"name": "1x"}, {"name": "b"}], "tasks.0.name"),
                       ([{"name": "a", "loss_weight": 0}, {"name": "b"}], "tasks.0.loss_weight")):  # fmt: skip
        with pytest.raises(RecipeError, match=f"`{named}`"):
            recipe(tasks=bad)
    made = recipe()
    assert [(t.name, t.column, t.kind, t.loss_weight) for t in made.tasks] == [
        ("digit", "digit", "single", 1.0),
        ("parity", "parity", "single", 0.5),
    ]
    plain = recipe_from_mapping({"name": "x", "data": {"builtin": "digits"}}, Path("r.yaml"))
    assert plain.tasks is None and plain.task == "single"
    assert "tasks" not in plain.model_dump(mode="json")  # report.json, metrics.json and bundles as before
    assert made.model_dump(mode="json")["tasks"][1]["loss_weight"] == 0.5


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_manifest_with_a_column_per_task_lists_every_task_side_by_side(image_folder: Path) -> None:
    files = sorted(p.relative_to(image_folder) for p in image_folder.glob("*/*"))
    lines = ["path,kind,tags,split"] + [
        f"{p},{p.parent},{'a|b' if i % 2 else 'c'},{('train', 'train', 'val', 'test')[i % 4]}"
        for i, p in enumerate(files)
    ]
    specs = [TaskSpec(name="kind"), TaskSpec(name="tags", kind="multilabel")]
    config = DataConfig(manifest=write(image_folder / "labels.csv", lines))
    tasks, classes, listed, origin = multitask_data.listing(config, specs, seed=0)
    assert [(t.name, t.kind, t.classes) for t in tasks] == [
        ("kind", "single", ("china", "flower")),
        ("tags", "multilabel", ("a", "b", "c")),
    ]
    assert classes == ("kind:china", "kind:flower", "tags:a", "tags:b", "tags:c") and origin.endswith("labels.csv")
    assert sum(len(items) for items in listed.values()) == len(files)
    first = next(item for item in listed["train"] if item[2] == str(image_folder / files[0]))
    assert first[1] == (1, 0, 0, 0, 1)  # china, tag c


@pytest.mark.parametrize(
    ("row", "named"),
    [
        ("b.jpg,,odd", ["line 3 (", "b.jpg) has no label in column `digit` (task digit)"]),
        ("b.jpg,4,", ["line 3", "column `parity`"]),
        ("a.jpg,5,odd", ["line 3 lists", "a.jpg again (first on line 2)"]),
    ],
)
def test_each_bad_multitask_row_is_a_data_error_naming_it(tmp_path: Path, row: str, named: list[str]) -> None:
    config = DataConfig(manifest=write(tmp_path / "labels.csv", ["path,digit,parity", "a.jpg,3,odd", row]))
    with pytest.raises(DataError) as error:
        multitask_data.listing(config, [TaskSpec(name="digit"), TaskSpec(name="parity")], seed=0)
    assert all(name in str(error.value) for name in named), str(error.value)


def test_the_cli_gives_one_paragraph_and_exit_code_2_for_a_bad_multitask_row(tmp_path: Path) -> None:
    write(tmp_path / "labels.csv", ["path,digit,parity", "a.jpg,3,odd", "b.jpg,4,"])
    body = "name: x\ntasks: [{name: digit}, {name: parity}]\ndata: {manifest: labels.csv}\n"
    done = build_cli(write_recipe(tmp_path / "r.yaml", body), tmp_path / "run")
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("edgetl: error:"), done.stderr
    assert "labels.csv line 3 (" in done.stderr and "column `parity`" in done.stderr and "Traceback" not in done.stderr


def test_the_loss_is_the_weighted_sum_and_the_metric_the_mean_of_the_tasks() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0], [0.1, 0.3, -2.0, 1.0, 0.0]])
    labels = torch.tensor([[1, 0, 1, 0, 1], [1, 0, 0, 1, 0]])
    expected = torch.nn.functional.cross_entropy(logits[:, :2], torch.tensor([0, 0])) + 0.5 * (
        torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 2:], labels[:, 2:].float())
    )
    assert torch.isclose(multitask.TaskSetLoss(TASKS)(logits, labels), expected)
    metrics = multitask.primary_metrics(logits.numpy(), labels.numpy(), TASKS)
    assert metrics["colour"] == 0.5  # the second image's colour is wrong
    assert metrics["tags"] == pytest.approx(1.0)  # each tag's positive outranks its negatives
    assert multitask.mean_primary(logits.numpy(), labels.numpy(), TASKS) == pytest.approx(0.75)


def test_an_image_agrees_only_when_every_task_answers_the_same() -> None:
    readout = TaskSetReadout((TaskReadout("colour", ("blue", "red"), Readout()),
                              TaskReadout("tags", ("a", "b"), Readout("multilabel", (0.5, 0.5)))))  # fmt: skip
    reference = np.array([[1.0, 0.0, 2.0, -2.0], [1.0, 0.0, 2.0, -2.0], [1.0, 0.0, 2.0, -2.0]])
    logits = np.array([[0.9, 0.1, 1.0, -1.0], [0.0, 1.0, 2.0, -2.0], [1.0, 0.0, 2.0, 0.5]])
    assert readout.agree(logits, reference).tolist() == [True, False, False]
    per_task = [r.agree(a, b).tolist() for r, a, b in readout.per_task(logits, reference)]
    assert per_task == [[True, False, True], [True, True, False]]  # each task alone agrees on 2 of 3
    assert readout.margin(reference).tolist() == [1.0, 1.0, 1.0]
    assert TaskSetReadout.from_manifest(readout.to_dict()) == readout
    parity = multitask.parity_per_task(readout, logits, reference, tolerance=0.1)
    assert [parity[name]["passed"] for name in ("colour", "tags")] == [False, False]
    assert multitask.failing(parity) == " (outputs colour, tags)"  # what a parity ExportError names
    assert multitask.failing({"colour": {"passed": True}, "tags": {"passed": False}}) == " (output tags)"
    assert multitask.failing(None) == ""


def test_parity_passes_an_answer_flipped_at_a_near_tie_when_every_logit_is_within_tolerance() -> None:
    """Seen in a 2-process fine-tune: two digit logits 1e-5 apart swapped order in ONNX Runtime."""
    readout = TaskSetReadout((TaskReadout("colour", ("blue", "red"), Readout()),
                              TaskReadout("tags", ("a", "b"), Readout("multilabel", (0.5, 0.5)))))  # fmt: skip
    reference = np.array([[1.0, 1.0 + 1e-5, 2e-4, 3.0], [2.0, 0.0, 2.0, -2.0]])
    tied = np.array([[1.0 + 1e-5, 1.0, -1e-4, 3.0], [2.0, 0.0, 2.0, -2.0]])  # both answers flip, logits within 1e-3
    parity = multitask.parity_per_task(readout, tied, reference, tolerance=1e-3)
    assert all(parity[name]["passed"] for name in ("colour", "tags"))
    assert [parity[name]["agreement"] for name in ("colour", "tags")] == [0.5, 0.5]  # the flips still count
    off = tied.copy()
    off[1, 3] = np.nan  # a NaN logit fails its output
    failed = multitask.parity_per_task(readout, off, reference, tolerance=1e-3)
    assert [failed[name]["passed"] for name in ("colour", "tags")] == [True, False]


@pytest.mark.slow
def test_a_two_task_build_on_digits_exports_one_named_output_per_task_and_answers_per_task(tmp_path: Path) -> None:
    import onnx
    import openvino

    recipe_file = write_recipe(
        tmp_path / "mt.yaml",
        """\
        name: mt
        tasks: [{name: digit}, {name: parity, loss_weight: 0.5}]
        data: {builtin: digits, image_size: 32, augment: none}
        train: {strategy: linear_probe, epochs: 3, lr: 0.01}
        quantize:
          - {runtime: onnxruntime, min_agreement: 0.5}
          - {runtime: openvino, min_agreement: 0.5}
        measure: {latency_rounds: 2, latency_runs: 2, warmup: 1}
        gates: {min_accuracy: 0.5}
        """,
    )
    run = tmp_path / "run"
    done = build_cli(recipe_file, run)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert [p["passed"] for p in report["export"]["parity"]] == [True, True]  # ONNX Runtime and OpenVINO
    for parity in report["export"]["parity"]:  # each output against PyTorch's
        assert list(parity["tasks"]) == ["digit", "parity"] and all(t["passed"] for t in parity["tasks"].values())
    rows = {v["name"]: v for v in report["variants"]}
    for name in ("pytorch-fp32", "onnx-fp32", "ov-fp32", "ort-int8", "ov-int8"):
        per_task = rows[name]["tasks"]
        assert list(per_task) == ["digit", "parity"] and all(0 < t["accuracy"] <= 1 for t in per_task.values())
        assert rows[name]["accuracy"] == pytest.approx(np.mean([t["accuracy"] for t in per_task.values()]))
        assert rows[name]["agreement"] <= min(t["agreement"] for t in per_task.values())
    assert len(rows["pytorch-fp32"]["tasks"]["digit"]["confusion_matrix"]) == 10
    checked = [o for o in report["gates"] if o["gate"] == "min_accuracy"]
    assert len(checked) >= 2  # the FP32 and INT8 variants the device can run
    for outcome in checked:  # every task must reach it: the value is the worst task's
        assert outcome["value"] == min(t["accuracy"] for t in rows[outcome["variant"]]["tasks"].values())
    assert "| digit |" in (run / "report.md").read_text()
    exported = next((run / "stages").glob("export-*/model.onnx"))
    assert [o.name for o in onnx.load(str(exported)).graph.output] == ["digit", "parity"]
    xml = exported.with_suffix(".xml")
    assert [o.get_any_name() for o in openvino.Core().read_model(str(xml)).outputs] == ["digit", "parity"]
    manifest = json.loads((run / "bundle" / "edgetl.json").read_text())
    assert manifest["schema_version"] == 3 and [t["name"] for t in manifest["tasks"]] == ["digit", "parity"]
    assert manifest["tasks"][1] == {"name": "parity", "kind": "single", "labels": ["even", "odd"], "thresholds": []}
    from PIL import Image
    from sklearn.datasets import load_digits

    Image.fromarray(np.rint(load_digits().images[3] * 255 / 16).astype(np.uint8), "L").save(tmp_path / "three.png")
    code = (
        "import sys\nfor name in ('torch', 'torchvision', 'timm', 'nncf'): sys.modules[name] = None\n"
        "from edgetl.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, "predict", str(run / "bundle"), str(tmp_path / "three.png"),
                           "--json", "--top-k", "2"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)["predictions"][0]["tasks"]
    assert list(answer) == ["digit", "parity"] and len(answer["digit"]["top_k"]) == 2
    assert {t["label"] for t in answer["parity"]["top_k"]} == {"even", "odd"}
    from edgetl.runtime.predictor import Predictor
    from tests.test_server import call, serving

    with serving(Predictor.load(run / "bundle", threads=1)) as port:
        status, served = call(port, "POST", "/predict", (tmp_path / "three.png").read_bytes())
        _, metadata = call(port, "GET", "/metadata")
    assert status == 200 and served["tasks"]["parity"] == answer["parity"]
    assert [t["name"] for t in metadata["tasks"]] == ["digit", "parity"]
    from edgetl import pipeline
    from edgetl.recipe import load_recipe

    def trained() -> list[str]:
        return sorted(folder.name for folder in (run / "stages").glob("train-*"))

    first = trained()
    pipeline.train_model(load_recipe(recipe_file), run)
    assert trained() == first  # the same tasks: the build's trained model is reused
    pipeline.train_model(load_recipe(recipe_file, ["tasks=[{name: digit}, {name: parity, loss_weight: 1.0}]"]), run)
    assert len(trained()) == len(first) + 1  # another loss weight is another model


def test_a_multilabel_task_is_scored_with_its_thresholds_and_they_travel_in_the_bundle_manifest() -> None:
    from edgetl.bundle import _task
    from edgetl.errors import BundleError
    from edgetl.runtime.manifest import check_schema
    from edgetl.runtime.metrics import Latency, VariantMetrics
    from edgetl.validate import _scores

    rng = np.random.default_rng(0)
    labels = np.concatenate([np.eye(2, dtype=np.uint8)[rng.integers(0, 2, 40)], rng.integers(0, 2, (40, 3))], axis=1)
    reference = labels * 4.0 - 2.0 + rng.normal(0, 1, labels.shape)
    readout = multitask.readout_for(reference, labels, TASKS)
    assert readout.tasks[0].readout == Readout() and len(readout.tasks[1].readout.thresholds) == 3
    row = multitask.variant_scores(reference + 0.01, reference, labels, readout, _scores)
    assert row["agreement"] == 1.0 and list(row["tasks"]) == ["colour", "tags"]
    assert row["accuracy"] == pytest.approx((row["tasks"]["colour"]["accuracy"] + row["tasks"]["tags"]["accuracy"]) / 2)
    assert row["tasks"]["tags"]["multilabel"]["thresholds"] == pytest.approx(
        readout.tasks[1].readout.thresholds, abs=1e-6
    )
    variant = VariantMetrics(name="onnx-fp32", runtime="onnxruntime", precision="fp32", size_mb=1.0,
                             latency_ms=Latency(1.0), **row)  # fmt: skip
    names = ("colour:blue", "colour:red", "tags:a", "tags:b", "tags:c")
    tasks = _task(variant, names)["tasks"]
    assert tasks[0] == {"name": "colour", "kind": "single", "labels": ["blue", "red"], "thresholds": []}
    assert tasks[1]["labels"] == ["a", "b", "c"] and tasks[1]["thresholds"] == row["tasks"]["tags"]["multilabel"][
        "thresholds"]  # fmt: skip
    manifest = {"schema_version": 3, "labels": list(names), "tasks": tasks}
    from edgetl.runtime import manifest as schema

    assert schema._tasks(tasks, manifest)
    assert not schema._tasks([tasks[1], tasks[0]], manifest)  # not in the labels' order
    assert not schema._tasks([tasks[0], {**tasks[1], "thresholds": [0.5]}], manifest)
    assert not schema._tasks([tasks[0], {**tasks[1], "labels": ["a", {"b": 1}, "c"]}], manifest)  # not all strings
    assert not schema._tasks(tasks, {**manifest, "schema_version": 2})  # an older runtime reads it as one task
    assert not schema._tasks(tasks, {**manifest, "task": {"kind": "multilabel"}})  # one or the other
    with pytest.raises(BundleError, match="`tasks`"):
        check_schema({"schema_version": 3, "name": "x", "files": {"m.onnx": "a" * 64}, "model": "m.onnx",
                      "runtime": "onnxruntime", "labels": list(names), "tasks": [tasks[0]]}, "edgetl.json")  # fmt: skip


@pytest.mark.slow
def test_a_manifest_build_with_a_multilabel_task_serves_its_label_set_beside_the_class(image_folder: Path) -> None:
    files = sorted(p.relative_to(image_folder) for p in image_folder.glob("*/*"))
    write(image_folder / "labels.csv", ["path,kind,tags"] + [f"{p},{p.parent},{('a|b', 'b', 'c|a')[i % 3]}"
                                                            for i, p in enumerate(files)])  # fmt: skip
    recipe_file = write_recipe(
        image_folder / "r.yaml",
        """\
        name: mlmt
        tasks: [{name: kind}, {name: tags, kind: multilabel, loss_weight: 0.5}]
        data: {manifest: labels.csv, image_size: 32, augment: none, val_split: 0.25, test_split: 0.25}
        train: {strategy: linear_probe, epochs: 2, lr: 0.01}
        quantize: []
        measure: {latency_rounds: 2, latency_runs: 2, warmup: 1}
        """,
    )
    run = image_folder / "run"
    done = build_cli(recipe_file, run)
    assert done.returncode == 0, done.stderr[-3000:]
    tags = json.loads((run / "report.json").read_text())["variants"][0]["tasks"]["tags"]
    assert tags["kind"] == "multilabel" and tags["accuracy"] == tags["multilabel"]["map"]
    manifest = json.loads((run / "bundle" / "edgetl.json").read_text())
    assert manifest["tasks"][1]["labels"] == ["a", "b", "c"] and len(manifest["tasks"][1]["thresholds"]) == 3
    from edgetl.runtime.predictor import Predictor

    answer = Predictor.load(run / "bundle").predict(image_folder / files[0]).to_dict()["tasks"]
    assert answer["kind"]["label"] in ("china", "flower") and set(answer["tags"]["scores"]) == {"a", "b", "c"}
    chosen = [item["label"] for item in answer["tags"]["labels"]]
    thresholds = dict(zip("abc", manifest["tasks"][1]["thresholds"]))
    assert chosen == [t for t in sorted("abc", key=lambda t: -answer["tags"]["scores"][t])
                      if answer["tags"]["scores"][t] >= thresholds[t]]  # fmt: skip
