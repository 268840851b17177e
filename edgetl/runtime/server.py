"""`edgetl serve`: a small HTTP JSON API over a `Predictor`, on Starlette and uvicorn.

The device is small and shared, so every resource a client can spend is bounded: the
body (checked against Content-Length up front and counted while streaming, so a chunked
upload cannot exceed it either), the time a client may take to send its headers and its
body, and the number of predictions running at once (the rest wait their turn). Decoding
and inference run in worker threads so the event loop keeps answering `/health` while the
CPU is busy. On SIGTERM the predictions running finish and every other request gets a
JSON 503. torch-free: Starlette, uvicorn (its h11 protocol), python-multipart.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from edgetl.errors import EdgetlError, InferenceError
from edgetl.runtime.listen import DrainingServer, HeaderDeadlineProtocol, ServeError, bind, log
from edgetl.runtime.predictor import Prediction, Predictor
from edgetl.runtime.preprocess import ImageDecodeError, ImageTooLarge

DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
DEFAULT_READ_TIMEOUT_SECONDS = 10.0
DEFAULT_TOP_K = 5
FILE_FIELDS = ("file", "image")
GRACEFUL_SHUTDOWN_SECONDS = 5
SHUTTING_DOWN = "server is shutting down"

T = TypeVar("T")


class RequestRejected(Exception):
    """A request the client must fix; `status` is the HTTP code, the message the reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(
    predictor: Predictor,
    max_body_bytes: int,
    concurrency: int,
    read_timeout: float = DEFAULT_READ_TIMEOUT_SECONDS,
    closing: asyncio.Event | None = None,
) -> Starlette:
    """The ASGI app: `GET /health`, `GET /metadata`, `POST /predict`.

    `read_timeout` bounds the seconds a body may take to arrive (408 after); once `closing` is set,
    requests not yet predicting get 503. Runs the model once on a blank crop: `/health` says 503
    when it cannot predict. Raises ServeError for a limit below 1 or a `read_timeout` that is not a
    positive number of seconds.

    >>> app = create_app(Predictor.load("model.tar.gz"), max_body_bytes=10 << 20, concurrency=4)
    >>> uvicorn.run(app, host="127.0.0.1", port=8080)
    """
    _check_limits(max_body_bytes, concurrency, read_timeout)
    closing = asyncio.Event() if closing is None else closing
    slots = asyncio.Semaphore(concurrency)
    labels = predictor.labels
    problem = _self_check(predictor)

    async def health(request: Request) -> JSONResponse:
        if problem:
            return JSONResponse({"status": "error", "error": problem}, status_code=503)
        return JSONResponse({"status": "ok"})

    facts = _metadata(predictor)

    async def metadata(request: Request) -> JSONResponse:
        return JSONResponse(facts)

    async def predict(request: Request) -> JSONResponse:
        try:
            top_k = _top_k(request.query_params.get("top_k"), len(labels))
            body = await _unless_closing(_read_body(request, max_body_bytes, read_timeout), closing)
            image, name = await _image_from(request, body)
            await _unless_closing(slots.acquire(), closing)
        except RequestRejected as exc:
            # After a 408, 413 or 503 the rest of the body may be unread: close rather than drain it.
            return _error(exc.status, str(exc), {"Connection": "close"} if exc.status in (408, 413, 503) else None)
        except ClientDisconnect:
            log.info("%s - POST /predict: the client went away before sending the whole body", _client(request))
            return _error(400, "client disconnected")  # nobody reads it; uvicorn drops it
        try:
            return await _prediction(predictor, image, name, top_k)
        finally:
            slots.release()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metadata", metadata, methods=["GET"]),
        Route("/predict", predict, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _unexpected})


def _check_limits(max_body_bytes: int, concurrency: int, read_timeout: float) -> None:
    """Raises ServeError for a limit the server cannot serve with."""
    if max_body_bytes < 1:
        raise ServeError(f"the body limit (`--max-body-mb`) must allow at least one byte; got {max_body_bytes} bytes.")
    if concurrency < 1:
        raise ServeError(f"`--concurrency` must be an integer ≥ 1; got {concurrency}.")
    if not 0 < read_timeout < float("inf"):
        raise ServeError(f"`--read-timeout` must be a number of seconds > 0; got {read_timeout}.")


def _metadata(predictor: Predictor) -> dict:
    """`GET /metadata`: the bundle's name, labels (and a multi-label bundle's `task`), contract, variant and
    measured metrics."""
    manifest = predictor.bundle.manifest
    return {
        "name": manifest.get("name"),
        "labels": list(predictor.labels),
        **({"task": manifest["task"]} if "task" in manifest else {}),  # multi-label: kind and thresholds
        **({"tasks": manifest["tasks"]} if "tasks" in manifest else {}),  # multi-task: each task's labels, kind
        "preprocessing": predictor.bundle.preprocessing.to_dict(),
        "runtime": predictor.engine.runtime,  # what serves, which `--runtime` may have changed
        "precision": manifest.get("precision"),
        "variant": manifest.get("variant"),
        "metrics": manifest.get("metrics", {}),
    }


async def _prediction(predictor: Predictor, image: bytes, name: str, top_k: int) -> JSONResponse:
    """The prediction as JSON, or the error that says what was wrong with the image or the model."""
    try:
        prediction, elapsed_ms = await run_in_threadpool(_timed_prediction, predictor, image, name, top_k)
    except ImageTooLarge as exc:  # refused from its header: the decoded image would not fit
        return _error(413, str(exc))
    except ImageDecodeError as exc:
        return _error(400, str(exc))
    except InferenceError as exc:
        return _error(500, f"the model cannot predict: {exc}")
    return JSONResponse({**prediction.to_dict(), "elapsed_ms": round(elapsed_ms, 3)})


def _timed_prediction(predictor: Predictor, image: bytes, name: str, top_k: int) -> tuple[Prediction, float]:
    started = time.perf_counter()
    crop = predictor.crop(image, name)  # (S, S, 3) uint8
    prediction = predictor.classify(crop[None], top_k)[0]
    return prediction, (time.perf_counter() - started) * 1000.0


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, exc.detail, exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # uvicorn still logs the traceback; the client gets a short message, the server stays up.
    return _error(500, f"internal error: {type(exc).__name__}")


def build_server(
    predictor: Predictor,
    host: str = "127.0.0.1",
    port: int = 8080,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    concurrency: int = 4,
    read_timeout: float = DEFAULT_READ_TIMEOUT_SECONDS,
) -> uvicorn.Server:
    """The configured uvicorn server, not yet started (`run_server` runs it; tests run it in a thread).

    Raises ServeError for a limit below 1 or a `read_timeout` that is not a positive number of seconds.
    """
    closing = asyncio.Event()
    config = uvicorn.Config(
        create_app(predictor, max_body_bytes, concurrency, read_timeout, closing),
        host=host,
        port=port,
        access_log=False,
        log_level="info",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        server_header=False,
        http=functools.partial(HeaderDeadlineProtocol, header_timeout=read_timeout),  # type: ignore[arg-type]
    )
    return DrainingServer(config, closing)


def run_server(
    predictor: Predictor,
    host: str = "127.0.0.1",
    port: int = 8080,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    concurrency: int = 4,
    read_timeout: float = DEFAULT_READ_TIMEOUT_SECONDS,
) -> None:
    """Serve until SIGINT or SIGTERM, then finish in-flight requests (at most a few seconds).

    Binds loopback by default: expose it on purpose (`--host 0.0.0.0`) behind a firewall or proxy.
    Port 0 picks a free port. Raises PortInUse when another process listens there, ServeError
    when the address cannot be bound for another reason; both before anything is printed.

    >>> run_server(Predictor.load("model.tar.gz"), port=8080)
    """
    server = build_server(predictor, host, port, max_body_bytes, concurrency, read_timeout)
    # Bound here and handed to uvicorn, so a busy port is a clear error before "serving"
    # (uvicorn would log it and exit 1), with no window for another process to take it.
    listener = bind(host, port)
    try:
        shown = f"[{host}]" if ":" in host else host
        manifest = predictor.bundle.manifest
        print(
            f"edgetl: serving {manifest.get('name')} ({manifest.get('variant')} on {predictor.engine.runtime}) at "
            f"http://{shown}:{listener.getsockname()[1]} — POST /predict, GET /metadata, GET /health; "
            f"{concurrency} at once, bodies up to {max_body_bytes} bytes, {read_timeout:g} s to send each",
            file=sys.stderr,
            flush=True,
        )
        server.run(sockets=[listener])
    finally:
        listener.close()


def _self_check(predictor: Predictor) -> str | None:
    """None when the model predicts a blank crop, else why it cannot (`classify` raises
    InferenceError for NaN or infinite logits)."""
    size = predictor.bundle.preprocessing.input_size
    try:
        predictor.classify(np.zeros((1, size, size, 3), np.uint8), 1)  # (1, S, S, 3)
        return None
    except Exception as exc:  # whatever the runtime raises, /health reports it rather than the server dying
        why = exc if isinstance(exc, EdgetlError) else repr(exc)
        reason = f"the model failed its startup check on a blank image: {why}"
    log.error("%s; /health answers 503", reason)
    return reason


async def _unless_closing(work: Awaitable[T], closing: asyncio.Event) -> T:
    """`work`'s result, or RequestRejected(503) as soon as `closing` is set (work is then cancelled)."""
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(closing.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        # Judged by task.done(), not wait's `done` set: work that finished meanwhile (a slot
        # acquired) must be returned, not dropped. A cancelled Semaphore.acquire hands on a
        # slot it was just given to the next waiter.
        cut_short = not task.done()
        if cut_short:
            task.cancel()
            # The cancelled work may still end in its own exception (the client went away while
            # its body read was being cancelled); nobody awaits it, so retrieve it here rather than
            # let asyncio log "Task exception was never retrieved" with a traceback.
            task.add_done_callback(_retrieve)
    if cut_short:
        raise RequestRejected(503, SHUTTING_DOWN)
    return task.result()


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "a client"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _top_k(raw: str | None, classes: int) -> int:
    if raw is None:
        return min(DEFAULT_TOP_K, classes)
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= classes:
        raise RequestRejected(400, f"top_k must be an integer from 1 to {classes} (the number of labels); got {raw!r}")
    return value


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The whole body within `timeout` seconds (else 408), refusing (413) as soon as it would pass
    `limit`; never holds more than `limit` bytes. Raises ClientDisconnect if the client goes away."""
    declared = request.headers.get("content-length", "")  # uvicorn has already refused a malformed one
    if declared.isdigit() and int(declared) > limit:
        raise RequestRejected(413, f"body of {declared} bytes is larger than the limit of {limit} bytes")

    async def collect() -> bytearray:
        body = bytearray()
        async for chunk in request.stream():
            if len(body) + len(chunk) > limit:
                raise RequestRejected(413, f"body is larger than the limit of {limit} bytes")
            body.extend(chunk)
        return body

    try:
        body = await asyncio.wait_for(collect(), timeout)
    except asyncio.TimeoutError:
        raise RequestRejected(
            408, f"the body did not arrive within {timeout:g} s; send it faster or ask for a longer --read-timeout"
        ) from None
    if not body:
        raise RequestRejected(400, "empty body: send the image bytes, or a multipart form with a `file` field")
    return bytes(body)


async def _image_from(request: Request, body: bytes) -> tuple[bytes, str]:
    """The image bytes and a name for error messages: the raw body, or the form's first file part."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return body, "request body"

    async def once() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(request.headers, once(), max_files=len(FILE_FIELDS), max_fields=16)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise RequestRejected(
            400,
            f"malformed multipart body ({exc.message}); send one file part named `file`, as `curl -F "
            "file=@cat.jpg` does",
        ) from None
    try:
        for field, value in form.multi_items():
            if field in FILE_FIELDS and isinstance(value, UploadFile):
                return await value.read(), f"uploaded file {value.filename!r}"
    finally:
        await form.close()
    fields = sorted({field for field, _ in form.multi_items()})
    raise RequestRejected(400, f"multipart body has no file part named {' or '.join(FILE_FIELDS)}; got fields {fields}")
