"""Next-token sampling: temperature (0 = greedy), top-k, top-p, with an explicit generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off

    def validate(self) -> None:
        if not (self.temperature >= 0):
            raise ValueError(f"temperature = {self.temperature} is not allowed: a number >= 0 (0 = greedy)")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p = {self.top_p} is not allowed: a number in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k = {self.top_k} is not allowed: an integer >= 0 (0 = off)")


def filter_logits(logits_BV: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits with everything outside top-k / the top-p nucleus set to -inf."""
    logits = logits_BV.float() / max(params.temperature, 1e-8)
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each token
        remove_sorted = before >= params.top_p  # keeps at least the most likely token
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_next(logits_BV: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row: [B] int64."""
    if params.temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits_BV, params), dim=-1)
    if generator is not None:  # a seeded CPU generator makes the draw reproducible on any device
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits_BV.device)
    return torch.multinomial(probs, 1).squeeze(-1)
