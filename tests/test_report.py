"""The report stage: Markdown job summary, self-contained HTML page, comparison of runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from edgetl.build_report import BuildReport
from edgetl.errors import DataError
from edgetl.gates import GATES, GateOutcome
from edgetl.recipe import GatesConfig
from edgetl.report import ReportFiles, compare, write_reports
from edgetl.report_charts import ChartPoint, Series, accuracy_latency_svg, metric_floor
from edgetl.report_content import class_scores, focus_variant, gate_rule, pareto_front
from edgetl.runtime.metrics import VariantMetrics

CLASSES = ["cat", "dog", "hedgehog"]


def make_variant(
    name: str,
    runtime: str,
    precision: str,
    accuracy: float,
    p50: float,
    confusion: list[list[int]],
    notes: list[str] | None = None,
) -> dict:
    return {
        "name": name,
        "runtime": runtime,
        "precision": precision,
        "file": f"{name}.onnx",
        "size_mb": 3.8 if precision == "int8" else 13.5,
        "accuracy": accuracy,
        "accuracy_ci95": [accuracy - 0.04, min(1.0, accuracy + 0.03)],
        "agreement": accuracy,
        "accuracy_drop": 0.95 - accuracy,
        "accuracy_drop_ci95": [0.0, 0.03],
        "latency_ms": {"p50": p50, "p90": p50 * 1.3, "p99": p50 * 2},
        "throughput_ips": 1000 / p50,
        "load_seconds": 0.1,
        "peak_rss_mb": 700.0,
        "test_images": 60,
        "float_layers": ["/head/Gemm"] if precision == "int8" else [],
        "notes": notes or [],
        "confusion_matrix": confusion,
    }


def make_report(name: str = "pets", selected: str | None = "ort-int8", backbone: str = "efficientnet_lite0") -> dict:
    """A realistic report.json's content: 4 variants, 3 classes, one failing gate, 3 epochs."""
    variants = [
        make_variant("pytorch-fp32", "pytorch", "fp32", 0.95, 12.0, [[19, 1, 0], [1, 19, 0], [0, 1, 19]]),
        make_variant("onnx-fp32", "onnxruntime", "fp32", 0.95, 3.0, [[19, 1, 0], [1, 19, 0], [0, 1, 19]]),
        make_variant(
            "ort-int8",
            "onnxruntime",
            "int8",
            0.9333,
            1.5,
            [[18, 2, 0], [1, 19, 0], [0, 1, 19]],
            ["<script>alert(1)</script> kept uint8"],
        ),
        make_variant("ov-int8", "openvino", "int8", 0.90, 4.0, [[17, 3, 0], [2, 18, 0], [0, 1, 19]]),
    ]
    gates = [
        {
            "gate": "min_accuracy",
            "threshold": 0.92,
            "variant": v["name"],
            "value": v["accuracy"],
            "passed": v["accuracy"] >= 0.92,
        }
        for v in variants
    ]
    gates += [
        {
            "gate": "max_latency_ms",
            "threshold": 20.0,
            "variant": v["name"],
            "value": v["latency_ms"]["p50"],
            "passed": True,
        }
        for v in variants
    ]
    return {
        "schema_version": 1,
        "edgetl_version": "0.1.0",
        "name": name,
        "passed": selected is not None,
        "recipe_hash": "0123456789abcdef",
        "recipe": {"model": {"backbone": backbone}},
        "dataset": {
            "origin": "folder:/data/pets",
            "classes": CLASSES,
            "counts": {
                split: {"total": n * 3, "per_class": [n, n, n]}
                for split, n in (("train", 80), ("val", 20), ("test", 20))
            },
            "skipped": [{"path": "cat/broken.jpg", "reason": "cannot identify image file"}],
        },
        "training": {
            "strategy": "partial",
            "history": [
                {"epoch": e, "train_loss": 1.0 / e, "val_accuracy": 0.8 + 0.05 * e, "lr": 0.003, "seconds": 5.0}
                for e in (1, 2, 3)
            ],
            "best_epoch": 3,
            "val_accuracy": 0.95,
            "test_accuracy": 0.95,
        },
        "export": {"opset": 17, "onnx_nodes": 95, "files": ["model.onnx"], "parity": []},
        "quantize": [],
        "variants": variants,
        "gates": gates,
        "selected": {"name": selected, "policy": "fastest", "reason": "fastest variant that passes every gate"}
        if selected
        else None,
        "stages": {"data": "built", "train": "reused", "export": "built", "quantize": "built", "validate": "built"},
        "skipped": [],
        "timings": {"export_seconds": 2.0},
        "environment": {
            "cpu_model": "Test CPU",
            "cores": 2,
            "cpu_flags": {"avx2": True},
            "packages": {"onnxruntime": "1.20"},
        },
        "build_seconds": 42.0,
    }


@pytest.fixture(autouse=True)
def no_step_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run inside GitHub Actions must not write into the real job summary."""
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> ReportFiles:
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("GITHUB_STEP_SUMMARY", raising=False)
        return write_reports(BuildReport.from_dict(make_report()), tmp_path_factory.mktemp("run"))


def test_pareto_front_keeps_only_undominated_points_fastest_first() -> None:
    # (latency ms, accuracy): 12 ms is beaten by 3 ms at equal accuracy, 4 ms by 3 ms outright.
    points = [(12.0, 0.95), (3.0, 0.95), (1.5, 0.93), (4.0, 0.90)]
    assert pareto_front(points) == [2, 1]
    assert pareto_front([(2.0, 0.9), (2.0, 0.9)]) == [0, 1]  # equal points do not beat each other
    assert pareto_front([]) == []


def test_class_scores_match_a_hand_computed_confusion_matrix() -> None:
    # rows true, columns predicted
    scores = class_scores([[5, 1, 0], [2, 3, 0], [0, 0, 0]], ["a", "b", "c"])
    a, b, c = scores
    assert (a.support, a.precision, a.recall, a.f1) == (
        6,
        pytest.approx(5 / 7),
        pytest.approx(5 / 6),
        pytest.approx(10 / 13),
    )
    assert (b.support, b.precision, b.recall, b.f1) == (
        5,
        pytest.approx(3 / 4),
        pytest.approx(3 / 5),
        pytest.approx(2 / 3),
    )
    assert (c.support, c.precision, c.recall, c.f1) == (0, None, None, None)  # never seen, never predicted


def test_class_never_predicted_has_f1_zero_not_none() -> None:
    _, missed = class_scores([[4, 0], [3, 0]], ["a", "b"])
    assert (missed.precision, missed.recall, missed.f1) == (None, 0.0, 0.0)


def test_focus_variant_falls_back_to_fastest_without_selection() -> None:
    assert focus_variant(BuildReport.from_dict(make_report(selected="onnx-fp32"))).name == "onnx-fp32"
    assert focus_variant(BuildReport.from_dict(make_report(selected=None))).name == "ort-int8"


def test_markdown_lists_every_variant_and_the_failed_gate(written: ReportFiles) -> None:
    md = written.markdown.read_text(encoding="utf-8")
    assert md.startswith("## edgetl build `pets`: ✅ PASS")
    for name in ("pytorch-fp32", "onnx-fp32", "ort-int8", "ov-int8"):
        assert f"| {name} |" in md
    failed = [line for line in md.splitlines() if line.startswith("| min_accuracy |")]
    assert failed == ["| min_accuracy | ov-int8 | 92.00% | 90.00% |"]
    assert "all gates passed" not in md
    assert "**Selected:** `ort-int8`" in md
    assert "reused: train" in md
    assert sorted(p.name for p in written.markdown.parent.iterdir()) == [
        "report.html",
        "report.md",
    ]  # no temp files left


def test_markdown_says_when_all_gates_pass_and_nothing_is_selected(tmp_path: Path) -> None:
    report = make_report(selected=None)
    report["gates"] = [g for g in report["gates"] if g["passed"]]
    md = write_reports(BuildReport.from_dict(report), tmp_path).markdown.read_text(encoding="utf-8")
    assert "❌ FAIL" in md
    assert "all gates passed" in md
    assert "no variant passes every gate" in md


def test_html_is_self_contained_and_escaped(written: ReportFiles) -> None:
    page = written.html.read_text(encoding="utf-8")
    for external in ("<script", "<link", "@import", 'src="http'):
        assert external not in page.lower()
    assert not re.search(r"url\((?!#)", page)  # only references to ids inside the page (SVG clip paths)
    assert not re.search(r'<img[^>]+src="(?!data:)', page)
    # Namespace declarations name URLs but load nothing; anything else would be a fetch.
    without_namespaces = re.sub(r'xmlns(:\w+)?="[^"]*"', "", page)
    assert "http://" not in without_namespaces and "https://" not in without_namespaces
    assert page.count("<svg") == 4  # accuracy vs latency, confusion matrix, training curves
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_html_details_the_selected_variant_and_the_gates(written: ReportFiles) -> None:
    page = written.html.read_text(encoding="utf-8")
    assert "Errors per class: ort-int8 (selected variant)" in page
    # ort-int8's cat row: precision 18/19, recall 18/20, F1 36/39
    assert (
        '<td>cat</td><td class="num">20</td><td class="num">94.74%</td><td class="num">90.00%</td><td '
        'class="num">92.31%</td>' in page
    )
    assert '<td class="num fail">90.00% ✗</td>' in page  # ov-int8 under min_accuracy
    assert (
        "gate min_accuracy 92.00%" in page and "gate max_latency_ms 20 ms" in page
    )  # threshold lines in the chart legend
    assert "cat/broken.jpg" in page and "cannot identify image file" in page


def test_step_summary_gets_the_markdown_appended(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n", encoding="utf-8")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    files = write_reports(BuildReport.from_dict(make_report()), tmp_path / "run")
    assert summary.read_text(encoding="utf-8") == "earlier step\n" + files.markdown.read_text(encoding="utf-8") + "\n"


def test_compare_names_every_run_and_its_backbone(tmp_path: Path) -> None:
    for name, backbone in (("lite0", "efficientnet_lite0"), ("lite2", "efficientnet_lite2")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(make_report(name, backbone=backbone)), encoding="utf-8")
    files = compare([tmp_path / "lite0", tmp_path / "lite2"], tmp_path / "compare")
    md = files.markdown.read_text(encoding="utf-8")
    assert "| lite0 | partial | efficientnet_lite0 | 95.00% | ort-int8 | PASS |" in md
    assert "| lite2 | partial | efficientnet_lite2 | 95.00% | ort-int8 | PASS |" in md
    assert "| lite2 | ov-int8 |" in md
    page = files.html.read_text(encoding="utf-8")
    assert page.count("<svg") == 1
    assert ">lite0<" in page and ">lite2<" in page


def test_compare_tells_apart_runs_of_the_same_recipe(tmp_path: Path) -> None:
    for directory in ("monday", "tuesday"):
        (tmp_path / directory).mkdir()
        (tmp_path / directory / "report.json").write_text(json.dumps(make_report("pets")), encoding="utf-8")
    md = compare([tmp_path / "monday", tmp_path / "tuesday"], tmp_path / "out").markdown.read_text(encoding="utf-8")
    assert "| pets (monday) |" in md and "| pets (tuesday) |" in md


def test_compare_refuses_a_run_without_report(tmp_path: Path) -> None:
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "report.json").write_text(json.dumps(make_report()), encoding="utf-8")
    missing = tmp_path / "never-built"
    with pytest.raises(DataError, match="edgetl build") as error:
        compare([tmp_path / "done", missing], tmp_path / "out")
    assert str(missing / "report.json") in str(error.value)
    assert not (tmp_path / "out").exists()


def test_compare_refuses_a_file_that_is_not_a_report(tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "report.json"))):
        compare([tmp_path], tmp_path / "out")


def test_compare_names_the_field_a_report_lacks(tmp_path: Path) -> None:
    report = make_report()
    del report["variants"][1]["accuracy"]
    (tmp_path / "report.json").write_text(json.dumps(report), encoding="utf-8")
    with pytest.raises(DataError, match=r"is not an edgetl build report \(it has no `accuracy`\)"):
        compare([tmp_path], tmp_path / "out")
    (tmp_path / "report.json").write_text(json.dumps([report]), encoding="utf-8")
    with pytest.raises(DataError, match=r"BuildReport must be a JSON object; got list"):
        compare([tmp_path], tmp_path / "out")


def test_every_recipe_gate_is_in_the_one_gate_table_and_reads_its_direction_from_it() -> None:
    # and each quantized variant's own bound, `quantize[].min_agreement`
    assert set(GatesConfig.model_fields) | {"quantize.min_agreement"} == set(GATES)
    rules = {name: gate_rule(GateOutcome(name, 0.5, "ort-int8", 0.25, False)) for name in GATES}
    assert rules == {
        "min_accuracy": "min_accuracy ≥ 50.00%",
        "min_map": "min_map ≥ 50.00%",
        "max_accuracy_drop": "max_accuracy_drop ≤ 50.00 pt",
        "min_agreement": "min_agreement ≥ 50.00%",
        "max_latency_ms": "max_latency_ms ≤ 0.50 ms",
        "max_size_mb": "max_size_mb ≤ 0.50 MB",
        "quantize.min_agreement": "quantize.min_agreement ≥ 50.00%",
    }
    row = VariantMetrics.from_dict(make_variant("ort-int8", "onnxruntime", "int8", 0.93, 1.5, [[1]]))
    assert {name: gate.read(row) for name, gate in GATES.items()} == {
        "min_accuracy": 0.93,
        "min_map": 0.93,  # a multi-label row's accuracy is its mAP
        "max_accuracy_drop": pytest.approx(0.02),
        "min_agreement": 0.93,
        "max_latency_ms": 1.5,
        "max_size_mb": 3.8,
        "quantize.min_agreement": 0.93,
    }
    assert GateOutcome("max_size_mb", 3.0, "ort-int8", 3.8, False).describe() == (
        "gate max_size_mb failed for ort-int8: needs ≤ 3 MB, measured 3.8 MB"
    )


def test_a_variant_row_round_trips_and_a_bundle_s_partial_metrics_load() -> None:
    row = make_variant("ort-int8", "onnxruntime", "int8", 0.93, 1.5, [[18, 2], [1, 19]], ["kept uint8"])
    record = VariantMetrics.from_dict(row | {"note_records": [{"kind": "kept", "values": {"type": "uint8"}}]})
    assert VariantMetrics.from_dict(record.to_dict()) == record
    keys = list(row)  # report.json's order, the confusion matrix last
    assert list(record.to_dict()) == keys[:-1] + ["note_records", "confusion_matrix"]
    assert VariantMetrics.from_dict(row).to_dict() == row  # no note records: the key stays absent
    # what a bundle's manifest must hold (its schema checks these four); the rest is None and stays out
    partial = {"accuracy": 1.0, "agreement": 1.0, "latency_ms": {"p50": 1.0}, "size_mb": 0.01, "added_later": 1}
    metrics = VariantMetrics.from_dict(partial)
    assert (metrics.name, metrics.latency_ms.p90) == (None, None)
    assert metrics.to_dict() == {k: v for k, v in partial.items() if k != "added_later"}
    with pytest.raises(KeyError, match="p50"):
        VariantMetrics.from_dict(partial | {"latency_ms": {"p90": 1.0}})


def test_the_charted_gate_is_min_accuracy_else_a_label_sets_min_map() -> None:
    assert metric_floor({"min_accuracy": 0.9, "min_map": 0.8}.get) == ("min_accuracy", 0.9)
    assert metric_floor({"min_map": 0.8}.get) == ("min_map", 0.8)  # a multi-label build charts its mAP
    assert metric_floor({}.get) is None
    svg = accuracy_latency_svg([Series("run", (ChartPoint("onnx-fp32", 2.5, 0.85),))], [], ("min_map", 0.8))
    assert "gate min_map 80.00%" in svg
