"""`edgetl serve` over real HTTP on loopback: answers, limits, errors and the concurrency bound.

The server is uvicorn in a background thread on a socket bound to port 0; clients are
stdlib `http.client`, as a device's caller would be. The bundle is a real ONNX colour
classifier from `tests.tiny_bundle`, so every answer is checkable.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from PIL import Image

from edgetl.runtime.predictor import Predictor
from edgetl.runtime.server import build_server
from tests.tiny_bundle import LABELS, write_tiny_bundle

LIMIT = 256 * 1024
COLOURS = {"red": (220, 20, 30), "green": (25, 200, 40), "blue": (30, 40, 210)}


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    return Predictor.load(write_tiny_bundle(tmp_path_factory.mktemp("tiny") / "bundle"), threads=1)


@contextmanager
def serving(
    predictor: Predictor, max_body_bytes: int = LIMIT, concurrency: int = 2, read_timeout: float = 10.0
) -> Iterator[int]:
    """Run the server in a thread until the block ends; yields its port."""
    server = build_server(predictor, max_body_bytes=max_body_bytes, concurrency=concurrency, read_timeout=read_timeout)
    with running(server) as port:
        yield port


@contextmanager
def running(server: uvicorn.Server) -> Iterator[int]:
    """Run `server` in a thread on a free loopback port until the block ends; yields the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    port = sock.getsockname()[1]
    deadline = time.monotonic() + 10
    while True:
        try:
            call(port, "GET", "/health")  # any answer (503 for a model that cannot predict) means it is up
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def port(predictor: Predictor) -> Iterator[int]:
    with serving(predictor) as port:
        yield port


def call(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def image(colour: str, fmt: str = "PNG", size: int = 64) -> bytes:
    noise = np.random.default_rng(0).integers(-20, 20, (size, size, 3))
    pixels = np.clip(np.asarray(COLOURS[colour]) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def multipart(
    parts: list[tuple[str, str | None, bytes]], boundary: str = "edgetl-test-boundary"
) -> tuple[bytes, dict[str, str]]:
    """(field, filename or None for a text field, data) parts → body and Content-Type header."""
    body = b""
    for field, filename, data in parts:
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_a_red_png_is_red_over_raw_bytes_and_over_multipart(port: int) -> None:
    status, answer = call(port, "POST", "/predict", image("red"), {"Content-Type": "image/png"})
    assert status == 200 and answer["label"] == "red"
    assert [t["label"] for t in answer["top_k"]][0] == "red" and len(answer["top_k"]) == len(
        LABELS
    )  # default 5, capped at 3
    assert answer["elapsed_ms"] > 0

    for field in ("file", "image"):
        body, headers = multipart([("note", None, b"a text field first"), (field, "red.png", image("red"))])
        status, answer = call(port, "POST", "/predict?top_k=2", body, headers)
        assert status == 200 and answer["label"] == "red" and len(answer["top_k"]) == 2, (field, answer)


def test_health_metadata_and_unknown_paths_answer_json(port: int) -> None:
    assert call(port, "GET", "/health") == (200, {"status": "ok"})
    status, metadata = call(port, "GET", "/metadata")
    assert status == 200
    assert metadata["name"] == "tiny" and metadata["labels"] == LABELS and metadata["runtime"] == "onnxruntime"
    assert (
        metadata["precision"] == "fp32"
        and metadata["variant"] == "onnx-fp32"
        and metadata["metrics"]["accuracy"] == 1.0
    )
    assert metadata["preprocessing"]["input_size"] == 32 and metadata["preprocessing"]["mean"] == [0.5] * 3
    status, answer = call(port, "GET", "/nowhere")
    assert status == 404 and answer["error"]
    status, answer = call(port, "GET", "/predict")
    assert status == 405 and answer["error"]


def test_200_concurrent_requests_from_8_threads_are_all_answered_with_the_right_label(port: int) -> None:
    cases = [(colour, fmt) for colour in COLOURS for fmt in ("PNG", "JPEG")]
    payloads = {case: image(*case) for case in cases}
    jobs = [cases[i % len(cases)] for i in range(200)]

    def ask(case: tuple[str, str]) -> tuple[str, int, str]:
        status, answer = call(
            port, "POST", "/predict?top_k=1", payloads[case], {"Content-Type": "application/octet-stream"}
        )
        return case[0], status, answer.get("label", answer.get("error"))

    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, jobs))
    elapsed = time.perf_counter() - started
    print(f"200 requests from 8 threads in {elapsed:.2f} s")
    assert len(results) == 200
    wrong = [r for r in results if r[1] != 200 or r[2] != r[0]]
    assert wrong == [], wrong[:5]


def test_oversized_bodies_get_413_before_being_buffered_and_the_server_stays_up(port: int) -> None:
    # Declared too large: refused from the headers, before any body is sent.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.putrequest("POST", "/predict")
    connection.putheader("Content-Length", str(LIMIT + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "limit" in json.loads(response.read())["error"]
    connection.close()

    # Chunked, no Content-Length: refused once the counted bytes pass the limit.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.putrequest("POST", "/predict")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    chunk = b"\0" * (16 * 1024)
    for _ in range(LIMIT // len(chunk) + 1):
        connection.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
    response = connection.getresponse()
    assert response.status == 413 and "limit" in json.loads(response.read())["error"]
    connection.close()

    assert call(port, "GET", "/health") == (200, {"status": "ok"})
    # A chunked body under the limit is still fine (http.client chunks an iterable body).
    status, answer = call(port, "POST", "/predict", iter([image("blue")]))
    assert status == 200 and answer["label"] == "blue"


@pytest.mark.parametrize(("body", "reason"), [(b"not an image at all", "not an image"), (b"", "empty body")])
def test_a_body_that_is_not_an_image_is_400_with_the_reason(port: int, body: bytes, reason: str) -> None:
    status, answer = call(port, "POST", "/predict", body)
    assert status == 400 and reason in answer["error"], answer


def test_a_truncated_image_is_400_with_the_reason(port: int) -> None:
    status, answer = call(port, "POST", "/predict", image("red")[:80])
    assert status == 400 and "corrupt or truncated" in answer["error"], answer


@pytest.mark.parametrize("case", ["no boundary", "wrong boundary", "no file part", "garbage"])
def test_a_malformed_multipart_body_is_400_with_the_reason(port: int, case: str) -> None:
    body, headers = multipart([("file", "red.png", image("red"))])
    if case == "no boundary":
        headers = {"Content-Type": "multipart/form-data"}
    elif case == "wrong boundary":
        headers = {"Content-Type": "multipart/form-data; boundary=not-the-one-used"}
    elif case == "no file part":
        body, headers = multipart([("file", None, b"text, not a file"), ("photo", "red.png", image("red"))])
    else:
        body = b"--edgetl-test-boundary\r\nthis is not a part header\r\n\r\n\x00\x01"
    status, answer = call(port, "POST", "/predict", body, headers)
    assert status == 400 and ("multipart" in answer["error"]), (case, answer)


@pytest.mark.parametrize("top_k", ["0", "4", "-1", "abc", "1.5", ""])
def test_a_bad_top_k_is_400_naming_the_range(port: int, top_k: str) -> None:
    status, answer = call(port, "POST", f"/predict?top_k={top_k}", image("green"))
    assert status == 400 and "top_k must be an integer from 1 to 3" in answer["error"], answer


class RecordingEngine:
    """Wraps an engine: counts simultaneous runs and slows each so overlaps would show."""

    runtime = "onnxruntime"

    def __init__(self, inner: object, fail: bool = False, delay: float = 0.05) -> None:
        self.inner, self.fail, self.delay = inner, fail, delay
        self.lock = threading.Lock()
        self.active = self.most = self.runs = 0

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self.fail:
            raise RuntimeError("engine exploded")
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        time.sleep(self.delay)
        try:
            return self.inner.run(batch)
        finally:
            with self.lock:
                self.active -= 1
                self.runs += 1


@pytest.mark.parametrize("concurrency", [1, 3])
def test_no_more_than_concurrency_predictions_run_at_once_and_the_rest_wait(
    predictor: Predictor, concurrency: int
) -> None:
    engine = RecordingEngine(predictor.engine)
    with serving(Predictor(predictor.bundle, engine), concurrency=concurrency) as port:  # type: ignore[arg-type]
        startup_runs = engine.runs  # the health check's
        with ThreadPoolExecutor(10) as pool:
            statuses = list(pool.map(lambda _: call(port, "POST", "/predict", image("red"))[0], range(10)))
    assert statuses == [200] * 10 and engine.runs - startup_runs == 10
    assert engine.most == concurrency  # never more; and reached, so the recorder does see overlap


def test_an_unexpected_error_is_500_json_and_the_server_stays_up(predictor: Predictor) -> None:
    engine = RecordingEngine(predictor.engine)
    with serving(Predictor(predictor.bundle, engine)) as port:  # type: ignore[arg-type]
        engine.fail = True  # after the startup check, which a failing engine would (rightly) not pass
        assert call(port, "POST", "/predict", image("red")) == (500, {"error": "internal error: RuntimeError"})
        assert call(port, "GET", "/health") == (200, {"status": "ok"})


def test_the_server_imports_without_torch(tmp_path: Path) -> None:
    blocked = ("torch", "torchvision", "timm", "nncf")
    code = (
        f"import sys\nfor name in {blocked!r}: sys.modules[name] = None\n"
        "import edgetl.runtime.server, edgetl.runtime.commands\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent
    )
    assert done.returncode == 0, done.stderr
