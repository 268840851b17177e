"""`edgetl sweep` on a local Ray with 2 CPUs: real builds of digits at 32 px as trials.

One Ray session for the module (starting Ray costs seconds); the sweep runs once and the
tests read its outputs, then rerun it (every trial reused) and run it with a budget no
variant meets (exit 3, every stage reused from the shared cache).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from edgetl.cli import main
from edgetl.errors import RecipeError
from edgetl.sweep.spec import load_sweep

ray = pytest.importorskip("ray")

SWEEP = """
name: digits-sweep
base:
  name: digits
  data: {builtin: digits, image_size: 32, augment: none}
  model: {backbone: efficientnet_lite0}
  train: {strategy: linear_probe, epochs: 2, unfreeze: 99, batch_size: 64, lr: 0.01}
  measure: {latency_rounds: 2, latency_runs: 3, warmup: 2, throughput_batch: 4}
  device: {runtimes: [onnxruntime, openvino]}
search: grid
space:
  train.strategy: [linear_probe, partial]     # partial with unfreeze 99 fails: exit 2, recorded
  quantize:                                   # a precision-only change: one trained model
    - [{runtime: openvino, precision: int8, calibration_images: 50}]
    - [{runtime: openvino, precision: fp16}]
budget:
  max_latency_ms: 200
  min_accuracy: 0.5
"""


def _write(tmp: Path, text: str) -> Path:
    path = tmp / "sweep.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def swept(local_ray, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    out = tmp / "out"
    code = main(["sweep", str(_write(tmp, SWEEP)), "--concurrency", "2", "--output", str(out)])
    return tmp, out, code, json.loads((out / "sweep.json").read_text())


@pytest.mark.slow
def test_sweep_finishes_with_best_trial_within_budget(swept, capsys):
    _, out, code, data = swept
    assert code == 0
    assert data["counts"] == {
        "ok": 2,
        "over_budget": 0,
        "failed": 2,
        "stopped": 0,
        "crashed": 0,
        "reused": 0,
        "total": 4,
    }
    best = data["best"]
    assert best["accuracy"] >= 0.5 and best["p50_ms"] <= 200
    assert best["overrides"][0] == "train.strategy=linear_probe"
    for name in ("sweep.md", "sweep.html", "best.yaml", "bundle/edgetl.json", best["archive"]):
        assert (out / name).is_file(), name
    assert json.loads((out / "bundle" / "edgetl.json").read_text())["variant"] == best["variant"]
    html = (out / "sweep.html").read_text()
    assert "Pareto front" in html and "gate max_latency_ms 200 ms" in html and "sortable" in html
    assert best["trial"] in (out / "sweep.md").read_text()
    # every measured variant of every trial is a point; the front is a subset of them
    measured = sum(1 for t in data["trials"] for v in t["variants"] if v["runtime"] != "pytorch")
    assert measured == 6 and 1 <= len(data["pareto"]) <= measured


@pytest.mark.slow
def test_failing_trial_is_recorded_and_the_sweep_goes_on(swept):
    failed = [t for t in swept[3]["trials"] if t["status"] == "failed"]
    assert len(failed) == 2
    for trial in failed:
        assert trial["exit_code"] == 2
        assert "train.unfreeze" in trial["error"] and "train.strategy=partial" in trial["overrides"]


@pytest.mark.slow
def test_precision_only_change_reuses_the_trained_model(swept):
    ok = [t for t in swept[3]["trials"] if t["status"] == "ok"]
    assert sorted(t["stages"]["train"] for t in ok) == ["built", "reused"]
    assert len(list((swept[1] / "stages").glob("train-*"))) == 1


@pytest.mark.slow
def test_rerun_reuses_every_finished_trial_and_over_budget_exits_3(swept, capsys):
    tmp, out, _, first = swept
    assert main(["sweep", str(tmp / "sweep.yaml"), "--output", str(out)]) == 0
    again = json.loads((out / "sweep.json").read_text())
    assert again["counts"]["reused"] == 4 and again["best"] == first["best"]
    assert all(t["seconds"] == f["seconds"] for t, f in zip(again["trials"], first["trials"]))
    # A budget nothing meets: every trial is new (the budget is part of its recipe), every stage reused.
    tight = _write(tmp, SWEEP.replace("max_latency_ms: 200", "max_latency_ms: 0.0001"))
    assert main(["sweep", str(tight), "--output", str(out)]) == 3
    assert "no trial of the sweep has a variant within the budget" in capsys.readouterr().err
    data = json.loads((out / "sweep.json").read_text())
    assert data["best"] is None and data["counts"]["over_budget"] == 2 and data["counts"]["reused"] == 0
    assert not (out / "bundle").exists() and not (out / "best.yaml").exists()
    for trial in (t for t in data["trials"] if t["status"] == "over_budget"):
        assert set(trial["stages"].values()) == {"reused"}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("search: grid", "serch: grid"), "`serch` is not a known field"),
        (("train.strategy:", "train.strategi:"), "Did you mean `strategy`?"),
        (("[linear_probe, partial]", "[linear_probe, sideways]"), "the value 'sideways' does not make a valid recipe"),
        (("budget:", "space2: {}\nbudget:"), "`space2` is not a known field"),
        (("search: grid", "search: tpe\ntrials: 0"), "`trials`"),
        (("  min_accuracy: 0.5", "  min_acc: 0.5"), "`budget.min_acc` is not a known field"),
        (("  data: {builtin: digits,", "  task: multilabel\n  data: {builtin: digits-mosaic,"), "`budget.min_map`"),
    ],
)
def test_sweep_file_errors_name_the_field(tmp_path, edit, message):
    path = _write(tmp_path, SWEEP.replace(*edit))
    with pytest.raises(RecipeError) as raised:
        load_sweep(path)
    assert message in str(raised.value) and str(path) in str(raised.value)


def test_ranges_and_grids_fit_the_search(tmp_path, capsys):
    ranged = SWEEP.replace("train.strategy: [linear_probe, partial]", "train.lr: {low: 0.0001, high: 0.1, log: true}")
    with pytest.raises(RecipeError, match="search grid enumerates lists"):
        load_sweep(_write(tmp_path, ranged))
    plan = load_sweep(_write(tmp_path, ranged.replace("search: grid", "search: tpe")))
    assert plan.trial_overrides({"train.lr": 0.001, "quantize": [{"runtime": "openvino", "precision": "fp16"}]}) == [
        "train.lr=0.001",
        "quantize=[{precision: fp16, runtime: openvino}]",
    ]
    # exit 2 from the command line, before Ray starts
    assert main(["sweep", str(_write(tmp_path, SWEEP.replace("base:", "bass:")))]) == 2
    assert "`bass` is not a known field" in capsys.readouterr().err


@pytest.mark.slow
def test_tpe_with_asha_stops_poor_trials_and_finishes_the_best(local_ray, tmp_path):
    sweep = """
    name: asha
    base:
      name: digits
      data: {builtin: digits, image_size: 32, augment: none}
      model: {backbone: efficientnet_lite0}
      train: {strategy: linear_probe, epochs: 3, batch_size: 64}
      quantize: []
      measure: {latency_rounds: 2, latency_runs: 3, warmup: 2, throughput_batch: 4}
    search: tpe
    trials: 4
    space:
      train.lr: {low: 0.00001, high: 0.05, log: true}
    budget: {max_latency_ms: 200}
    early_stop: {grace_epochs: 1, reduction_factor: 2}
    """
    out = tmp_path / "out"
    assert main(["sweep", str(_write(tmp_path, sweep)), "--concurrency", "2", "--output", str(out)]) == 0
    data = json.loads((out / "sweep.json").read_text())
    trials = data["trials"]
    assert len(trials) == 4 and data["counts"]["ok"] >= 1
    stopped = [t for t in trials if t["status"] == "stopped"]
    assert stopped and all(len(t["history"]) < 3 and not t["variants"] for t in stopped)
    lrs = {float(t["overrides"][0].split("=")[1]) for t in trials}
    assert len(lrs) == 4 and all(1e-5 <= lr <= 0.05 for lr in lrs)
    # the best finished all its epochs and is the most accurate of the finished trials
    finished = [t for t in trials if t["status"] == "ok"]
    best = max(finished, key=lambda t: t["variants"][1]["accuracy"])
    assert data["best"]["trial"] == best["name"] and len(best["history"]) == 3
