"""Shared fixtures: a private token cache per test session and one small trained run."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory):
    """Keep the tests' token files out of the user's cache (and share them within the session)."""
    path = tmp_path_factory.mktemp("token-cache")
    old = os.environ.get("MOELAB_CACHE")
    os.environ["MOELAB_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MOELAB_CACHE", None)
    else:
        os.environ["MOELAB_CACHE"] = old


TINY_FAST = [
    "train.max_steps=24",
    "train.eval_every=12",
    "train.checkpoint_every=12",
    "train.log_every=4",
    "train.sample_tokens=8",
]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, token_cache):
    """A finished tiny run (MoE) that eval / generate / serve / export tests can read."""
    from moelab.config import load_config
    from moelab.train.trainer import Trainer

    out = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = load_config(preset="tiny", overrides=TINY_FAST)
    Trainer(cfg, out, log=lambda s: None, progress=False).fit()
    return out
