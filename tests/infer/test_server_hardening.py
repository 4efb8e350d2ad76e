"""The server against hostile clients: text that is not valid Unicode, clients that leave while
sending, connections that stay idle or never finish their request, and more connections than
allowed. The server answers each cleanly (a 4xx, or closing the connection), logs no traceback,
counts no 5xx, and goes on serving."""

from __future__ import annotations

import json
import logging
import select
import socket
import struct
import threading
import time
from contextlib import contextmanager

import httpx
import pytest

from moelab.cli import main
from moelab.infer.engine import EngineConfig
from moelab.infer.http_transport import BackgroundServer
from moelab.infer.server import Servable, ServerSettings, create_app
from tests.infer.helpers import StepGate, wait_for

MODEL = "tiny"
C, CC = "/v1/completions", "/v1/chat/completions"
GOOD = {"model": MODEL, "prompt": "x", "max_tokens": 1}
GOOD_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
KEEP_ALIVE_S = 1.0
CLOSE_MARGIN_S = 4.0  # a busy two-core machine may take a while to run the timer and close


def start(load, engine: EngineConfig | None = None, **connections) -> BackgroundServer:
    settings = ServerSettings(model_name=MODEL, engine=engine or EngineConfig(max_batch=16, max_queue=64))
    srv = BackgroundServer(create_app(load, settings), **connections).start()
    wait_for(lambda: _get(srv, "/health") == 200, what="the model to load")
    return srv


def _get(server: BackgroundServer, path: str) -> int | None:
    try:
        return httpx.get(server.url + path, timeout=10).status_code
    except httpx.TransportError:
        return None


def statuses(server: BackgroundServer, endpoint: str) -> dict[str, float]:
    """moelab_requests_total for one endpoint, by status code ({} when /metrics does not answer)."""
    try:
        response = httpx.get(server.url + "/metrics", timeout=10)
    except httpx.TransportError:
        return {}
    counts = {}
    prefix = f'moelab_requests_total{{endpoint="{endpoint}",status="'
    for line in response.text.splitlines():
        if line.startswith(prefix):
            counts[line[len(prefix) : line.index('"', len(prefix))]] = float(line.split()[-1])
    return counts


def server_errors(server: BackgroundServer) -> dict[str, float]:
    return {
        f"{endpoint} {status}": n
        for endpoint in (C, CC)
        for status, n in statuses(server, endpoint).items()
        if status.startswith("5")
    }


def metric(server: BackgroundServer, name: str) -> float | None:
    try:
        text = httpx.get(server.url + "/metrics", timeout=10).text
    except httpx.TransportError:
        return None
    return next((float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " ")), None)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def problems(self) -> list[str]:
        return [
            f"{r.name} {r.levelname}: {r.getMessage()}"
            for r in self.records
            if r.exc_info or r.levelno >= logging.ERROR
        ]


@contextmanager
def server_log():
    """What uvicorn and moelab log meanwhile. NOTE: attach after creating the servers: each uvicorn
    Config reconfigures the "uvicorn" logger and drops handlers added before."""
    records = _Records()
    loggers = [logging.getLogger("uvicorn"), logging.getLogger("moelab")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        yield records
    finally:
        for logger in loggers:
            logger.removeHandler(records)


@pytest.fixture(scope="module")
def server(tiny_servable):
    srv = start(lambda: tiny_servable)
    yield srv
    srv.stop()


def connect(server: BackgroundServer) -> socket.socket:
    return socket.create_connection((server.host, server.port), timeout=30)


def request_head(path: str, length: int, method: str = "POST") -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float | None]:
    """What the server sends until it closes the connection, and the seconds that took (None: still
    open after `timeout`)."""
    start, received = time.monotonic(), b""
    sock.settimeout(timeout)
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        return received, None
    except ConnectionResetError:
        pass
    return received, time.monotonic() - start


def good_answer(server: BackgroundServer) -> None:
    response = httpx.post(server.url + C, json={**GOOD, "max_tokens": 2}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


# ---------------------------------------------------------------------------------------------
# Text that is not valid Unicode

SURROGATES = [
    # (name, path, body, param): JSON encodes the lone surrogates as \\uXXXX escapes
    ("prompt", C, {**GOOD, "prompt": "\ud800"}, "prompt"),
    ("prompt, streamed", C, {**GOOD, "prompt": "a\udc00b", "stream": True}, "prompt"),
    ("one of several prompts", C, {**GOOD, "prompt": ["fine", "x\udfff"]}, "prompt[1]"),
    (
        "chat content",
        CC,
        {**GOOD_CHAT, "messages": [{"role": "system", "content": "ok"}, {"role": "user", "content": "hi \ud83d"}]},
        "messages[1].content",
    ),
    (
        "chat content, streamed",
        CC,
        {
            **GOOD_CHAT,
            "stream": True,
            "messages": [{"role": "system", "content": "ok"}, {"role": "user", "content": "\ude00"}],
        },
        "messages[1].content",
    ),
    (
        "chat text part",
        CC,
        {**GOOD_CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
        "messages[0].content[0].text",
    ),
    ("chat role", CC, {**GOOD_CHAT, "messages": [{"role": "\ud800", "content": "x"}]}, "messages[0].role"),
    (
        "chat name",
        CC,
        {**GOOD_CHAT, "messages": [{"role": "user", "content": "x", "name": "\udbff"}]},
        "messages[0].name",
    ),
    ("stop string", C, {**GOOD, "stop": ["ok", "\ud800"]}, "stop[1]"),
    ("stop string, streamed chat", CC, {**GOOD_CHAT, "stop": "\ud800", "stream": True}, "stop"),
    ("model", C, {**GOOD, "model": "\ud800"}, "model"),
    ("user", CC, {**GOOD_CHAT, "user": "\ud800"}, "user"),
    ("a field name", C, {**GOOD, "\ud800": 1}, None),
    (
        "a field name in a message",
        CC,
        {**GOOD_CHAT, "messages": [{"role": "user", "content": "x", "\ud800": 1}]},
        "messages[0]",
    ),
]


@pytest.mark.parametrize("name, path, body, param", SURROGATES, ids=[s[0] for s in SURROGATES])
def test_text_that_is_not_unicode_is_a_400_naming_the_field(server, name, path, body, param) -> None:
    content = json.dumps(body).encode()  # ensure_ascii: the surrogates travel as JSON escapes
    assert b"\\ud" in content
    with server_log() as log:
        response = httpx.post(server.url + path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert "not valid Unicode" in error["message"] and "U+D" in error["message"]
    assert log.problems() == []
    assert server_errors(server) == {}
    good_answer(server)


def test_utf8_encoded_surrogates_in_the_raw_body_are_a_400(server) -> None:
    # NOTE: json.loads(bytes) decodes with "surrogatepass", so bytes ED A0 80 become a lone surrogate
    content = b'{"model": "tiny", "max_tokens": 1, "prompt": "ab\xed\xa0\x80"}'
    response = httpx.post(server.url + C, content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    assert "U+D800" in response.json()["error"]["message"]


def test_escaped_surrogate_pairs_are_valid_text(server) -> None:
    content = json.dumps({**GOOD, "prompt": "smile \U0001f600"}).encode()
    assert b"\\ud83d\\ude00" in content
    response = httpx.post(server.url + C, content=content, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


# ---------------------------------------------------------------------------------------------
# Clients that leave


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
def test_a_client_that_disconnects_mid_body_is_not_a_server_error(server, reset) -> None:
    before = statuses(server, C)
    body = json.dumps({**GOOD, "prompt": "y" * 200}).encode()
    with server_log() as log:
        sock = connect(server)
        sock.sendall(request_head(C, len(body)) + body[:40])
        time.sleep(0.3)  # the handler is waiting for the rest of the body
        if reset:  # an abortive close: RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        wait_for(lambda: sum(statuses(server, C).values()) > sum(before.values()), what="the request to be counted")
    after = statuses(server, C)
    assert after.get("499", 0) == before.get("499", 0) + 1, after
    assert server_errors(server) == {}
    assert log.problems() == []
    good_answer(server)


@pytest.mark.parametrize("path", [C, CC])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_client_that_leaves_before_reading_the_answer_is_not_a_server_error(server, path, stream) -> None:
    body = GOOD if path == C else GOOD_CHAT
    content = json.dumps({**body, "max_tokens": 20, "stream": stream}).encode()
    before = sum(statuses(server, path).values())
    with server_log() as log:
        sock = connect(server)
        sock.sendall(request_head(path, len(content)) + content)
        sock.close()
        wait_for(lambda: sum(statuses(server, path).values()) > before, what="the request to be counted")
    assert server_errors(server) == {}
    assert log.problems() == []
    good_answer(server)


# ---------------------------------------------------------------------------------------------
# Idle and incomplete connections


@pytest.fixture(scope="module")
def short_keep_alive(tiny_servable):
    srv = start(lambda: tiny_servable, timeout_keep_alive=KEEP_ALIVE_S)
    yield srv
    srv.stop()


INCOMPLETE = [
    # (name, bytes sent)
    ("nothing", b""),
    ("part of the request line", b"POST /v1/compl"),
    ("headers without their end", b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n"),
    ("a body cut short", request_head(C, 100) + b'{"model": '),
]


@pytest.mark.parametrize("name, sent", INCOMPLETE, ids=[i[0] for i in INCOMPLETE])
def test_an_idle_or_incomplete_connection_is_closed_after_the_keep_alive_timeout(short_keep_alive, name, sent) -> None:
    srv = short_keep_alive
    with server_log() as log:
        with connect(srv) as sock:
            sock.sendall(sent)
            received, closed_after = read_until_closed(sock, KEEP_ALIVE_S + CLOSE_MARGIN_S + 5)
    assert closed_after is not None, "the server kept the connection open"
    assert KEEP_ALIVE_S * 0.8 <= closed_after <= KEEP_ALIVE_S + CLOSE_MARGIN_S
    assert received == b""  # closed without an answer
    assert log.problems() == []
    assert server_errors(srv) == {}
    good_answer(srv)


def test_an_idle_connection_after_a_response_is_closed_after_the_keep_alive_timeout(short_keep_alive) -> None:
    with connect(short_keep_alive) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        received, closed_after = read_until_closed(sock, KEEP_ALIVE_S + CLOSE_MARGIN_S + 5)
    assert received.startswith(b"HTTP/1.1 200")
    assert closed_after is not None and closed_after <= KEEP_ALIVE_S + CLOSE_MARGIN_S


def test_headers_sent_a_byte_at_a_time_do_not_hold_the_connection_open(short_keep_alive) -> None:
    """Each byte comes well within the timeout, but the headers must be complete within it."""
    trickle = b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"a" * 200
    with connect(short_keep_alive) as sock:
        start = time.monotonic()
        closed_after = None
        for byte in trickle:
            readable, _, _ = select.select([sock], [], [], 0.25)
            if readable:
                try:
                    if sock.recv(1024) == b"":
                        closed_after = time.monotonic() - start
                        break
                except ConnectionResetError:
                    closed_after = time.monotonic() - start
                    break
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - start
                break
    assert closed_after is not None, "the server kept reading the trickled headers"
    assert closed_after <= KEEP_ALIVE_S + CLOSE_MARGIN_S


# ---------------------------------------------------------------------------------------------
# The connection limit


def test_beyond_max_connections_new_connections_get_503_and_running_requests_go_on(tiny) -> None:
    gate = StepGate(tiny.model)
    srv = start(
        lambda: Servable(gate, tiny.tokenizer),
        EngineConfig(max_batch=1, max_queue=1),
        max_connections=2,
        timeout_keep_alive=30,
    )
    lines: list[str] = []

    def stream() -> None:
        body = {"model": MODEL, "prompt": "def ", "max_tokens": 4, "temperature": 0, "stream": True}
        with httpx.Client(timeout=60) as http, http.stream("POST", srv.url + C, json=body) as response:
            lines.extend(line for line in response.iter_lines() if line)

    try:
        running = threading.Thread(target=stream)  # connection 1: a running request
        running.start()
        wait_for(lambda: metric(srv, "moelab_running_sequences") == 1, what="the request to run")
        with connect(srv) as idle:  # connection 2: a keep-alive connection, idle after its answer
            idle.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
            assert idle.recv(65536).startswith(b"HTTP/1.1 200")
            refused = httpx.get(srv.url + "/health", timeout=10)  # connection 3
            assert refused.status_code == 503
            gate.open()
            running.join(60)
        assert lines[-1] == "data: [DONE]" and len(lines) >= 2  # the running request finished
        wait_for(lambda: _get(srv, "/health") == 200, what="/health to answer again")
        good_answer(srv)
    finally:
        gate.open()
        srv.stop()


# ---------------------------------------------------------------------------------------------
# The flags


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--max-connections", "0"),
        ("--max-connections", "-3"),
        ("--timeout-keep-alive", "0"),
        ("--timeout-keep-alive", "-1"),
        ("--timeout-keep-alive", "nan"),
        ("--timeout-keep-alive", "inf"),
    ],
)
def test_bad_connection_flags_are_one_line_errors(tiny_run, capsys, flag, value) -> None:
    assert main(["serve", str(tiny_run), "--port", "0", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"moelab: error: {flag} {value}") and "\n" not in err


def test_the_connection_flags_reach_uvicorn() -> None:
    from moelab.cli import serve
    from moelab.infer import http_transport as srv
    from moelab.infer.http_transport import uvicorn_server

    assert (serve.DEFAULT_TIMEOUT_KEEP_ALIVE_S, serve.DEFAULT_MAX_CONNECTIONS) == (
        srv.DEFAULT_TIMEOUT_KEEP_ALIVE_S,
        srv.DEFAULT_MAX_CONNECTIONS,
    )

    server = uvicorn_server(create_app(lambda: None), "127.0.0.1", 0, timeout_keep_alive=2.5, max_connections=7)
    assert server.config.timeout_keep_alive == 2.5
    # NOTE: uvicorn answers 503 once the open connections reach limit_concurrency, counting the
    # new one: a limit of 8 serves 7 connections
    assert server.config.limit_concurrency == 8
