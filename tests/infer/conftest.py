"""Fixtures of the inference tests: the trained tiny run, loaded once, and a server of it per test
module that asks for one."""

from __future__ import annotations

import openai
import pytest
import torch

from moelab.infer.server import Servable
from tests.infer.helpers import client, ready, start


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """These tiny models decode fastest on one intra-op thread; on a busy machine torch's
    multi-threaded scatter kernel, which MoE dispatch uses, can take 100x longer on the main
    thread (see docs/serving.md, Performance). Restored afterwards for the other tests."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny(tiny_run):
    """The tiny run's model (MoE, 64-token context, byte tokenizer), loaded once."""
    from moelab.rundir import load_model

    return load_model(tiny_run, "cpu")


@pytest.fixture(scope="session")
def tiny_servable(tiny) -> Servable:
    return Servable(tiny.model, tiny.tokenizer, created=123)


@pytest.fixture(scope="module")
def server(tiny_servable):
    """The tiny model served on a free localhost port, ready, for the module's tests."""
    srv = start(lambda: tiny_servable)
    ready(srv)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api(server) -> openai.OpenAI:
    """The official openai client of the module's server."""
    return client(server)
