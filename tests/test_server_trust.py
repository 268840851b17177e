"""`edgetl serve` and the device CLI under abuse: bad arguments, a busy port, a closed stdout,
slow and vanishing clients, shutdown under load, and a model that cannot predict.

Real sockets on 127.0.0.1 only, the real CLI in a subprocess where signals, exit codes and
temp folders matter, and the tiny real bundle from `tests.tiny_bundle`. Every client loop
stops by itself within a few seconds.
"""

from __future__ import annotations

import asyncio
import gc
import http.client
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image
from starlette.requests import ClientDisconnect

from edgetl.cli import main
from edgetl.errors import InferenceError
from edgetl.runtime.engines import open_engine
from edgetl.runtime.predictor import Predictor
from edgetl.runtime.server import RequestRejected, _unless_closing, build_server
from tests.test_server import RecordingEngine, call, image, running, serving
from tests.tiny_bundle import write_tiny_bundle

ROOT = Path(__file__).parent.parent
SHUTTING_DOWN = {"error": "server is shutting down"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bundle(tmp_path_factory.mktemp("tiny") / "bundle")


@pytest.fixture(scope="module")
def archive(bundle: Path) -> Path:
    """The bundle packed as `edgetl build` packs it: `tiny/<file>` members."""
    path = bundle.parent / "tiny.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for file in sorted(bundle.iterdir()):
            tar.add(file, arcname=f"tiny/{file.name}")
    return path


@pytest.fixture(scope="module")
def predictor(bundle: Path) -> Predictor:
    return Predictor.load(bundle, threads=1)


@contextmanager
def server_log(caplog: pytest.LogCaptureFixture) -> Iterator[list[logging.LogRecord]]:
    """uvicorn's log while the block runs (its dictConfig stops propagation, so listen on it directly)."""
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(caplog.handler)
    try:
        yield caplog.records
    finally:
        logger.removeHandler(caplog.handler)


def assert_no_traceback(records: list[logging.LogRecord]) -> None:
    bad = [
        r.getMessage()
        for r in records
        if r.exc_info or r.levelno >= logging.ERROR or "Exception in ASGI" in r.getMessage()
    ]
    assert bad == [], bad


# --- the CLI -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "rule"),
    [
        (["--port", "99999"], "a port number from 0 to 65535"),
        (["--port", "-1"], "a port number from 0 to 65535"),
        (["--concurrency", "0"], "an integer ≥ 1"),
        (["--max-body-mb", "nan"], "a number > 0"),
        (["--max-body-mb", "-3"], "a number > 0"),
        (["--read-timeout", "inf"], "a number > 0"),
    ],
)
def test_a_bad_serve_argument_is_one_line_naming_it_with_exit_2(
    bundle: Path, args: list[str], rule: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", str(bundle), *args])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"edgetl serve: error: argument {args[0]}: must be {rule}"), error
    assert error.endswith(f"got '{args[1]}'"), error


def test_a_busy_port_is_exit_5_naming_host_and_port_before_serving(bundle: Path, capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(bundle), "--port", str(port)]) == 5
    err = capsys.readouterr().err
    assert f"edgetl: error: 127.0.0.1:{port} is already in use by another process" in err and "--port" in err
    assert "serving" not in err and "Traceback" not in err


@pytest.mark.parametrize("count", [2, 300])  # 2: the output waits in the buffer until exit; 300: fills it mid-run
def test_predict_into_a_closed_pipe_ends_quietly_with_141(tmp_path: Path, bundle: Path, count: int) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(count):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(folder / f"{i:03d}.png")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone, as `head -1` is once it has its line
    try:
        done = subprocess.run(
            [sys.executable, "-m", "edgetl", "predict", str(bundle), str(folder)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 141 and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


# --- slow and vanishing clients ------------------------------------------------------------


def drip(
    port: int, clients: dict[str, tuple[bytes, bytes]], interval: float = 0.2, give_up: float = 5.0
) -> dict[str, tuple[float | None, bytes]]:
    """Open one connection per client, send its opening bytes, then its drip byte every `interval` s
    until the server answers or closes. Returns per client: seconds until closed (None if still open
    after `give_up` s) and what the server sent."""
    socks, received, closed = {}, {name: b"" for name in clients}, {}
    started = time.monotonic()
    for name, (opening, _) in clients.items():
        socks[name] = socket.create_connection(("127.0.0.1", port), timeout=5)
        socks[name].sendall(opening)
        socks[name].setblocking(False)
    while len(closed) < len(socks) and time.monotonic() - started < give_up:
        time.sleep(interval)
        for name, sock in socks.items():
            if name in closed:
                continue
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                data = None
            except ConnectionResetError:
                data = b""
            if data == b"":
                closed[name] = time.monotonic() - started
            elif data:
                received[name] += data
            elif clients[name][1] and not received[name]:  # still sending; stop once answered
                try:
                    sock.send(clients[name][1])
                except (BrokenPipeError, ConnectionResetError):
                    closed[name] = time.monotonic() - started
    for sock in socks.values():
        sock.close()
    return {name: (closed.get(name), received[name]) for name in clients}


SLOW_HEADERS = (b"POST /predict HTTP/1.1\r\nX-Slow: ", b"a")
SLOW_BODY = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n", b"\0")
SILENT = (b"", b"")


def test_slow_clients_are_cut_off_by_the_read_timeout_while_8x50_requests_are_all_answered(
    predictor: Predictor, caplog: pytest.LogCaptureFixture
) -> None:
    clients = {f"headers-{i}": SLOW_HEADERS for i in range(8)} | {f"body-{i}": SLOW_BODY for i in range(8)}
    clients |= {f"silent-{i}": SILENT for i in range(4)}
    colours = ("red", "green", "blue")
    payloads = {colour: image(colour, "JPEG") for colour in colours}
    with serving(predictor, concurrency=2, read_timeout=1.0) as port, server_log(caplog) as records:
        with ThreadPoolExecutor(1) as slow, ThreadPoolExecutor(8) as normal:
            dripped = slow.submit(drip, port, clients)
            ask = lambda i: call(port, "POST", "/predict?top_k=1", payloads[colours[i % 3]])  # noqa: E731
            answers = list(normal.map(ask, range(400)))
            cut = dripped.result()
        assert call(port, "GET", "/health") == (200, {"status": "ok"})
    assert [status for status, _ in answers] == [200] * 400
    assert [answer["label"] for _, answer in answers] == [colours[i % 3] for i in range(400)]
    for name, (seconds, sent) in cut.items():
        assert seconds is not None and 0.9 <= seconds <= 3.5, (name, seconds)
        if name.startswith("body"):
            head, _, body = sent.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower(), sent
            assert "did not arrive within 1 s" in json.loads(body)["error"]
        else:
            assert sent == b"", (name, sent)  # cut off before there was a request to answer
    assert sum("no complete request headers within 1 s" in r.getMessage() for r in records) == 12
    assert_no_traceback(records)


def test_a_client_that_leaves_mid_body_is_one_info_line(predictor: Predictor, caplog: pytest.LogCaptureFixture) -> None:
    with serving(predictor) as port, server_log(caplog) as records:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(SLOW_BODY[0] + b"\0" * 100)
            time.sleep(0.2)
        deadline = time.monotonic() + 5
        while not any("went away" in r.getMessage() for r in records) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert call(port, "GET", "/health") == (200, {"status": "ok"})
    left = [r for r in records if "went away" in r.getMessage()]
    assert [r.levelname for r in left] == ["INFO"], [r.getMessage() for r in records]
    went_away = r"127\.0\.0\.1:\d+ - POST /predict: the client went away before sending the whole body"
    assert re.match(went_away, left[0].getMessage())
    assert_no_traceback(records)


# --- shutdown ------------------------------------------------------------------------------


def test_at_shutdown_the_predicting_request_finishes_and_the_waiting_get_a_json_503(predictor: Predictor) -> None:
    engine = RecordingEngine(predictor.engine)
    server = build_server(Predictor(predictor.bundle, engine), concurrency=1)  # type: ignore[arg-type]
    with running(server) as port, ThreadPoolExecutor(7) as pool:
        engine.delay = 1.0  # after the startup check: one prediction outlives the moment shutdown begins
        answers = [pool.submit(call, port, "POST", "/predict", image("red")) for _ in range(6)]
        uploading = pool.submit(drip, port, {"uploading": SLOW_BODY}, 0.1, 5.0)
        deadline = time.monotonic() + 5
        while engine.active == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # the other five are waiting for the slot
        server.should_exit = True  # what uvicorn's SIGTERM handler does (signals reach only the main thread)
        results = [answer.result() for answer in answers]
        _, sent = uploading.result()["uploading"]
    assert sorted(status for status, _ in results) == [200] + [503] * 5, results
    assert all(body == SHUTTING_DOWN for status, body in results if status == 503)
    assert sent.startswith(b"HTTP/1.1 503") and json.loads(sent.partition(b"\r\n\r\n")[2]) == SHUTTING_DOWN


def test_sigterm_under_load_answers_only_json_exits_0_and_removes_the_unpacked_bundle(
    tmp_path: Path, archive: Path
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    command = [sys.executable, "-m", "edgetl", "serve", str(archive), "--port", "0", "--concurrency", "1"]
    env = {**os.environ, "TMPDIR": str(temp)}
    server = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        first = server.stderr.readline()  # type: ignore[union-attr]
        port = int(re.search(r"http://127\.0\.0\.1:(\d+) ", first).group(1))  # type: ignore[union-attr]
        assert len(list(temp.glob("edgetl-bundle-*"))) == 1  # unpacked while serving

        def terminate_after_30(answered: int) -> bool:
            if answered < 30:
                return False
            server.send_signal(signal.SIGTERM)
            return True

        answers = load_until_stopped(port, terminate_after_30)
        code = server.wait(timeout=30)
    finally:
        server.kill()
        log = server.stderr.read()  # type: ignore[union-attr]
    statuses = [status for status, _, _ in answers]
    assert code == 0 and "Traceback" not in log and "Exception in ASGI" not in log, log
    assert list(temp.glob("edgetl-bundle-*")) == []  # (ONNX Runtime leaves its own `.ses` file there)
    assert set(statuses) == {200, 503} and all(kind == "application/json" for _, kind, _ in answers), answers
    assert all(body == SHUTTING_DOWN for status, _, body in answers if status == 503)
    print(f"SIGTERM under load: {statuses.count(200)} × 200, {statuses.count(503)} × 503 (JSON), nothing else")


def load_until_stopped(
    port: int, on_answer: Callable[[int], bool], clients: int = 12, give_up: float = 20.0
) -> list[tuple[int, str, dict]]:
    """`clients` threads post a 1600×1200 photo-like JPEG (tens of ms to decode) until the server
    stops taking connections; `on_answer(count)` is called after each answer until it returns True.
    Returns (status, content type, JSON body) per answer; a plain-text body fails json.loads."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (1200, 1600, 3), np.uint8)).save(buffer, "JPEG", quality=80)
    payload, answers, lock, fired = buffer.getvalue(), [], threading.Lock(), threading.Event()
    started = time.monotonic()

    def client() -> None:
        while time.monotonic() - started < give_up:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
            try:
                connection.request("POST", "/predict", body=payload)
                response = connection.getresponse()
                answer = (response.status, response.getheader("content-type"), json.loads(response.read()))
            except (ConnectionError, http.client.RemoteDisconnected):
                if fired.is_set():
                    return  # the server has stopped listening
                time.sleep(0.05)  # not listening yet
                continue
            finally:
                connection.close()
            with lock:
                answers.append(answer)
                if not fired.is_set() and on_answer(len(answers)):
                    fired.set()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


# --- a model that cannot predict -----------------------------------------------------------


def test_a_model_with_nan_outputs_is_503_on_health_and_500_json_on_predict(
    bundle: Path, predictor: Predictor, tmp_path: Path
) -> None:
    model = onnx.load(bundle / "model.onnx")
    for tensor in model.graph.initializer:  # every weight NaN: a model as `weight_decay=.inf` trains it
        nan = np.full(numpy_helper.to_array(tensor).shape, np.nan, np.float32)
        tensor.CopyFrom(numpy_helper.from_array(nan, tensor.name))
    onnx.save(model, tmp_path / "nan.onnx")
    with serving(Predictor(predictor.bundle, open_engine(tmp_path / "nan.onnx", "onnxruntime", 1))) as port:
        status, health = call(port, "GET", "/health")
        assert status == 503 and health["status"] == "error" and "non-finite" in health["error"], health
        status, answer = call(port, "POST", "/predict", image("red"))
        assert (
            status == 500 and answer["error"].startswith("the model cannot predict") and "non-finite" in answer["error"]
        )


class FailingEngine:
    """An engine whose every run raises what the runtime raises for a model it cannot run."""

    runtime = "onnxruntime"

    def run(self, batch: np.ndarray) -> np.ndarray:
        raise InferenceError("model.onnx: ONNX Runtime cannot run node 'Gemm_0'")


def test_a_model_that_raises_inference_error_is_503_on_health_and_500_on_predict_naming_why(
    predictor: Predictor,
) -> None:
    with serving(Predictor(predictor.bundle, FailingEngine())) as port:  # type: ignore[arg-type]
        status, health = call(port, "GET", "/health")
        assert status == 503 and health["error"].endswith("model.onnx: ONNX Runtime cannot run node 'Gemm_0'"), health
        why = "the model cannot predict: model.onnx: ONNX Runtime cannot run node 'Gemm_0'"
        assert call(port, "POST", "/predict", image("red")) == (500, {"error": why})


def test_work_cut_short_by_shutdown_that_ends_in_its_own_error_is_not_logged_as_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The race CI once hit: SIGTERM cancels a body read just as the client goes away, so the
    cancelled read ends in ClientDisconnect, which nobody awaits."""

    async def body_read() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            raise ClientDisconnect() from None

    async def shut_down_during_the_read() -> None:
        closing = asyncio.Event()
        asyncio.get_running_loop().call_later(0.05, closing.set)
        with pytest.raises(RequestRejected) as rejected:
            await _unless_closing(body_read(), closing)
        assert rejected.value.status == 503
        await asyncio.sleep(0.05)  # the cancelled read finishes

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(shut_down_during_the_read())
        gc.collect()
    assert "never retrieved" not in caplog.text, caplog.text
