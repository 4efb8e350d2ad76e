"""Fixtures for the Hugging Face interop tests: offline transformers, tiny models and runs."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # from_pretrained(local_dir) only: never the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

LOGIT_TOL = 1e-4  # fp32 parity with transformers' forward


@pytest.fixture(scope="session")
def transformers():
    tf = pytest.importorskip("transformers")
    tf.utils.logging.disable_progress_bar()
    return tf


@torch.no_grad()
def perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Random weights everywhere, norms included (1 + noise), so that a swapped or transposed
    tensor changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=generator) * scale
        p.copy_(noise + (1.0 if "norm" in name else 0.0))


@contextmanager
def transformers_warnings():
    """Collect the warnings transformers logs (it does not propagate to the root logger)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("transformers")
    handler = Collect(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def hf_tokenizer(transformers, out: Path):
    """A Hugging Face byte-level tokenizer with its own special tokens (<s>, </s>, <pad>), as
    tokenizers of downloaded models have; saved into `out` with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from moelab.data.tokenizer import bytes_to_unicode

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(out)
    return fast


def write_moelab_run(out: Path, model_settings: dict, seed: int = 0):
    """A moelab run with random (perturbed) weights and the raw-bytes tokenizer; returns (run, model)."""
    from moelab.config import build_config
    from moelab.data.tokenizer import bytes_tokenizer
    from moelab.interop.runs import write_fresh_run
    from moelab.model import Transformer

    tokenizer = bytes_tokenizer()
    out.parent.mkdir(parents=True, exist_ok=True)
    tok_file = out.parent / f".{out.name}-tokenizer.json"
    tokenizer.save(tok_file)
    settings = {"vocab_size": tokenizer.vocab_size, "max_seq_len": 64, **model_settings}
    cfg = build_config({"model": settings, "data": {"tokenizer": "bytes", "seq_len": 32}})
    torch.manual_seed(seed)
    model = Transformer(cfg.model)
    perturb_(model, seed)
    write_fresh_run(out, cfg, model, {"tokenizer.json": tok_file}, "test")
    return out, model.eval()


@torch.no_grad()
def greedy(model, ids: list[int], steps: int) -> list[int]:
    """moelab greedy decoding through the KV cache (prefill, then one token per step)."""
    from moelab.model import KVCache

    cache = KVCache(model.cfg, batch=1, max_len=len(ids) + steps, device="cpu", dtype=torch.float32)
    logits = model(torch.tensor([ids]), cache=cache).logits[:, -1]
    out = []
    for position in range(len(ids), len(ids) + steps):
        token = int(logits.argmax(-1))
        out.append(token)
        logits = model(torch.tensor([[token]]), positions_BT=torch.tensor([[position]]), cache=cache).logits[:, -1]
    return out


@torch.no_grad()
def hf_greedy(hf_model, ids: list[int], steps: int) -> list[int]:
    """transformers' own greedy generation, never stopping early."""
    output = hf_model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=steps,
        do_sample=False,
        eos_token_id=None,  # overrides generation_config.json: decode all `steps` tokens
        pad_token_id=0,
    )
    return output[0, len(ids) :].tolist()
