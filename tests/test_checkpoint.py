"""The checkpoint format (moelab.checkpoint): every manifest defect and every unreadable part is a
clean CheckpointError, and the folders a killed write leaves behind are cleaned up."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from moelab.checkpoint import (
    MANIFEST_FILE,
    TRAINER_FILE,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
    verify_checkpoint,
)
from moelab.config import load_config
from moelab.errors import CheckpointError
from moelab.model import Transformer


def tiny_model() -> Transformer:
    return Transformer(load_config(preset="tiny", overrides=["model.vocab_size=64"]).model)


@pytest.fixture
def checkpoint(tmp_path):
    return save_checkpoint(tmp_path, 7, tiny_model(), {"step": 7, "note": "x"}, keep=2)


def rewrite_manifest(path, change) -> None:
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    (path / MANIFEST_FILE).write_text(json.dumps(change(manifest)))


MANIFEST_DEFECTS = {
    "no files": (lambda m: {**m, "files": {}}, "lists no model.safetensors"),
    "files not a table": (lambda m: {**m, "files": ["model.safetensors"]}, "has no files table"),
    "no step": (lambda m: {k: v for k, v in m.items() if k != "step"}, "has no integer step"),
    "step as text": (lambda m: {**m, "step": "7"}, "has no integer step"),
    "step as a boolean": (lambda m: {**m, "step": True}, "has no integer step"),
    "another step": (lambda m: {**m, "step": 8}, "says step 8 but its directory is step 7"),
    "trainer state unlisted": (
        lambda m: {**m, "files": {k: v for k, v in m["files"].items() if k != TRAINER_FILE}},
        "lists no trainer.pt",
    ),
    "entry not a table": (
        lambda m: {**m, "files": {**m["files"], TRAINER_FILE: "abc"}},
        "malformed entry for trainer.pt",
    ),
    "sha256 not hex": (
        lambda m: {**m, "files": {**m["files"], TRAINER_FILE: {"sha256": "z" * 64, "bytes": 1}}},
        "has no sha256 for trainer.pt",
    ),
    "negative size": (
        lambda m: {**m, "files": {**m["files"], TRAINER_FILE: {**m["files"][TRAINER_FILE], "bytes": -1}}},
        "has no byte count for trainer.pt",
    ),
    "a path outside": (
        lambda m: {**m, "files": {**m["files"], "../config.toml": m["files"][TRAINER_FILE]}},
        "outside the checkpoint",
    ),
    "not an object": (lambda m: [m], "is not a JSON object"),
}


def test_the_intact_checkpoint_verifies_and_loads(checkpoint) -> None:
    assert verify_checkpoint(checkpoint)["step"] == 7
    assert load_checkpoint(checkpoint, tiny_model())["note"] == "x"


@pytest.mark.parametrize("defect", sorted(MANIFEST_DEFECTS))
def test_every_manifest_defect_is_refused_by_name(checkpoint, defect) -> None:
    change, message = MANIFEST_DEFECTS[defect]
    rewrite_manifest(checkpoint, change)
    with pytest.raises(CheckpointError, match="is damaged") as err:
        verify_checkpoint(checkpoint)
    assert message in str(err.value) and str(checkpoint / MANIFEST_FILE) in str(err.value)
    with pytest.raises(CheckpointError):
        load_checkpoint(checkpoint, tiny_model())


def test_a_manifest_that_is_not_utf8_is_refused(checkpoint) -> None:
    (checkpoint / MANIFEST_FILE).write_bytes(b'{"step": 7, "files": {"\xff\xfe": 1}}')
    with pytest.raises(CheckpointError, match="not valid UTF-8 JSON"):
        verify_checkpoint(checkpoint)


def _rehash(path, name) -> None:
    """Make the manifest match a replaced file, so that only loading can find the problem."""
    data = (path / name).read_bytes()
    rewrite_manifest(
        path,
        lambda m: {
            **m,
            "files": {**m["files"], name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}},
        },
    )


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"not a pickle at all", "trainer.pt"),
        (None, "holds no trainer state"),  # a valid file holding a list, not the trainer's dict
    ],
)
def test_a_trainer_state_that_cannot_load_is_a_clean_refusal(checkpoint, content, expected) -> None:
    if content is None:
        torch.save([1, 2, 3], checkpoint / TRAINER_FILE)
    else:
        (checkpoint / TRAINER_FILE).write_bytes(content)
    _rehash(checkpoint, TRAINER_FILE)
    with pytest.raises(CheckpointError, match="cannot be loaded") as err:
        load_checkpoint(checkpoint, tiny_model())
    assert expected in str(err.value) and "weights_only" not in str(err.value)


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path, checkpoint) -> None:
    root = tmp_path / "checkpoints"
    for name in (".tmp-step_0000009-abc", ".old-step_0000003-12"):
        (root / name).mkdir()
        (root / name / "model.safetensors").write_bytes(b"half")
    (root / ".keepme").mkdir()
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".old-step_0000003-12", ".tmp-step_0000009-abc"]
    assert sorted(p.name for p in root.iterdir()) == [".keepme", checkpoint.name]
    assert remove_stale_temporaries(tmp_path / "no-such-run") == []
