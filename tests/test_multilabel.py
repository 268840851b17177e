"""Multi-label: manifests of label sets and each bad row named, metrics against hand-computed values and
scikit-learn, the readout that parity, the agreement control and the runtime share, refused recipe fields,
a torch-free multi-label bundle, and one real build on mosaics of real digits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgetl import data, label_metrics, manifests
from edgetl.errors import BundleError, DataError, RecipeError
from edgetl.label_sets import digit_mosaics
from edgetl.quantize.control import fidelity
from edgetl.recipe import DataConfig, recipe_from_mapping
from edgetl.runtime.predictor import Predictor
from edgetl.runtime.preprocess import Preprocessing
from edgetl.runtime.readout import Readout
from tests.conftest import build_cli, write_recipe
from tests.tiny_bundle import write_manifest, write_tiny_bundle

PRE = Preprocessing(32, 36, "bilinear", (0.5,) * 3, (0.5,) * 3)
# image → its labels: the bundled photo crops, each given a second, shared label
SETS = {"china": ["china", "outdoor"], "flower": ["flower"]}


def label_rows(root: Path) -> list[dict]:
    return [{"path": str(p.relative_to(root)), "labels": SETS[p.parent.name]} for p in sorted(root.glob("*/*"))]


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def three_formats(root: Path) -> list[Path]:
    """The same label sets as a |-delimited column, as one 0/1 column per label, and as JSON Lines."""
    rows = label_rows(root)
    names = sorted({label for labels in SETS.values() for label in labels})
    delimited = write(root / "delimited.csv", ["path,labels"] + [f"{r['path']},{'|'.join(r['labels'])}" for r in rows])
    columns = write(
        root / "columns.csv",
        ["path," + ",".join(names)]
        + [r["path"] + "," + ",".join(str(int(n in r["labels"])) for n in names) for r in rows],
    )
    jsonl = write(root / "labels.jsonl", [json.dumps(r) for r in rows])
    return [delimited, columns, jsonl]


def test_the_three_manifest_formats_list_the_same_label_sets_and_decode_to_uint8_sets(image_folder: Path) -> None:
    listings = [manifests.listing(m, multilabel=True) for m in three_formats(image_folder)]
    classes, listed, named = listings[0]
    assert classes == ("china", "flower", "outdoor") and not named
    assert all(other[0] == classes and other[1] == listed for other in listings[1:])
    china = next(item for item in listed["train"] if "china" in item[2])
    assert china[1] == (1, 0, 1)
    ds = data.run(DataConfig(manifest=three_formats(image_folder)[0]), PRE, seed=0, multilabel=True)
    assert ds.train.labels.dtype == np.uint8 and ds.train.labels.shape == (len(ds.train.sources), 3)
    assert sum(len(ds.split(s).labels) for s in data.SPLITS) == 24 and ds.summary()["counts"]["train"]["per_class"][2]
    again = data.run(DataConfig(manifest=three_formats(image_folder)[2]), PRE, seed=0, multilabel=True)
    assert again.content_hash == ds.content_hash  # same images and label sets: the same data to every stage


@pytest.mark.parametrize(
    "header, row, names",
    [
        ("path,china,flower", "china/001.jpg,1,2", ["line 2", "`flower`", "'2'"]),  # a 0/1 column holding 2
        ("path,china,flower", "china/001.jpg,1,", ["line 2", "`flower`"]),
        ("path,labels", "china/001.jpg,", ["line 2", "empty label set", "allow_empty_labels"]),
        ("path,labels", "china/001.jpg,china||flower", ["line 2", "empty or overlong label"]),
        ("path,labels,split", "china/001.jpg,china|moon,val", ["line 3", "'moon'", "no train row has"]),
        ("path,label", "china/001.jpg,china", ["single-label `label` column", "task: multilabel"]),
    ],
)
def test_each_bad_multilabel_row_is_a_data_error_naming_it(tmp_path: Path, header: str, row: str, names) -> None:
    lines = [header, row] if "split" not in header else [header, "flower/002.jpg,china|flower,train", row]
    with pytest.raises(DataError) as error:
        manifests.listing(write(tmp_path / "labels.csv", lines), multilabel=True)
    assert all(name in str(error.value) for name in names), str(error.value)


def test_a_split_whose_every_image_is_unreadable_is_a_data_error_naming_it(image_folder: Path) -> None:
    (image_folder / "broken.png").write_bytes(b"not an image")
    rows = [f"{r['path']},{'|'.join(r['labels'])},train" for r in label_rows(image_folder)]
    manifest = write(image_folder / "labels.csv", ["path,labels,split", *rows, "broken.png,china,val"])
    with pytest.raises(DataError, match=r"The val split of .*labels.csv has no readable images\. Add some"):
        data.run(DataConfig(manifest=manifest), PRE, seed=0, multilabel=True)


def test_the_cli_gives_one_paragraph_and_exit_code_2_for_a_bad_row_and_for_class_folders(tmp_path: Path) -> None:
    write(tmp_path / "labels.csv", ["path,cat,dog", "a.jpg,1,0", "b.jpg,yes,0"])
    cases = {
        "manifest: labels.csv": ["labels.csv line 3 (b.jpg) has 'yes' in label column `cat`"],
        "path: images": ["`data.path` cannot be used with `task: multilabel`", "set `data.manifest`"],
    }
    for data_section, named in cases.items():
        recipe = write_recipe(tmp_path / "r.yaml", f"name: x\ntask: multilabel\ndata: {{{data_section}}}\n")
        done = build_cli(recipe, tmp_path / "run")
        assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("edgetl: error:"), done.stderr
        assert all(name in done.stderr for name in named) and "Traceback" not in done.stderr, done.stderr


def test_jsonl_labels_must_be_a_list_and_an_empty_set_is_allowed_only_when_the_recipe_says(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.jsonl", ['{"path": "a.jpg", "labels": ["x", "y"]}', '{"path": "b.jpg", "labels": 3}'])
    with pytest.raises(DataError, match=r"line 2 \(.*b.jpg\): `labels` must be a list"):
        manifests.read(bad, multilabel=True)
    empty = write(
        tmp_path / "empty.jsonl", ['{"path": "a.jpg", "labels": ["x", "y"]}', '{"path": "b.jpg", "labels": []}']
    )
    assert manifests.read(empty, multilabel=True, allow_empty=True)[1].labels == ()


def test_a_label_without_a_positive_train_image_is_named(image_folder: Path) -> None:
    # one 0/1 column per label: `rare` is a label (the header names it) though no row has it
    rows = label_rows(image_folder)
    lines = ["path,china,flower,outdoor,rare"]
    lines += [r["path"] + "," + ",".join(str(int(n in r["labels"])) for n in ("china", "flower", "outdoor")) + ",0"
              for r in rows]  # fmt: skip
    with pytest.raises(DataError, match=r"train split of .*labels.csv has no image with label\(s\) \['rare'\]"):
        data.run(DataConfig(manifest=write(image_folder / "labels.csv", lines)), PRE, seed=0, multilabel=True)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"data": {"path": "images"}}, "`data.path`"),
        ({"data": {"builtin": "digits"}}, "`data.builtin`"),
        ({"train": {"class_balance": "weighted_loss"}}, "`train.class_balance`"),
        ({"train": {"label_smoothing": 0.1}}, "`train.label_smoothing`"),
        ({"gates": {"min_accuracy": 0.9}}, "`gates.min_accuracy`"),
        ({"quantize": [{"runtime": "openvino", "method": "qat"}]}, "`quantize[].method qat`"),
        ({"quantize": [{"runtime": "openvino", "max_accuracy_drop": 0.01}]}, "`quantize[].max_accuracy_drop`"),
        ({"distill": {"teacher": {"backbone": "efficientnet_lite0"}}}, "`distill`"),
        ({"task": "single"}, "`data.builtin`"),
    ],
)
def test_fields_a_multilabel_recipe_cannot_use_are_refused_by_name(changes: dict, field: str) -> None:
    raw = {"name": "x", "task": "multilabel", "data": {"builtin": "digits-mosaic"}} | changes
    with pytest.raises(RecipeError, match=r"^recipe.yaml: " + field.replace("[", r"\[").replace("]", r"\]")):
        recipe_from_mapping(raw, Path("recipe.yaml"))


def test_min_map_and_pos_weight_are_refused_on_a_single_label_recipe() -> None:
    for section, value in (("gates", {"min_map": 0.5}), ("train", {"pos_weight": "balanced"})):
        with pytest.raises(RecipeError, match="cannot be used with `task: single`"):
            recipe_from_mapping({"name": "x", "data": {"builtin": "digits"}, section: value}, Path("r.yaml"))


def test_average_precision_f1_thresholds_and_exact_match_by_hand_and_against_sklearn() -> None:
    # label 0 ranked  0.8(+) 0.4(-) 0.35(+) 0.1(-): precision at the two positives 1 and 2/3 → AP = (1 + 2/3) / 2
    assert label_metrics.average_precision(np.array([1, 0, 1, 0]), np.array([0.8, 0.4, 0.35, 0.1])) == pytest.approx(
        5 / 6
    )
    assert np.isnan(label_metrics.average_precision(np.zeros(3), np.ones(3)))
    truth = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], np.uint8)
    probabilities = np.array([[0.9, 0.2], [0.6, 0.7], [0.7, 0.4], [0.1, 0.45]])
    thresholds = label_metrics.tune_thresholds(probabilities, truth)
    assert thresholds[0] == pytest.approx((0.7 + 0.6) / 2) and thresholds[1] == pytest.approx((0.4 + 0.2) / 2)
    logits = np.log(probabilities / (1 - probabilities))
    scores = label_metrics.scores(logits, truth, thresholds)
    # at those thresholds: label 0 exact (TP 2); label 1 TP 2, FP 1 (0.45) → micro F1 = 8 / 9, macro = (1 + 0.8) / 2
    assert scores["micro_f1"] == pytest.approx(8 / 9) and scores["macro_f1"] == pytest.approx(0.9)
    assert scores["exact_match"] == 0.75 and scores["map"] == pytest.approx(np.mean(scores["per_label_ap"]))
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    truth = (rng.random((200, 6)) < 0.3).astype(np.uint8)
    logits = rng.normal(size=(200, 6)) + 2 * truth
    logits[:20, 0] = logits[20:40, 0]  # ties
    cuts = tuple(rng.uniform(0.2, 0.8, 6))
    ours = label_metrics.scores(logits, truth, cuts)
    predicted = label_metrics.sigmoid(logits) >= np.array(cuts)
    assert ours["per_label_ap"] == pytest.approx([metrics.average_precision_score(truth[:, c], logits[:, c])
                                                 for c in range(6)], abs=1e-6)  # fmt: skip
    assert ours["micro_f1"] == pytest.approx(metrics.f1_score(truth, predicted, average="micro"))
    assert ours["macro_f1"] == pytest.approx(metrics.f1_score(truth, predicted, average="macro", zero_division=0))
    assert ours["exact_match"] == pytest.approx(metrics.accuracy_score(truth, predicted))


def test_label_set_agreement_is_the_whole_set_and_drives_fidelity() -> None:
    readout = Readout("multilabel", (0.5, 0.5, 0.9))
    reference = np.array([[3.0, -3.0, 3.0], [3.0, -3.0, 0.0], [0.1, -0.1, 5.0]])
    moved = reference + np.array([[0.0, 0.0, -1.5], [0.0, 0.0, 0.0], [-0.2, 0.0, 0.0]])  # image 1 and 3 cross
    assert readout.agree(moved, reference).tolist() == [False, True, False]
    assert readout.margin(reference)[2] == pytest.approx(0.1)  # label 0's logit 0.1 from its threshold's 0
    found = fidelity(moved, reference, readout)
    assert found.agreement == pytest.approx(1 / 3) and found.max_abs_prob_delta > 0.05
    assert fidelity(moved, reference).agreement == 1.0  # as top-1 answers the moves change nothing


def multilabel_tiny_bundle(folder: Path) -> Path:
    """The colour bundle (logits = 10 × channel means) read as label sets: a yellow image is red and green."""
    write_tiny_bundle(folder)
    manifest = json.loads((folder / "edgetl.json").read_text())
    for name in ("files", "sizes"):
        manifest.pop(name)
    manifest |= {"schema_version": 2, "task": {"kind": "multilabel", "thresholds": [0.5, 0.5, 0.5]}}
    return write_manifest(folder, manifest)


def test_a_label_set_readout_under_schema_version_1_is_refused(tmp_path: Path) -> None:
    """A runtime from before label sets would read a version-1 manifest as single-label softmax."""
    bundle = multilabel_tiny_bundle(tmp_path / "bundle")
    manifest = json.loads((bundle / "edgetl.json").read_text())
    for name in ("files", "sizes"):
        manifest.pop(name)
    write_manifest(bundle, manifest | {"schema_version": 1})
    with pytest.raises(BundleError, match="`task`"):
        Predictor.load(bundle)


def test_a_multilabel_bundle_predicts_label_sets_torch_free(tmp_path: Path) -> None:
    bundle = multilabel_tiny_bundle(tmp_path / "bundle")
    Image.new("RGB", (40, 40), (230, 220, 10)).save(tmp_path / "yellow.png")
    code = (
        "import sys\nfor name in ('torch', 'torchvision', 'timm', 'nncf'): sys.modules[name] = None\n"
        "from edgetl.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, "predict", str(bundle), str(tmp_path / "yellow.png"), "--json"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    prediction = json.loads(done.stdout)["predictions"][0]
    assert [item["label"] for item in prediction["labels"]] == ["red", "green"]
    assert set(prediction["scores"]) == {"red", "green", "blue"} and prediction["scores"]["blue"] < 0.01
    info = subprocess.run([sys.executable, "-c", code, "info", str(bundle)], capture_output=True, text=True)
    assert info.returncode == 0 and "multi-label, thresholds on each label's sigmoid: red 0.5, green 0.5" in info.stdout
    assert Predictor.load(bundle).predict(tmp_path / "yellow.png").to_dict() == {
        k: v for k, v in prediction.items() if k != "path"
    }


def test_the_server_answers_a_multilabel_bundle_with_the_label_set_shape(tmp_path: Path) -> None:
    from tests.test_server import call, serving

    Image.new("RGB", (40, 40), (230, 220, 10)).save(tmp_path / "yellow.png")
    with serving(Predictor.load(multilabel_tiny_bundle(tmp_path / "bundle"), threads=1)) as port:
        status, answer = call(port, "POST", "/predict", (tmp_path / "yellow.png").read_bytes())
        _, metadata = call(port, "GET", "/metadata")
    assert metadata["task"] == {"kind": "multilabel", "thresholds": [0.5, 0.5, 0.5]}
    assert status == 200 and [item["label"] for item in answer["labels"]] == ["red", "green"]
    assert set(answer["scores"]) == {"red", "green", "blue"} and "top_k" not in answer


def test_a_multilabel_bundle_with_thresholds_that_do_not_fit_its_labels_is_refused(tmp_path: Path) -> None:
    bundle = multilabel_tiny_bundle(tmp_path / "bundle")
    manifest = json.loads((bundle / "edgetl.json").read_text())
    manifest["task"]["thresholds"] = [0.5, 0.5]
    (bundle / "edgetl.json").write_text(json.dumps(manifest))
    from edgetl.errors import BundleError

    with pytest.raises(BundleError, match="`task` must be"):
        Predictor.load(bundle)


def test_digit_mosaics_are_seeded_and_labeled_with_the_digits_they_show() -> None:
    classes, listing, _ = digit_mosaics(0.15, 0.15, seed=0)
    again = digit_mosaics(0.15, 0.15, seed=0)[1]
    assert classes == tuple("0123456789") and [len(listing[s]) for s in ("train", "val", "test")] == [1257, 270, 270]
    assert all(1 <= sum(labels) <= 4 for _, labels, _ in listing["train"])
    assert [item[1] for item in listing["test"]] == [item[1] for item in again["test"]]
    assert np.asarray(listing["val"][0][0]).shape == (16, 16)


@pytest.mark.slow
def test_a_multilabel_build_on_digit_mosaics_reports_map_and_serves_label_sets(tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path / "ml.yaml",
        """\
        name: ml
        task: multilabel
        data: {builtin: digits-mosaic, image_size: 32, augment: none}
        train: {strategy: linear_probe, epochs: 3, lr: 0.01, pos_weight: balanced}
        quantize:
          - {runtime: onnxruntime, min_agreement: 0.5}
          - {runtime: openvino, min_agreement: 0.5}
        measure: {latency_rounds: 2, latency_runs: 2, warmup: 1}
        gates: {min_map: 0.3}
        """,
    )
    run = tmp_path / "run"
    done = build_cli(recipe, run)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    rows = {v["name"]: v for v in report["variants"]}
    baseline = rows["pytorch-fp32"]["multilabel"]
    assert 0.3 < baseline["map"] == rows["pytorch-fp32"]["accuracy"] <= 1 and len(baseline["thresholds"]) == 10
    assert all(0 <= baseline[k] <= 1 for k in ("micro_f1", "macro_f1", "exact_match"))
    assert len(baseline["per_label_ap"]) == 10 and report["training"]["val_accuracy"] > 0.3
    for name in ("ort-int8", "ov-int8"):
        assert 0 < rows[name]["agreement"] <= 1 and rows[name]["multilabel"]["max_abs_prob_delta"] >= 0
        assert "confusion_matrix" not in rows[name]  # label sets have none
    assert {g["gate"] for g in report["gates"]} >= {"min_map"}
    assert "Per-label AP and threshold" in (run / "report.md").read_text()
    manifest = json.loads((run / "bundle" / "edgetl.json").read_text())
    assert manifest["schema_version"] == 2 and manifest["task"]["thresholds"] == baseline["thresholds"]
    mosaic = digit_mosaics(0.15, 0.15, seed=0)[1]["test"][0][0]
    mosaic.save(tmp_path / "mosaic.png")
    answer = Predictor.load(run / "bundle").predict(tmp_path / "mosaic.png").to_dict()
    scores = answer["scores"]
    assert list(scores) == [str(d) for d in range(10)]
    assert [item["label"] for item in answer["labels"]] == [
        d for d in sorted(scores, key=lambda d: -scores[d]) if scores[d] >= baseline["thresholds"][int(d)]
    ]
