"""The process side of `edgetl serve`: the listening socket, header deadlines, draining, signals.

uvicorn runs the app; these pieces bound what it leaves open. A busy port is an error before
anything is printed; a client that sends its headers a byte at a time is cut off; on SIGTERM
the app learns at once that shutdown began, and the process exits through a normal exit so
its cleanup (the unpacked bundle) runs. torch-free: uvicorn and its h11 protocol.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from edgetl.errors import EdgetlError

# uvicorn's logger, so our lines read like its own ("INFO:     ...") in the same stream.
log = logging.getLogger("uvicorn.error")


class ServeError(EdgetlError):
    """`edgetl serve` was given settings it cannot serve with."""

    exit_code = 2


class PortInUse(EdgetlError):
    """Another process already listens on the host and port `edgetl serve` was given."""

    exit_code = 5


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which sets `closing` as its shutdown begins.

    uvicorn waits up to the grace period for every open request, then cancels the rest and
    answers them a plain-text 500; setting `closing` first lets the app answer each request
    that is not yet predicting with a JSON 503 at once, so only predictions hold the grace period.
    """

    def __init__(self, config: uvicorn.Config, closing: asyncio.Event) -> None:
        super().__init__(config)
        self.closing = closing

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.closing.set()
        await super().shutdown(sockets)


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers.

    uvicorn times out only idle keep-alive connections: a client that connects and sends its
    headers a byte at a time would hold a connection (and a file descriptor) for ever. The
    deadline starts when the connection opens or the next request's first bytes arrive.
    """

    def __init__(self, *args: object, header_timeout: float, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.header_timeout = header_timeout
        self.header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_deadline()

    def data_received(self, data: bytes) -> None:
        if self.header_deadline is None and self.conn.their_state is h11.IDLE:
            self._start_header_deadline()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request line and headers are complete
            self._cancel_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _start_header_deadline(self) -> None:
        self.header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _cancel_header_deadline(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def _headers_too_slow(self) -> None:
        self.header_deadline = None
        if not self.transport.is_closing():
            peer = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            log.info("%s - closed: no complete request headers within %g s (--read-timeout)", peer, self.header_timeout)
            self.transport.close()


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host:port` (not yet listening). Raises PortInUse or ServeError."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    # IPv4 unless the host is an IPv6 address, so `localhost` is 127.0.0.1 as clients expect.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        *_, address = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ServeError(
            f"cannot listen on {where}: {exc.strerror}; "
            "give `--host` an address of this machine, e.g. 127.0.0.1 or 0.0.0.0."
        ) from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart while old connections linger
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(
                f"{where} is already in use by another process; "
                "stop it (`ss -ltnp` shows which) or choose another `--port`."
            ) from None
        if exc.errno == errno.EACCES:
            hint = "ports below 1024 need root or CAP_NET_BIND_SERVICE"
        else:
            hint = "give `--host` an address of this machine"
        raise ServeError(f"cannot listen on {where}: {exc.strerror}; {hint}.") from None
    return sock


@contextmanager
def sigterm_exits_cleanly() -> Iterator[None]:
    """Within the block, SIGTERM ends the process with exit 0 through a normal exit.

    SIGTERM's default action kills the process on the spot, so atexit cleanup (the folder a
    `.tar.gz` bundle was unpacked into) never runs; and uvicorn, after its graceful shutdown,
    re-raises the signal it caught under the handler it found. This handler makes both a
    SystemExit(0), which unwinds normally. Main thread only, as Python's signals are.
    """
    previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
