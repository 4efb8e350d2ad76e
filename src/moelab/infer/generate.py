"""Single-prompt generation with a KV cache: one prefill, then one token per decode step.

The plain loop, for the CLI and the trainer's sample, and the reference the batching engine is
tested against: with the same seed both draw the same numbers (moelab.infer.sampling)."""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch

from moelab.data.tokenizer import StreamDecoder, TextTokenizer
from moelab.infer.sampling import SamplingParams, sample_next, seeded_generator
from moelab.model import KVCache, Transformer


@torch.no_grad()
def generate(
    model: Transformer,
    tokenizer: TextTokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    params: SamplingParams = SamplingParams(),
    seed: int | None = None,
    on_text: Callable[[str], None] | None = None,
    stop_at_eos: bool = True,
    stop_token_ids: Collection[int] = (),
) -> str:
    """Generate a continuation of `prompt`; `on_text` receives each printable piece as it is made.
    Generation ends at the end-of-text token (unless stop_at_eos is False) or any of stop_token_ids."""
    params.validate()
    stop_ids = set(stop_token_ids) | ({tokenizer.eos_id} if stop_at_eos else set())
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    limit = model.cfg.max_seq_len
    if len(ids) >= limit:
        raise ValueError(f"prompt is {len(ids)} tokens; the model's context window is {limit}")
    max_new_tokens = min(max_new_tokens, limit - len(ids))
    generator = seeded_generator(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    try:
        return _decode_loop(model, tokenizer, ids, max_new_tokens, params, generator, on_text, stop_ids)
    finally:
        model.train(was_training)


def _decode_loop(model, tokenizer, ids, max_new_tokens, params, generator, on_text, stop_ids) -> str:
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, batch=1, max_len=len(ids) + max_new_tokens, device=device, dtype=dtype)
    decoder = StreamDecoder(tokenizer)
    pieces = []

    def emit(piece: str) -> None:
        if piece:
            pieces.append(piece)
            if on_text:
                on_text(piece)

    logits = model(torch.tensor([ids], device=device), cache=cache).logits[:, -1]
    position = len(ids)
    for _ in range(max_new_tokens):
        token = int(sample_next(logits, params, generator)[0])
        if token in stop_ids:
            break
        emit(decoder.push(token))
        if position >= cache.max_len:
            break
        logits = model(
            torch.tensor([[token]], device=device), positions_BT=torch.tensor([[position]], device=device), cache=cache
        ).logits[:, -1]
        position += 1
    emit(decoder.flush())
    return "".join(pieces)


def training_sample(model: Transformer, tokenizer: TextTokenizer, tokens: int, seed: int) -> str:
    """The short sample `moelab train` prints at the end of a run (the Trainer's `sampler`)."""
    return generate(model, tokenizer, "def ", tokens, SamplingParams(temperature=0.8, top_p=0.95), seed=seed)
