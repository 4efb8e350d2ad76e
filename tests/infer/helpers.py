"""Test doubles and polling for the inference tests."""

from __future__ import annotations

import threading
import time

import torch


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
