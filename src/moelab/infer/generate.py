"""Single-prompt generation with a KV cache: one prefill, then one token per decode step."""

from __future__ import annotations

from collections.abc import Callable

import torch

from moelab.data.tokenizer import StreamDecoder, TextTokenizer
from moelab.infer.sampling import SamplingParams, sample_next
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
) -> str:
    """Generate a continuation of `prompt`; `on_text` receives each printable piece as it is made."""
    params.validate()
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    limit = model.cfg.max_seq_len
    if len(ids) >= limit:
        raise ValueError(f"prompt is {len(ids)} tokens; the model's context window is {limit}")
    max_new_tokens = min(max_new_tokens, limit - len(ids))
    generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, batch=1, max_len=min(limit, len(ids) + max_new_tokens), device=device, dtype=dtype)
    decoder = StreamDecoder(tokenizer)
    logits = model(torch.tensor([ids], device=device), cache=cache).logits[:, -1]
    position = len(ids)
    pieces = []
    for _ in range(max_new_tokens):
        token = int(sample_next(logits, params, generator)[0])
        if stop_at_eos and token == tokenizer.eos_id:
            break
        piece = decoder.push(token)
        if piece:
            pieces.append(piece)
            if on_text:
                on_text(piece)
        if position >= cache.max_len:
            break
        logits = model(torch.tensor([[token]], device=device), positions_BT=torch.tensor([[position]], device=device), cache=cache).logits[:, -1]
        position += 1
    tail = decoder.flush()
    if tail:
        pieces.append(tail)
        if on_text:
            on_text(tail)
    model.train(was_training)
    return "".join(pieces)
