"""The trainer's runtime interface: one process and torchrun's Distributed offer the same methods
with the same parameters, and the single-process runtime is the identity where it should be."""

from __future__ import annotations

import inspect

import pytest
import torch

from moelab.config import load_config
from moelab.distributed import Distributed
from moelab.model import Transformer
from moelab.train.runtime import Runtime, SingleProcess, runtime_for


def interface() -> dict[str, inspect.Signature | None]:
    """Runtime's members: methods with their signatures, attributes and properties as None."""
    members: dict[str, inspect.Signature | None] = {name: None for name in Runtime.__annotations__}
    for name, member in vars(Runtime).items():
        if name.startswith("_"):
            continue
        members[name] = inspect.signature(member) if inspect.isfunction(member) else None
    return members


@pytest.mark.parametrize("implementation", [SingleProcess, Distributed])
def test_each_runtime_implements_the_interface(implementation) -> None:
    members = interface()
    assert {"router_health", "save_checkpoint", "clip_grad_norm", "is_main", "device"} <= set(members)
    for name, signature in members.items():
        if name == "device":
            continue  # set per instance
        assert hasattr(implementation, name), f"{implementation.__name__} lacks {name}"
        if signature is not None:
            got = inspect.signature(getattr(implementation, name))
            assert list(got.parameters) == list(signature.parameters), (implementation.__name__, name)


def test_single_process_is_the_identity_and_clips_like_torch() -> None:
    runtime = runtime_for(load_config(preset="tiny", overrides=["train.device=cpu"]))
    assert isinstance(runtime, SingleProcess) and runtime.device == torch.device("cpu")
    assert (runtime.rank, runtime.world, runtime.is_main, runtime.full_model_here) == (0, 1, True, True)
    assert runtime.mean(1.5, 2.5) == [1.5, 2.5] and runtime.sum(3.0, 4) == [3.0, 4]
    assert runtime.broadcast({"a": [1]}) == {"a": [1]} and runtime.any(True) and not runtime.any(False)
    cfg = load_config(preset="tiny", overrides=["model.vocab_size=64"]).model
    model = Transformer(cfg)
    assert runtime.wrap(model) is model
    x, y = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    assert runtime.eval_rows(x, y) == (x, y, True)
    model(x).logits.square().mean().backward()
    reference = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    norm = runtime.clip_grad_norm(model, 0.5 * float(reference))
    assert norm == pytest.approx(float(reference), rel=1e-5)
    for p, g in zip([p for p in model.parameters() if p.grad is not None], grads):
        torch.testing.assert_close(p.grad, g * 0.5, rtol=1e-4, atol=1e-8)  # scaled to half the norm
