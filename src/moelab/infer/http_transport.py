"""The HTTP transport: uvicorn serving the app, and the request metrics taken around it.

`MetricsMiddleware` counts every HTTP response by endpoint and status and times it. `bind` opens
the listening socket, `uvicorn_server` builds the uvicorn server, and `BackgroundServer` runs one on
a thread (tests and benchmarks).

Connections (uvicorn_server): a request must arrive within the keep-alive timeout (_H11Protocol),
and beyond max_connections open connections a new request gets uvicorn's 503.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import threading
import time

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from moelab.infer.metrics import ServerMetrics

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_KEEP_ALIVE_S = 5.0  # uvicorn's default
DEFAULT_MAX_CONNECTIONS = 256


# ---------------------------------------------------------------------------------------------
# Metrics


_ENDPOINTS = (
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/tokenize",
    "/detokenize",
    "/tokenizer_info",
)


class MetricsMiddleware:
    """Counts every HTTP response by endpoint and status and times it to its last byte (a plain
    ASGI middleware: Starlette's BaseHTTPMiddleware would hide client disconnects from streams)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = next(
            (e for e in _ENDPOINTS if path == e or (e == "/v1/models" and path.startswith(e + "/"))), "other"
        )
        status = 500
        start = time.perf_counter()

        async def send_and_watch(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_latency.labels(endpoint).observe(time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Running


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port (port 0: any free port); raises OSError."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class _H11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with a deadline for each request to arrive: its request line
    and headers within timeout_keep_alive seconds (however slowly their bytes trickle in), and its
    body with no pause longer than that. A connection that misses it is closed without an answer.

    NOTE: uvicorn (0.54) arms timeout_keep_alive only after a response, so a connection that
    never completed a request (nothing sent, half a request line, headers without their end, a
    body cut short) stayed open for ever; no uvicorn setting bounds it. This uses that setting's
    value, and h11 only: uvicorn would pick httptools if installed, which has the same gap."""

    _request_timer: asyncio.TimerHandle | None = None
    _awaiting: str | None = None  # "headers" or "body" while the timer runs

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_request()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_request_timer()
        super().connection_lost(exc)

    def _watch_request(self) -> None:
        state = self.conn.their_state
        awaiting = None
        if not self.transport.is_closing() and state in (h11.IDLE, h11.SEND_BODY):
            awaiting = "headers" if state is h11.IDLE else "body"
        if awaiting == "headers" and self._awaiting == "headers":
            return  # bytes of the headers do not move their deadline
        self._stop_request_timer()
        if awaiting is not None:
            self._awaiting = awaiting
            self._request_timer = self.loop.call_later(self.timeout_keep_alive, self._request_timed_out)

    def _stop_request_timer(self) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
        self._request_timer, self._awaiting = None, None

    def _request_timed_out(self) -> None:
        client = "%s:%d" % self.client if self.client else "a client"
        log.debug(
            "closing the connection of %s: no whole request %s within %gs",
            client,
            self._awaiting,
            self.timeout_keep_alive,
        )
        self._request_timer, self._awaiting = None, None
        self.transport.close()


def uvicorn_server(
    app: FastAPI,
    host: str,
    port: int,
    log_level: str = "info",
    timeout_keep_alive: float = DEFAULT_TIMEOUT_KEEP_ALIVE_S,
    max_connections: int | None = DEFAULT_MAX_CONNECTIONS,
) -> uvicorn.Server:
    """A uvicorn server for the app; run it with server.run(sockets=[bind(host, port)]).

    timeout_keep_alive: seconds a connection may wait for its next request, and the deadline for
    a request to arrive (_H11Protocol). max_connections: open connections served; with more, a
    new request gets uvicorn's 503 (None: no limit). Raises ValueError for values out of range."""
    if not (math.isfinite(timeout_keep_alive) and timeout_keep_alive > 0):
        raise ValueError(f"timeout_keep_alive = {timeout_keep_alive} is not allowed: a number of seconds > 0")
    if max_connections is not None and max_connections < 1:
        raise ValueError(f"max_connections = {max_connections} is not allowed: an integer >= 1")
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=_H11Protocol,
        timeout_keep_alive=timeout_keep_alive,  # type: ignore[arg-type]  # uvicorn says int; call_later takes a float
        # NOTE: uvicorn answers 503 once the open connections, the new one included, reach
        # limit_concurrency: N + 1 serves N
        limit_concurrency=None if max_connections is None else max_connections + 1,
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(config)


class BackgroundServer:
    """The app served by uvicorn on a thread, on a free localhost port (tests and benchmarks)."""

    def __init__(
        self,
        app: FastAPI,
        host: str = "127.0.0.1",
        log_level: str = "warning",
        timeout_keep_alive: float = DEFAULT_TIMEOUT_KEEP_ALIVE_S,
        max_connections: int | None = DEFAULT_MAX_CONNECTIONS,
    ):
        self.sock = bind(host, 0)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn_server(app, host, self.port, log_level, timeout_keep_alive, max_connections)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="moelab-uvicorn", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
