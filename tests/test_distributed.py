"""Devices, precision and torchrun: real processes, a real gloo group, real training on tiny real images.

CUDA tests skip where there is no GPU; the torchrun builds are marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import write_folder, write_recipe
from torch.utils.data import DistributedSampler

from edgetl import data, models, pipeline
from edgetl.errors import DistributedError, RecipeError
from edgetl.infer import model_logits
from edgetl.recipe import load_recipe
from edgetl.train import TrainedModel
from edgetl.train.device import Placement, resolve_device, resolve_precision
from edgetl.train.distributed import Dist, from_env, peer_errors, rank_draw, shard, timeout_seconds

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


@pytest.mark.parametrize(("size", "world"), [(10, 2), (11, 2), (7, 3), (2, 3), (64, 4)])
def test_shard_splits_the_epoch_order_as_distributed_sampler_does(size: int, world: int) -> None:
    order = torch.randperm(size, generator=torch.Generator().manual_seed(size))
    for rank in range(world):
        sampler = DistributedSampler(range(size), num_replicas=world, rank=rank, shuffle=False)
        assert shard(order, Dist(rank, world)).tolist() == order[list(sampler)].tolist()


def test_the_ranks_batches_make_the_one_process_global_batch() -> None:
    order, world, per_rank = torch.randperm(48), 2, 4
    shards = [shard(order, Dist(rank, world)) for rank in range(world)]
    for k in range(48 // (per_rank * world)):
        together = torch.cat([s[k * per_rank : (k + 1) * per_rank] for s in shards])
        assert sorted(together.tolist()) == sorted(order[k * 8 : (k + 1) * 8].tolist())


def test_the_ranks_draw_different_target_picks_and_advance_the_generator_as_one_process_does() -> None:
    one = torch.Generator().manual_seed(7)
    whole = rank_draw(1000, 16, one, Dist())  # one process, global batch 16
    gens = [torch.Generator().manual_seed(7) for _ in range(2)]
    parts = [rank_draw(1000, 8, gens[rank], Dist(rank, 2)) for rank in range(2)]  # two ranks, 8 each
    assert torch.stack(parts, 1).flatten().tolist() == whole.tolist()  # together: the one-process picks
    assert parts[0].tolist() != parts[1].tolist()
    for gen in gens:  # the next epoch order is the one-process one on every rank
        assert torch.equal(gen.get_state(), one.get_state())


def test_torchruns_environment_names_the_rank_and_a_plain_process_is_rank_0_of_1() -> None:
    dist = from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (dist.rank, dist.world_size, dist.local_rank, dist.local_world_size, dist.is_main) == (3, 4, 1, 2, False)
    assert from_env({}) == Dist() and Dist().is_main and not Dist().enabled


def test_cpu_precision_auto_is_fp32_and_fp16_on_the_cpu_is_refused() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(RecipeError, match=r"`train.precision` is fp16"):
        resolve_precision("fp16", cpu)
    assert Placement(cpu, "fp32").exact and not Placement(cpu, "bf16").exact


def test_a_lost_peer_becomes_one_distributed_error_and_other_errors_pass_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gloo = "[/pytorch/third_party/gloo/pair.cc:561] Connection closed by peer [127.0.0.1]:5. This is typically caused"
    with pytest.raises(DistributedError, match=r"^lost the other training processes \(Connection closed by peer") as e:
        with peer_errors(Dist(0, 2)):
            raise RuntimeError(gloo)
    assert e.value.exit_code == 6 and "--resume" in str(e.value) and "pair.cc" not in str(e.value)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"), peer_errors(Dist(0, 2)):
        raise RuntimeError("shapes cannot be multiplied")
    monkeypatch.setenv("EDGETL_DIST_TIMEOUT", "soon")
    with pytest.raises(RecipeError, match="EDGETL_DIST_TIMEOUT must be a whole number of seconds"):
        timeout_seconds()


@no_cuda
@pytest.mark.parametrize("setting", ["cuda", "cuda:0"])
def test_asking_for_cuda_without_a_gpu_names_the_field(setting: str) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RecipeError, match=rf"`train.device` is {setting}, but CUDA is not available"):
        resolve_device(setting)


def test_a_misspelt_device_is_a_recipe_error(tiny_recipe: Path) -> None:
    with pytest.raises(RecipeError, match=r"train.device"):
        load_recipe(tiny_recipe, ["train.device=gpu"])


@pytest.mark.slow
def test_bf16_autocast_on_the_cpu_trains_and_hands_back_cpu_fp32_references(tiny_recipe: Path, tmp_path: Path) -> None:
    """The path every GPU build takes: training under autocast, then logits of the CPU FP32 model for export parity."""
    overrides = ["train.device=cpu", "train.precision=bf16", "train.strategy=partial", "train.unfreeze=1"]
    overrides += ["train.epochs=1"]  # device: a GPU machine's auto would train on CUDA
    metrics = pipeline.train_model(load_recipe(tiny_recipe, overrides), tmp_path / "run")
    assert (metrics["device"], metrics["precision"], metrics["world_size"]) == ("cpu", "bf16", 1)
    folder = next((tmp_path / "run" / "stages").glob("train-*"))
    trained = TrainedModel.load(folder)
    loaded = models.load_checkpoint(folder / "checkpoint.pt")
    recipe = load_recipe(tiny_recipe)
    dataset = data.run(recipe.data, loaded.preprocessing, recipe.seed)
    fp32 = model_logits(loaded.model, dataset.val.images, loaded.preprocessing)
    np.testing.assert_allclose(trained.val_logits, fp32, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _photo_recipe(tmp_path: Path, strategy: str, augment: str, epochs: int) -> Path:
    """Two photo classes, 40 images each (16 test images), lite0 at 32 px; ONNX Runtime only, no quantization."""
    folder = write_folder(tmp_path / "images", count=40)
    return write_recipe(
        tmp_path / "recipe.yaml",
        f"""
        name: ddp
        seed: 0
        data: {{path: {folder}, val_split: 0.2, test_split: 0.2, image_size: 32, augment: {augment}}}
        model: {{backbone: efficientnet_lite0}}
        train: {{strategy: {strategy}, unfreeze: 1, epochs: {epochs}, batch_size: 8, lr: 0.01}}
        export: {{runtimes: [onnxruntime]}}
        quantize: []
        measure: {{latency_rounds: 1, latency_runs: 2, warmup: 1, throughput_batch: 4}}
        """,
    )


def _env(tmp_path: Path) -> dict[str, str]:
    """The worktree on the path, and a private TMPDIR to see what the ranks leave behind."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": root, "TMPDIR": str(tmp_path / "tmp"), "EDGETL_DIST_TIMEOUT": "60"}


def _torchrun(recipe: Path, run: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    command = [*TORCHRUN, "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "edgetl", "build"]
    return subprocess.run(
        [*command, str(recipe), "-o", str(run), *args], capture_output=True, text=True, env=env, timeout=300
    )


def _torchrun_training(recipe: Path, run: Path, env: dict, resume: bool) -> subprocess.CompletedProcess:
    """`pipeline.train_model` (the data and train stages of `edgetl build [--resume]`) on two processes."""
    script = run.parent / "train_only.py"
    script.write_text(
        "import logging, sys\n"
        "from pathlib import Path\n"
        "from edgetl import pipeline\n"
        "from edgetl.recipe import load_recipe\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "pipeline.train_model(load_recipe(Path(sys.argv[1])), Path(sys.argv[2]), resume=sys.argv[3] == 'resume')\n"
    )
    command = [*TORCHRUN, "--nproc-per-node", "2", "--master-port", str(_free_port()), str(script)]
    arguments = [str(recipe), str(run), "resume" if resume else "fresh"]
    return subprocess.run([*command, *arguments], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_a_two_process_build_writes_one_report_and_bundle_and_matches_one_process(tmp_path: Path) -> None:
    recipe = _photo_recipe(tmp_path, "linear_probe", "none", 5)
    env = _env(tmp_path)
    done = _torchrun(recipe, tmp_path / "two", env)
    assert done.returncode == 0, done.stderr
    assert "rank 0 of 2 (gloo, cpu)" in done.stderr
    assert [p.parent.name for p in tmp_path.rglob("report.json")] == ["two"]
    assert [p.parent.name for p in tmp_path.rglob("ddp.tar.gz")] == ["two"]
    assert not list((tmp_path / "tmp").glob("edgetl-rank*")), "a rank left its private stage copies behind"
    two = json.loads((tmp_path / "two" / "report.json").read_text())["training"]
    assert (two["device"], two["precision"], two["world_size"]) == ("cpu", "fp32", 2)
    one = pipeline.train_model(load_recipe(recipe), tmp_path / "one")  # the same seed in one process
    assert one["world_size"] == 1
    assert abs(two["test_accuracy"] - one["test_accuracy"]) <= 0.02, (one["test_accuracy"], two["test_accuracy"])
    assert len(two["history"]) == 5


@pytest.mark.slow
def test_a_dead_rank_stops_the_other_with_a_clear_error_and_resume_ends_where_an_unbroken_run_does(
    tmp_path: Path,
) -> None:
    recipe = _photo_recipe(tmp_path, "partial", "default", 4)
    env = _env(tmp_path)
    run = tmp_path / "run"
    launch = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "edgetl", "build", str(recipe), "-o", str(run)],
            env={**env, **launch, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        for rank in range(2)
    ]
    deadline = time.monotonic() + 180
    while not list((run / "state").glob("train-*.pt")) and time.monotonic() < deadline and ranks[0].poll() is None:
        time.sleep(0.05)
    os.kill(ranks[1].pid, signal.SIGKILL)  # no torchrun agent to tear the group down: rank 0 must notice alone
    killed = time.monotonic()
    stderr = ranks[0].communicate(timeout=90)[1]
    ranks[1].wait()
    assert ranks[0].returncode == 6, stderr
    assert time.monotonic() - killed < 60
    assert "edgetl: error: rank 0 of 2: lost the other training processes" in stderr and "Traceback" not in stderr
    assert not (run / "metrics.json").exists(), "killed too late to test resuming"

    # training only (what --resume changes), resumed and uninterrupted, by the same two processes
    resumed = _torchrun_training(recipe, run, env, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from epoch" in resumed.stderr
    reference = _torchrun_training(recipe, tmp_path / "ref", env, resume=False)
    assert reference.returncode == 0, reference.stderr
    want = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    got = json.loads((run / "metrics.json").read_text())
    assert [h["val_accuracy"] for h in got["history"]] == [h["val_accuracy"] for h in want["history"]]
    assert [round(h["train_loss"], 5) for h in got["history"]] == [round(h["train_loss"], 5) for h in want["history"]]
    assert got["test_accuracy"] == want["test_accuracy"]
    # the gathered val logits (half of them scored by rank 1) are those of the model rank 0 kept, BatchNorm
    # statistics included: what export parity compares with
    folder = next((tmp_path / "ref" / "stages").glob("train-*"))
    loaded = models.load_checkpoint(folder / "checkpoint.pt")
    dataset = data.run(load_recipe(recipe).data, loaded.preprocessing, 0)
    kept = model_logits(loaded.model, dataset.val.images, loaded.preprocessing)
    np.testing.assert_allclose(TrainedModel.load(folder).val_logits, kept, atol=1e-4)


@pytest.mark.slow
def test_killing_a_rank_under_torchrun_ends_the_launch_non_zero_with_the_cause(tmp_path: Path) -> None:
    recipe = _photo_recipe(tmp_path, "partial", "default", 20)
    command = [*TORCHRUN, "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "edgetl", "build"]
    launcher = subprocess.Popen(
        [*command, str(recipe), "-o", str(tmp_path / "run")], env=_env(tmp_path), stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 180
    while not list((tmp_path / "run" / "state").glob("train-*.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    rank1 = next(p for p in psutil.Process(launcher.pid).children() if p.environ().get("RANK") == "1")
    rank1.send_signal(signal.SIGKILL)
    stderr = launcher.communicate(timeout=90)[1]
    assert launcher.returncode != 0
    # rank 0 either noticed its peer gone first, or torchrun's SIGTERM reached it first
    assert "edgetl: error: rank 0 of 2: lost the other training processes" in stderr or (
        "rank 0 of 2: terminated (SIGTERM; torchrun stops every rank when one fails" in stderr
    )
    assert "Signal 9 (SIGKILL) received by PID" in stderr  # torchrun's summary names the rank that died
    assert not (tmp_path / "run" / "report.json").exists()


@needs_cuda
def test_auto_picks_the_gpu_in_bf16_or_fp16_and_cuda_n_names_the_gpu() -> None:
    device = resolve_device("auto")
    assert device.type == "cuda"
    assert resolve_precision("auto", device) == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(RecipeError, match="this machine has"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


@needs_cuda
def test_autocast_runs_the_convolutions_in_reduced_precision() -> None:
    place = Placement(torch.device("cuda", 0), resolve_precision("auto", torch.device("cuda", 0)))
    conv = torch.nn.Conv2d(3, 8, 3).cuda()
    with place.autocast():
        out = conv(place.put(torch.randn(2, 3, 16, 16)))
    assert out.dtype in (torch.bfloat16, torch.float16)


@needs_cuda
@pytest.mark.slow
def test_a_gpu_fine_tune_loads_on_the_cpu_with_its_cpu_fp32_references(tiny_recipe: Path, tmp_path: Path) -> None:
    overrides = ["train.device=cuda", "train.strategy=finetune", "train.epochs=2", "data.augment=default"]
    metrics = pipeline.train_model(load_recipe(tiny_recipe, overrides), tmp_path / "run")
    assert metrics["device"].startswith("cuda") and metrics["precision"] in ("bf16", "fp16")
    folder = next((tmp_path / "run" / "stages").glob("train-*"))
    loaded = models.load_checkpoint(folder / "checkpoint.pt")  # map_location="cpu"
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())
    recipe = load_recipe(tiny_recipe)
    dataset = data.run(recipe.data, loaded.preprocessing, recipe.seed)
    cpu = model_logits(loaded.model, dataset.test.images, loaded.preprocessing)
    np.testing.assert_allclose(TrainedModel.load(folder).test_logits, cpu, atol=1e-4)
