"""Test doubles, polling and the real server's start and clients for the inference tests."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import torch

from moelab.infer.engine import EngineConfig
from moelab.infer.http_transport import BackgroundServer
from moelab.infer.server import ServerSettings, create_app

MODEL = "tiny"  # the name the test servers serve their model under


class StepGate(torch.nn.Module):
    """Wraps a model: every forward pass waits for a permit (or runs freely once opened), and
    can be made to raise. Tests use it to hold the engine mid-generation deterministically."""

    def __init__(self, model, timeout: float = 60.0):
        super().__init__()
        self.inner = model
        self.cfg = model.cfg
        self.timeout = timeout
        self._permits = threading.Semaphore(0)
        self._open = threading.Event()
        self.calls = 0
        self.waiting = 0  # forward passes blocked at the gate now
        self.fail_next = False

    def forward(self, *args, **kwargs):
        self.waiting += 1
        try:
            if not self._open.is_set() and not self._permits.acquire(timeout=self.timeout):
                raise TimeoutError("the test never released this forward pass")
        finally:
            self.waiting -= 1
        self.calls += 1
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected failure")
        return self.inner(*args, **kwargs)

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self._permits.release()

    def open(self) -> None:
        self._open.set()
        self.release(1000)


def wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll until condition() is true (the tests assert on states, never on durations)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def start(load, **settings) -> BackgroundServer:
    """A server on a free localhost port for the model `load()` returns (16 rows, queue 64 unless
    `engine` says otherwise); not yet known to be ready (`ready`)."""
    engine = settings.pop("engine", EngineConfig(max_batch=16, max_queue=64))
    app = create_app(load, ServerSettings(model_name=MODEL, engine=engine, **settings))
    return BackgroundServer(app).start()


def ready(server: BackgroundServer, headers=None) -> None:
    wait_for(lambda: httpx.get(server.url + "/health", headers=headers).status_code == 200, what="the model to load")


def client(server: BackgroundServer, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)
