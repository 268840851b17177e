"""`edgetl sweep --address`: a sweep that joins a real Ray cluster started with `ray start --head`.

With a token on its machine, `ray start --head` (Ray >= 2.59) turns token authentication on, and a
driver joining an explicit address sends the token only with RAY_AUTH_MODE=token.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from edgetl.errors import RecipeError
from edgetl.sweep.run import _start_ray

pytest.importorskip("ray")

SWEEP = """
name: joined
base:
  name: digits
  data: {builtin: digits, image_size: 32, augment: none}
  model: {backbone: efficientnet_lite0}
  train: {strategy: linear_probe, epochs: 1, batch_size: 64, lr: 0.01}
  quantize: []
  measure: {latency_rounds: 2, latency_runs: 3, warmup: 2, throughput_batch: 4}
space:
  train.lr: [0.01]
budget: {min_accuracy: 0.5}
resources: {cpus: 1}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def head(tmp_path):
    """A one-CPU head node with token authentication, its token (and HOME) in `tmp_path`, not the user's."""
    port = _free_port()
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text(uuid.uuid4().hex)
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_AUTH")}
    args = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={port}"]
    args += ["--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"]
    process = subprocess.Popen(
        args, env={**env, "HOME": str(tmp_path)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while not _listening(port):
        assert process.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
        time.sleep(0.5)
    yield f"127.0.0.1:{port}", {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    process.terminate()
    process.wait(timeout=60)


@pytest.mark.slow
def test_sweep_joins_a_token_authenticated_cluster(head, tmp_path):
    address, env = head
    (tmp_path / "sweep.yaml").write_text(SWEEP)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "edgetl", "sweep", str(tmp_path / "sweep.yaml"), "--address", address]
    done = subprocess.run([*args, "-o", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "sweep.json").read_text())
    assert record["counts"]["ok"] == 1 and record["best"]["trial"].startswith("joined-")


def test_no_cluster_at_address_is_a_clear_error():
    with pytest.raises(RecipeError, match=r"--address 127\.0\.0\.1:\d+: no Ray cluster answers there"):
        _start_ray(f"127.0.0.1:{_free_port()}")


@pytest.mark.slow
def test_without_address_a_stale_cluster_record_is_ignored(monkeypatch):
    """`ray start` records its head in /tmp/ray/ray_current_cluster, and the record outlives a killed head."""
    import ray

    record = Path("/tmp/ray/ray_current_cluster")
    record.parent.mkdir(exist_ok=True)
    before = record.read_text() if record.is_file() else None
    record.write_text(f"127.0.0.1:{_free_port()}")  # nothing listens there
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        assert _start_ray(None) is True
        assert ray.cluster_resources()["CPU"] >= 1
    finally:
        ray.shutdown()
        record.write_text(before) if before is not None else record.unlink(missing_ok=True)
