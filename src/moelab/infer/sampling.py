"""Next-token sampling: temperature (0 = greedy), top-k, top-p, one uniform draw per row.

Every row of a batch may carry its own settings and its own random stream. A row's token depends
only on its logits, its settings and one uniform number from its own generator (inverse-CDF
sampling over the vocabulary in token-id order), never on the other rows: a request with a seed
produces the same text alone or batched with others, and a single-prompt `generate()` with that
seed produces it too.

Shape legend: B rows, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off

    def validate(self) -> None:
        if not (self.temperature >= 0) or self.temperature == float("inf"):
            raise ValueError(f"temperature = {self.temperature} is not allowed: a finite number >= 0 (0 = greedy)")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p = {self.top_p} is not allowed: a number in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k = {self.top_k} is not allowed: an integer >= 0 (0 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _sorted_probs(logits_BV: torch.Tensor, params: Sequence[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the filtered, renormalised distribution over the vocabulary sorted by logit
    (descending), and the token id at each sorted position. Both [B, V]."""
    B, V = logits_BV.shape
    device = logits_BV.device
    temperature_B = torch.tensor([max(p.temperature, 1e-8) for p in params], device=device)
    top_k_B = torch.tensor([p.top_k if 0 < p.top_k < V else V for p in params], device=device)
    top_p_B = torch.tensor([p.top_p for p in params], device=device)
    scaled_BV = logits_BV.float() / temperature_B[:, None]
    # NOTE: a stable sort puts equal logits in token order, so ties resolve the same way every time.
    sorted_BV, order_BV = torch.sort(scaled_BV, dim=-1, descending=True, stable=True)
    rank_V = torch.arange(V, device=device)
    sorted_BV = sorted_BV.masked_fill(rank_V[None] >= top_k_B[:, None], float("-inf"))
    probs_BV = torch.softmax(sorted_BV, dim=-1)
    mass_above_BV = torch.cumsum(probs_BV, dim=-1) - probs_BV  # probability of the better tokens
    # NOTE: top_p = 1 must keep everything, even where the running sum rounds up to 1 early.
    # NOTE: the first token always stays, also for a top_p that rounds to 0 in float32 (1e-320).
    outside_BV = (mass_above_BV >= top_p_B[:, None]) & (top_p_B[:, None] < 1) & (rank_V[None] > 0)
    probs_BV = probs_BV.masked_fill(outside_BV, 0.0)
    return probs_BV / probs_BV.sum(-1, keepdim=True), order_BV


def filter_logits(logits_BV: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits with everything outside the top-k / the top-p nucleus set to -inf
    (exactly k tokens survive top-k; ties at the boundary go to the lower token id)."""
    probs_BV, order_BV = _sorted_probs(logits_BV, [params] * logits_BV.shape[0])
    keep_BV = torch.zeros_like(probs_BV, dtype=torch.bool).scatter(-1, order_BV, probs_BV > 0)
    return (logits_BV.float() / max(params.temperature, 1e-8)).masked_fill(~keep_BV, float("-inf"))


SEED_MODULUS = 2**64  # torch.Generator seeds are unsigned 64-bit


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator for one sequence (CPU, so that a seed gives the same draws on any device);
    any integer is taken modulo 2**64."""
    return torch.Generator(device="cpu").manual_seed(seed % SEED_MODULUS)


def draw_uniform(generator: torch.Generator | None) -> float:
    """The one random number a row spends per token; None uses torch's global generator."""
    return float(torch.rand((), generator=generator))


def sample_rows(logits_BV: torch.Tensor, params: Sequence[SamplingParams], uniform_B: Sequence[float]) -> list[int]:
    """One token id per row. Greedy rows take the argmax (their uniform is ignored); the others take
    the first token (in id order) whose cumulative filtered probability exceeds their uniform
    number in [0, 1)."""
    B = logits_BV.shape[0]
    if len(params) != B or len(uniform_B) != B:
        raise ValueError(f"{B} rows of logits but {len(params)} settings and {len(uniform_B)} uniform numbers")
    tokens_B = logits_BV.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        index = torch.tensor(sampled, device=logits_BV.device)
        sorted_SV, order_SV = _sorted_probs(logits_BV.index_select(0, index), [params[i] for i in sampled])
        # NOTE: the draw walks the vocabulary in token-id order, not in sorted order: tokens with
        # near-equal logits (rare tokens often have them) swap places in a sort under rounding-level
        # differences, which would move whole intervals of the CDF; in id order a difference in the
        # logits moves the CDF by as little, so batching cannot change a seeded draw in practice.
        probs_SV = torch.zeros_like(sorted_SV).scatter(-1, order_SV, sorted_SV)
        cdf_SV = torch.cumsum(probs_SV, dim=-1)
        u_S1 = torch.tensor([[uniform_B[i]] for i in sampled], device=logits_BV.device, dtype=cdf_SV.dtype)
        # right=True skips zero-probability tokens (where the CDF does not rise); the clamp guards
        # against a CDF that rounds to just below its last value.
        pick_S1 = torch.searchsorted(cdf_SV, u_S1 * cdf_SV[:, -1:], right=True).clamp_max(cdf_SV.shape[-1] - 1)
        tokens_B = tokens_B.index_copy(0, index, pick_S1.squeeze(-1))
    return tokens_B.tolist()


def sample_next(
    logits_BV: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One token id per row, all rows with the same settings and generator: [B] int64."""
    uniform = [0.0 if params.greedy else draw_uniform(generator) for _ in range(logits_BV.shape[0])]
    return torch.tensor(sample_rows(logits_BV, [params] * logits_BV.shape[0], uniform), device=logits_BV.device)
