"""The server under hostile clients: every answer is a 4xx (or a closed connection), never a 5xx.

The real server (BackgroundServer: uvicorn and the app) runs in a child process on the tiny preset,
randomly initialised, with the raw-bytes tokenizer. This process sends it a few hundred hostile
requests from 8 threads: text with lone surrogates, huge and negative numbers, wrong types,
garbage and truncated JSON, bodies cut short, clients that leave mid-body (FIN and RST), broken
HTTP, very long prompts and bodies over the limit, with well-formed requests among them. Then it
holds idle and incomplete connections open (the server must close each within the keep-alive
timeout) and floods the connection limit (beyond --max-connections a new request gets uvicorn's
503, by design; /health answers again once the flood is over).

Reported: answers by category and status ("closed": the server closed the connection without an
answer; "left": the client left, nothing to read), the 5xx the server counted in /metrics, the
tracebacks in its log, and its RSS before and after.

    python benchmarks/hostile_requests.py [--rounds 4] [--keep-alive 1] [--max-connections 64]
                                          [--out benchmarks/results/hostile_requests.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

MODEL = "tiny"
C, CC = "/v1/completions", "/v1/chat/completions"
GOOD = {"model": MODEL, "prompt": "def ", "max_tokens": 4}
GOOD_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
MAX_BODY_BYTES = 1 << 20


# ---------------------------------------------------------------------------------------------
# The server, in a child process


def serve_child(keep_alive: float, max_connections: int) -> None:
    """Serve until stdin closes; the first line on stdout is the URL."""
    import torch

    from moelab.config import load_config
    from moelab.data.tokenizer import bytes_tokenizer
    from moelab.infer.engine import EngineConfig
    from moelab.infer.http_transport import BackgroundServer
    from moelab.infer.server import Servable, ServerSettings, create_app
    from moelab.model import Transformer

    torch.set_num_threads(1)
    tokenizer = bytes_tokenizer()
    cfg = load_config(preset="tiny").model
    cfg.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    settings = ServerSettings(model_name=MODEL, engine=EngineConfig(max_batch=16, max_queue=64))
    app = create_app(lambda: Servable(model, tokenizer), settings)
    with BackgroundServer(app, timeout_keep_alive=keep_alive, max_connections=max_connections) as server:
        print(server.url, flush=True)
        sys.stdin.read()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------------------------
# Hostile requests


class Client:
    def __init__(self, url: str, keep_alive: float):
        self.url = url
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.wait = keep_alive + 5.0  # the longest a server-side close may take

    def post(self, path: str, content: bytes | str, headers: dict | None = None) -> str:
        content = content.encode() if isinstance(content, str) else content
        headers = {"content-type": "application/json", **(headers or {})}
        return str(httpx.post(self.url + path, content=content, headers=headers, timeout=120).status_code)

    def post_json(self, path: str, body: dict) -> str:
        return self.post(path, json.dumps(body))  # ensure_ascii: lone surrogates travel as \\u escapes

    def raw(self, data: bytes, then: str = "read") -> str:
        """Send bytes on a fresh connection; then "read" the status line (or "closed"), "close"
        or "reset" (an abortive close) at once."""
        sock = socket.create_connection((self.host, self.port), timeout=self.wait)
        try:
            sock.sendall(data)
            if then == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if then in ("close", "reset"):
                return "left"
            received = b""
            try:
                while b"\r\n" not in received and (chunk := sock.recv(4096)):
                    received += chunk
            except ConnectionResetError:
                pass
            except TimeoutError:
                return "still open"
            return received.split(b" ", 2)[1].decode() if received.startswith(b"HTTP/") else "closed"
        finally:
            sock.close()


def head(path: str, length: int | str, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


def cases(c: Client) -> list[tuple[str, str, object]]:
    """(category, name, send) for one round."""
    s = lambda path, body: lambda: c.post_json(path, body)
    raw = lambda path, body: lambda: c.post(path, body)
    msg = lambda content, **kw: {**GOOD_CHAT, "messages": [{"role": "user", "content": content}], **kw}
    body = json.dumps({**GOOD, "prompt": "y" * 300}).encode()
    streamed = json.dumps({**GOOD_CHAT, "stream": True, "max_tokens": 30}).encode()
    out = [
        ("lone surrogates", "prompt", s(C, {**GOOD, "prompt": "\ud800"})),
        ("lone surrogates", "prompt, streamed", s(C, {**GOOD, "prompt": "a\udfff", "stream": True})),
        ("lone surrogates", "prompt list", s(C, {**GOOD, "prompt": ["ok", "\udc00"]})),
        ("lone surrogates", "chat content", s(CC, msg("\ud83d"))),
        ("lone surrogates", "chat content, streamed", s(CC, msg("x\ud800y", stream=True))),
        ("lone surrogates", "chat text part", s(CC, msg([{"type": "text", "text": "\ud800"}]))),
        ("lone surrogates", "stop", s(C, {**GOOD, "stop": ["\ud800"]})),
        ("lone surrogates", "model", s(CC, {**GOOD_CHAT, "model": "\udbff"})),
        ("lone surrogates", "user", s(C, {**GOOD, "user": "\ud800"})),
        ("lone surrogates", "field name", s(C, {**GOOD, "\ud800": 1})),
        ("lone surrogates", "raw UTF-8 surrogate bytes", raw(C, b'{"model":"tiny","prompt":"\xed\xa0\x80"}')),
        ("numbers", "max_tokens 1e30", s(C, {**GOOD, "max_tokens": 10**30})),
        ("numbers", "max_tokens -1", s(C, {**GOOD, "max_tokens": -1})),
        ("numbers", "max_tokens 2^63", s(CC, {**GOOD_CHAT, "max_tokens": 2**63})),
        ("numbers", "max_tokens 1e308", s(C, {**GOOD, "max_tokens": 1e308})),
        ("numbers", "n 1e9", s(C, {**GOOD, "n": 10**9})),
        ("numbers", "n -1", s(CC, {**GOOD_CHAT, "n": -1})),
        ("numbers", "temperature 1e400 (inf)", raw(C, '{"model":"tiny","prompt":"x","temperature":1e400}')),
        ("numbers", "temperature NaN", raw(C, '{"model":"tiny","prompt":"x","temperature":NaN}')),
        ("numbers", "temperature -Infinity", raw(CC, '{"model":"tiny","messages":[],"temperature":-Infinity}')),
        ("numbers", "top_p -0.0", s(C, {**GOOD, "top_p": -0.0})),
        ("numbers", "top_p 1e-320", s(C, {**GOOD, "top_p": 1e-320})),
        ("numbers", "temperature 1e-320", s(C, {**GOOD, "temperature": 1e-320})),
        ("numbers", "top_k 1e20", s(C, {**GOOD, "top_k": 10**20})),
        ("numbers", "seed 1e40", s(C, {**GOOD, "seed": 10**40})),
        ("numbers", "seed -1e40", s(CC, {**GOOD_CHAT, "seed": -(10**40)})),
        ("numbers", "a 5000-digit integer", raw(C, '{"model":"tiny","prompt":"x","seed":' + "9" * 5000 + "}")),
        ("numbers", "token id -1", s(C, {**GOOD, "prompt": [-1]})),
        ("numbers", "token id 2^64", s(C, {**GOOD, "prompt": [2**64]})),
        ("wrong types", "prompt null", s(C, {**GOOD, "prompt": None})),
        ("wrong types", "prompt object", s(C, {**GOOD, "prompt": {"a": 1}})),
        ("wrong types", "prompt [[]]", s(C, {**GOOD, "prompt": [[]]})),
        ("wrong types", "prompt floats", s(C, {**GOOD, "prompt": [1.5, 2.5]})),
        ("wrong types", "prompt true", s(C, {**GOOD, "prompt": True})),
        ("wrong types", "messages a string", s(CC, {**GOOD_CHAT, "messages": "hi"})),
        ("wrong types", "content a number", s(CC, msg(5))),
        ("wrong types", "content null", s(CC, msg(None))),
        ("wrong types", "stop an object", s(C, {**GOOD, "stop": {}})),
        ("wrong types", "stream 'yes'", s(C, {**GOOD, "stream": "yes"})),
        ("wrong types", "n '2'", s(CC, {**GOOD_CHAT, "n": "2"})),
        ("wrong types", "stream_options a list", s(C, {**GOOD, "stream": True, "stream_options": []})),
        ("wrong types", "model a list", s(C, {**GOOD, "model": ["tiny"]})),
        ("wrong types", "logit_bias", s(C, {**GOOD, "logit_bias": {"1": 100}})),
        ("wrong types", "body a list", raw(C, "[1, 2, 3]")),
        ("wrong types", "body a string", raw(CC, '"hello"')),
        ("garbage JSON", "cut short", raw(C, '{"model": "tiny", "pro')),
        ("garbage JSON", "random bytes", raw(C, bytes(range(256)) * 4)),
        ("garbage JSON", "NUL bytes", raw(CC, b"\x00" * 100)),
        ("garbage JSON", "empty", raw(C, b"")),
        ("garbage JSON", "nested 100000 deep", raw(C, "[" * 100_000 + "]" * 100_000)),
        ("garbage JSON", "objects nested 50000 deep", raw(CC, '{"a":' * 50_000 + "1" + "}" * 50_000)),
        ("garbage JSON", "UTF-16", raw(C, json.dumps(GOOD).encode("utf-16"))),
        ("garbage JSON", "trailing garbage", raw(C, json.dumps(GOOD) + "}}}")),
        ("long prompts", "900 kB prompt", s(C, {**GOOD, "prompt": "x" * 900_000})),
        ("long prompts", "900 kB chat message", s(CC, msg("é" * 450_000))),
        ("long prompts", "100 000 prompts", s(C, {**GOOD, "prompt": ["x"] * 100_000})),
        ("long prompts", "200 000 token ids", s(C, {**GOOD, "prompt": [65] * 200_000})),
        ("long prompts", "2 MiB body", s(C, {**GOOD, "prompt": "x" * (2 * MAX_BODY_BYTES)})),
        ("long prompts", "2 MiB body, chunked", lambda: c.post(C, iter([b"{" + b" " * MAX_BODY_BYTES] * 2))),
        ("long prompts", "65 stop strings", s(C, {**GOOD, "stop": ["a"] * 65})),
        (
            "truncated bodies",
            "Content-Length beyond the body, then close",
            lambda: c.raw(head(C, 500) + body[:50], "close"),
        ),
        ("truncated bodies", "cut mid-body, then RST", lambda: c.raw(head(CC, 500) + body[:50], "reset")),
        ("truncated bodies", "headers only, then close", lambda: c.raw(head(C, len(body)), "close")),
        ("truncated bodies", "cut mid-body, then wait", lambda: c.raw(head(C, 500) + body[:50])),
        ("truncated bodies", "whole body, then leave at once", lambda: c.raw(head(C, len(body)) + body, "close")),
        (
            "truncated bodies",
            "whole streamed body, then RST",
            lambda: c.raw(head(CC, len(streamed)) + streamed, "reset"),
        ),
        ("broken HTTP", "garbage request line", lambda: c.raw(b"HELLO WORLD\r\n\r\n")),
        ("broken HTTP", "Content-Length -1", lambda: c.raw(head(C, -1) + b"{}")),
        ("broken HTTP", "Content-Length abc", lambda: c.raw(head(C, "abc") + b"{}")),
        ("broken HTTP", "two Content-Lengths", lambda: c.raw(head(C, 2, "Content-Length: 3\r\n") + b"{}")),
        (
            "broken HTTP",
            "bad chunk size",
            lambda: c.raw(
                b"POST /v1/completions HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n{}\r\n0\r\n\r\n"
            ),
        ),
        ("broken HTTP", "header line of 64 kB", lambda: c.raw(head(C, 2, f"X-Big: {'a' * 65536}\r\n") + b"{}")),
        (
            "broken HTTP",
            "a control character in the path",
            lambda: c.raw(b"GET /he\x01alth HTTP/1.1\r\nHost: b\r\n\r\n"),
        ),
        ("well-formed", "completion", s(C, GOOD)),
        ("well-formed", "completion, streamed", s(C, {**GOOD, "stream": True})),
        ("well-formed", "chat", s(CC, GOOD_CHAT)),
        ("well-formed", "chat, streamed", s(CC, {**GOOD_CHAT, "stream": True})),
        ("well-formed", "emoji as a surrogate pair", s(C, {**GOOD, "prompt": "\U0001f600"})),
    ]
    return out


def idle_connections(c: Client, count: int) -> dict:
    """`count` connections that send nothing, part of a request line, headers without their end or
    a body cut short: how many the server closed, and how long that took."""
    partial = [b"", b"POST /v1/compl", b"POST /v1/completions HTTP/1.1\r\nHost: b\r\n", head(C, 100) + b'{"m']
    socks, start = [], time.monotonic()
    for i in range(count):
        sock = socket.create_connection((c.host, c.port), timeout=c.wait)
        sock.sendall(partial[i % len(partial)])
        socks.append(sock)
    closed_after, still_open = [], 0
    for sock in socks:
        try:
            sock.settimeout(max(0.01, c.wait - (time.monotonic() - start)))
            while sock.recv(4096):
                pass
            closed_after.append(time.monotonic() - start)
        except ConnectionResetError:
            closed_after.append(time.monotonic() - start)
        except TimeoutError:
            still_open += 1
        finally:
            sock.close()
    return {
        "opened": count,
        "closed_by_server": len(closed_after),
        "still_open": still_open,
        "max_seconds_to_close": round(max(closed_after, default=float("nan")), 2),
    }


def flood(c: Client, max_connections: int, extra: int) -> dict:
    """Hold `max_connections` idle connections, then send `extra` requests on new ones: uvicorn
    answers them 503. Then /health once the idle ones are gone."""
    held = [socket.create_connection((c.host, c.port), timeout=c.wait) for _ in range(max_connections)]
    time.sleep(0.2)  # the server has accepted them
    statuses = Counter()
    try:
        for _ in range(extra):
            statuses[c.raw(b"GET /health HTTP/1.1\r\nHost: b\r\n\r\n")] += 1
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            after = httpx.get(c.url + "/health", timeout=10).status_code
        except httpx.TransportError:
            after = None
        if after == 200:
            break
        time.sleep(0.05)
    return {"held": max_connections, "sent": extra, "answers": dict(statuses), "health_after": after}


def server_5xx(c: Client) -> dict[str, float]:
    counts = {}
    for line in httpx.get(c.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("moelab_requests_total{") and 'status="5' in line:
            counts[line.split()[0]] = float(line.split()[1])
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="times each case is sent (default 4)")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--keep-alive", type=float, default=1.0, help="the server's --timeout-keep-alive")
    parser.add_argument("--max-connections", type=int, default=64, help="the server's --max-connections")
    parser.add_argument("--idle", type=int, default=48, help="idle and incomplete connections held open")
    parser.add_argument("--out", default="benchmarks/results/hostile_requests.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        serve_child(args.keep_alive, args.max_connections)
        return
    if args.idle >= args.max_connections:
        raise SystemExit("hostile_requests.py: error: --idle must be below --max-connections")

    child = subprocess.Popen(
        [sys.executable, __file__, "--child", "--keep-alive", str(args.keep_alive), "--max-connections",
         str(args.max_connections)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(child.stderr), daemon=True).start()
    try:
        url = child.stdout.readline().strip()
        if not url:
            raise SystemExit("hostile_requests.py: error: the server did not start:\n" + "".join(log))
        c = Client(url, args.keep_alive)
        deadline = time.monotonic() + 120
        while httpx.get(url + "/health", timeout=10).status_code != 200:
            if time.monotonic() > deadline:
                raise SystemExit("hostile_requests.py: error: the model did not load")
            time.sleep(0.05)
        for body in (GOOD, {**GOOD, "stream": True}):  # warm up before the first RSS
            c.post_json(C, body)
            c.post_json(CC, {**GOOD_CHAT, "stream": body.get("stream", False)})
        rss_before = rss_mib(child.pid)

        rounds = [cases(c) for _ in range(args.rounds)]
        todo = [case for round_ in rounds for case in round_]
        rss_rounds: list[float] = []
        by_category: dict[str, Counter] = {}
        failures: list[str] = []

        def run(case) -> tuple[str, str, str]:
            category, name, send = case
            try:
                return category, name, send()
            except Exception as exc:  # the client's own error: reported, never hidden
                return category, name, f"client error {type(exc).__name__}"

        start = time.monotonic()
        with ThreadPoolExecutor(args.threads) as pool:
            for round_ in rounds:
                for category, name, status in pool.map(run, round_):
                    by_category.setdefault(category, Counter())[status] += 1
                    if status.startswith("5") or status.startswith("client error") or status == "still open":
                        failures.append(f"{category} / {name}: {status}")
                rss_rounds.append(rss_mib(child.pid))
        hostile_s = time.monotonic() - start
        idle = idle_connections(c, args.idle)
        flooded = flood(c, args.max_connections, 20)
        final = c.post_json(C, GOOD)
        errors_counted = server_5xx(c)
        time.sleep(0.5)
        rss_after = rss_mib(child.pid)
    finally:
        if child.poll() is None:
            child.stdin.close()
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
    tracebacks = sum("Traceback" in line for line in log)
    error_lines = [line.rstrip() for line in log if line.startswith("ERROR")]

    statuses = sorted({s for counter in by_category.values() for s in counter}, key=lambda s: (not s.isdigit(), s))
    width = max(len(k) for k in by_category) + 2
    print(
        f"{len(todo)} hostile and well-formed requests ({args.rounds} rounds, {args.threads} threads, "
        f"{hostile_s:.1f} s); server keep-alive {args.keep_alive:g} s, max connections {args.max_connections}"
    )
    print(f"{'category':<{width}}" + "".join(f"{s:>10}" for s in statuses) + f"{'total':>8}")
    for category, counter in by_category.items():
        print(
            f"{category:<{width}}"
            + "".join(f"{counter.get(s, 0) or '':>10}" for s in statuses)
            + f"{sum(counter.values()):>8}"
        )
    total = Counter()
    for counter in by_category.values():
        total.update(counter)
    print(f"{'all':<{width}}" + "".join(f"{total.get(s, 0):>10}" for s in statuses) + f"{sum(total.values()):>8}")
    print(
        f"idle and incomplete connections: {idle['closed_by_server']} of {idle['opened']} closed by the server "
        f"within {idle['max_seconds_to_close']} s, {idle['still_open']} still open"
    )
    print(
        f"connection flood: {flooded['held']} held, {flooded['sent']} more requests answered "
        f"{flooded['answers']} (uvicorn's limit, by design); /health afterwards: {flooded['health_after']}"
    )
    print(f"a well-formed request at the end: {final}")
    print(f"5xx counted by the server (/metrics): {errors_counted or 'none'}")
    print(f"server log: {tracebacks} tracebacks, {len(error_lines)} ERROR lines")
    print(
        f"server RSS: {rss_before:.1f} MiB before, {rss_after:.1f} MiB after ({rss_after - rss_before:+.1f} MiB); "
        f"after each round: {', '.join(f'{r:.0f}' for r in rss_rounds)} MiB"
    )
    ok = (
        not failures and not errors_counted and not tracebacks and not error_lines and final == "200"
        and idle["still_open"] == 0 and flooded["health_after"] == 200
    )  # fmt: skip
    print("PASS: no 5xx, no traceback, the server goes on" if ok else "FAIL:\n  " + "\n  ".join(failures + error_lines))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "settings": vars(args) | {"python": platform.python_version(), "machine": platform.machine()},
                "requests": len(todo),
                "seconds": round(hostile_s, 2),
                "by_category": {k: dict(v) for k, v in by_category.items()},
                "total": dict(total),
                "failures": failures,
                "idle_connections": idle,
                "flood": flooded,
                "final_request": final,
                "server_5xx": errors_counted,
                "tracebacks": tracebacks,
                "error_lines": error_lines,
                "rss_mib": {
                    "before": round(rss_before, 1),
                    "after_each_round": [round(r, 1) for r in rss_rounds],
                    "after": round(rss_after, 1),
                },
                "ok": ok,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
