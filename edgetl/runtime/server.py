"""`edgetl serve`: a small HTTP JSON API over a `Predictor`, on Starlette and uvicorn.

The device is small and shared, so every resource a client can spend is bounded: the
body (checked against Content-Length up front and counted while streaming, so a chunked
upload cannot exceed it either), and the number of predictions running at once (the rest
wait their turn). Decoding and inference run in worker threads so the event loop keeps
answering `/health` while the CPU is busy. torch-free: Starlette, uvicorn, python-multipart.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from edgetl.errors import EdgetlError
from edgetl.runtime.predictor import Prediction, Predictor
from edgetl.runtime.preprocess import ImageDecodeError, ImageTooLarge

DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
DEFAULT_TOP_K = 5
FILE_FIELDS = ("file", "image")
GRACEFUL_SHUTDOWN_SECONDS = 5


class ServeError(EdgetlError):
    """`edgetl serve` was given settings it cannot serve with."""

    exit_code = 2


class RequestRejected(Exception):
    """A request the client must fix; `status` is the HTTP code, the message the reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(predictor: Predictor, max_body_bytes: int, concurrency: int) -> Starlette:
    """The ASGI app: `GET /health`, `GET /metadata`, `POST /predict`.

    >>> app = create_app(Predictor.load("model.tar.gz"), max_body_bytes=10 << 20, concurrency=4)
    >>> uvicorn.run(app, host="127.0.0.1", port=8080)
    """
    if max_body_bytes < 1:
        raise ServeError(f"the body limit (`--max-body-mb`) must allow at least one byte; got {max_body_bytes} bytes.")
    if concurrency < 1:
        raise ServeError(f"`--concurrency` must be an integer ≥ 1; got {concurrency}.")
    slots = asyncio.Semaphore(concurrency)
    labels = predictor.labels

    def work(image: bytes, name: str, top_k: int) -> tuple[Prediction, float]:
        started = time.perf_counter()
        crop = predictor.crop(image, name)  # (S, S, 3) uint8
        prediction = predictor.classify(crop[None], top_k)[0]
        return prediction, (time.perf_counter() - started) * 1000.0

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def metadata(request: Request) -> JSONResponse:
        manifest = predictor.bundle.manifest
        return JSONResponse({
            "name": manifest.get("name"), "labels": list(labels), "preprocessing": predictor.bundle.preprocessing.to_dict(),
            "runtime": predictor.engine.runtime,  # what serves, which `--runtime` may have changed
            "precision": manifest.get("precision"), "variant": manifest.get("variant"), "metrics": manifest.get("metrics", {}),
        })

    async def predict(request: Request) -> JSONResponse:
        try:
            top_k = _top_k(request.query_params.get("top_k"), len(labels))
            body = await _read_body(request, max_body_bytes)
            image, name = await _image_from(request, body)
        except RequestRejected as exc:
            # After a 413 the rest of the body is unread: close the connection rather than drain it.
            return _error(exc.status, str(exc), {"Connection": "close"} if exc.status == 413 else None)
        async with slots:
            try:
                prediction, elapsed_ms = await run_in_threadpool(work, image, name, top_k)
            except ImageTooLarge as exc:  # refused from its header: the decoded image would not fit
                return _error(413, str(exc))
            except ImageDecodeError as exc:
                return _error(400, str(exc))
        return JSONResponse({**prediction.to_dict(), "elapsed_ms": round(elapsed_ms, 3)})

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, exc.detail, exc.headers)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # uvicorn still logs the traceback; the client gets a short message, the server stays up.
        return _error(500, f"internal error: {type(exc).__name__}")

    routes = [Route("/health", health, methods=["GET"]), Route("/metadata", metadata, methods=["GET"]), Route("/predict", predict, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: unexpected})


def build_server(predictor: Predictor, host: str = "127.0.0.1", port: int = 8080, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, concurrency: int = 4) -> uvicorn.Server:
    """The configured uvicorn server, not yet started (`run_server` runs it; tests run it in a thread)."""
    config = uvicorn.Config(
        create_app(predictor, max_body_bytes, concurrency), host=host, port=port, access_log=False, log_level="info",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS, server_header=False,
    )
    return uvicorn.Server(config)


def run_server(predictor: Predictor, host: str = "127.0.0.1", port: int = 8080, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, concurrency: int = 4) -> None:
    """Serve until SIGINT or SIGTERM, then finish in-flight requests (at most a few seconds).

    Binds loopback by default: expose it on purpose (`--host 0.0.0.0`) behind a firewall or proxy.

    >>> run_server(Predictor.load("model.tar.gz"), port=8080)
    """
    shown = f"[{host}]" if ":" in host else host
    manifest = predictor.bundle.manifest
    print(f"edgetl: serving {manifest.get('name')} ({manifest.get('variant')} on {predictor.engine.runtime}) at http://{shown}:{port} "
          f"— POST /predict, GET /metadata, GET /health; {concurrency} at once, bodies up to {max_body_bytes} bytes", file=sys.stderr, flush=True)
    build_server(predictor, host, port, max_body_bytes, concurrency).run()


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


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it would pass `limit`; never holds more than `limit` bytes."""
    declared = request.headers.get("content-length", "")  # uvicorn has already refused a malformed one
    if declared.isdigit() and int(declared) > limit:
        raise RequestRejected(413, f"body of {declared} bytes is larger than the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise RequestRejected(413, f"body is larger than the limit of {limit} bytes")
        body.extend(chunk)
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
        raise RequestRejected(400, f"malformed multipart body ({exc.message}); send one file part named `file`, as `curl -F file=@cat.jpg` does") from None
    try:
        for field, value in form.multi_items():
            if field in FILE_FIELDS and isinstance(value, UploadFile):
                return await value.read(), f"uploaded file {value.filename!r}"
    finally:
        await form.close()
    fields = sorted({field for field, _ in form.multi_items()})
    raise RequestRejected(400, f"multipart body has no file part named {' or '.join(FILE_FIELDS)}; got fields {fields}")
