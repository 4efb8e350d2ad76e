"""Mixture-of-experts feed-forward: router, stacked experts, shared experts, load balancing.

Shape legend: T tokens (batch and sequence flattened), D model width, E routed experts, k experts per
token, I expert hidden size, C expert capacity.

Router statistics (tokens per expert, dropped slots, entropy, z-loss, max logit) are accumulated in
non-persistent buffers by training-mode forwards only, and read and reset by the trainer through
`MoE.read_stats`. Nothing is kept in module-level state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moelab.config import MoEConfig
from moelab.model.dispatch import (
    DispatchPlan,
    count_per_expert,
    experts_swiglu,
    plan_expert_choice,
    plan_token_choice,
)
from moelab.model.mlp import SwiGLU


@dataclass
class Routing:
    """What the router decided for one forward pass."""

    plan: DispatchPlan  # which slots each expert processes, grouped by expert
    logits_TE: torch.Tensor  # [T, E] fp32 router logits
    probs_TE: torch.Tensor  # [T, E] fp32 per-token distribution over experts (sums to 1)
    slots_per_expert_E: torch.Tensor  # [E] slots routed to each expert before any dropping


def expert_capacity(num_tokens: int, cfg: MoEConfig) -> int | None:
    """Slots per expert: ceil(capacity_factor * T * k / E); None when dropless.

    Expert choice always has a capacity (capacity_factor defaults to 1 there), at most T."""
    factor = cfg.capacity_factor
    if factor is None:
        if cfg.routing == "token_choice":
            return None
        factor = 1.0
    capacity = math.ceil(factor * num_tokens * cfg.top_k / cfg.num_experts)
    return max(1, min(capacity, num_tokens)) if cfg.routing == "expert_choice" else max(1, capacity)


class Router(nn.Module):
    """Scores tokens against experts and picks who goes where. All router math runs in fp32:
    softmax over small logit differences and the balancing statistics lose too much in bf16."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, d_model))  # [E, D]
        # Auxiliary-loss-free balancing (DeepSeek-V3): added to scores only when choosing experts.
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))

    def forward(self, x_TD: torch.Tensor) -> Routing:
        cfg = self.cfg
        T = x_TD.shape[0]
        logits_TE = self.logits(x_TD)
        scores_TE, probs_TE = self.scores(logits_TE)
        capacity = expert_capacity(T, cfg)
        if cfg.routing == "expert_choice":
            weight_EC, token_EC = scores_TE.t().topk(capacity, dim=-1)  # each expert takes its top-C tokens
            plan = plan_expert_choice(token_EC, weight_EC * cfg.route_scale, T)
            return Routing(plan, logits_TE, probs_TE, slots_per_expert_E=plan.tokens_per_expert_E)
        expert_TK, weight_TK = self.choose(logits_TE, scores_TE)
        slots_E = count_per_expert(expert_TK.reshape(-1), cfg.num_experts)
        plan = plan_token_choice(expert_TK, weight_TK, cfg.num_experts, capacity)
        return Routing(plan, logits_TE, probs_TE, slots_per_expert_E=slots_E)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """[T, E] fp32 router logits (with the training jitter on the input)."""
        x32_TD = x_TD.float()
        if self.training and self.cfg.jitter > 0:
            x32_TD = x32_TD * torch.empty_like(x32_TD).uniform_(1.0 - self.cfg.jitter, 1.0 + self.cfg.jitter)
        if torch.is_autocast_enabled(x_TD.device.type):
            with torch.autocast(device_type=x_TD.device.type, enabled=False):
                return F.linear(x32_TD, self.weight.float())
        # NOTE: skipping the context manager matters at decode, where the layer is overhead-bound
        return F.linear(x32_TD, self.weight.float())

    def scores(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores_TE, probs_TE): the routing scores (softmax or sigmoid of the logits) and the
        per-token distribution over experts the balancing statistics use (the scores normalised)."""
        if self.cfg.scoring == "softmax":
            scores_TE = torch.softmax(logits_TE, dim=-1)
            return scores_TE, scores_TE
        scores_TE = torch.sigmoid(logits_TE)
        return scores_TE, scores_TE / scores_TE.sum(-1, keepdim=True)

    def choose(self, logits_TE: torch.Tensor, scores_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token choice: (expert_TK, weight_TK), each token's top-k experts and their weights."""
        cfg = self.cfg
        # NOTE: without a bias, selection is on the logits: softmax and sigmoid are monotone, so
        # the order is the scores' order, but saturated scores tie (sigmoid rounds to 1.0 above
        # a logit of about 17) where the logits do not, and every path (grouped, few-token, the
        # moe_decode kernel) then picks the same experts.
        select_TE = logits_TE
        if cfg.bias_update_rate > 0:
            # NOTE: with softmax the bias goes on the logits (log-probabilities up to a per-token
            # constant): added to probabilities it would only reorder the many near-zero experts,
            # which makes the load oscillate. With sigmoid it goes on the scores (DeepSeek-V3).
            select_TE = (logits_TE if cfg.scoring == "softmax" else scores_TE) + self.expert_bias
        expert_TK = select_TE.topk(cfg.top_k, dim=-1).indices
        weight_TK = scores_TE.gather(1, expert_TK)
        if cfg.renormalize:  # renormalise and scale in one multiply
            weight_TK = weight_TK * (cfg.route_scale / weight_TK.sum(-1, keepdim=True).clamp_min(1e-20))
        elif cfg.route_scale != 1.0:
            weight_TK = weight_TK * cfg.route_scale
        return expert_TK, weight_TK


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked tensors in Hugging Face v5's fused layout:
    gate_up_proj [E, 2I, D] (gate rows first) and down_proj [E, D, I].

    matmul: the dispatch implementation (moelab.model.dispatch.experts_swiglu): "auto" (chunked
    on the CPU, the grouped kernel over all slots elsewhere, padded bmm where no grouped kernel
    runs), "chunked", "grouped_mm" or "padded"."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, matmul: str = "auto"):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.matmul = matmul

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        return experts_swiglu(x_TD, plan, self.gate_up_proj, self.down_proj, self.matmul)


_STAT_NAMES = ("forwards", "tokens", "slots", "dropped", "entropy_sum", "z_loss_sum", "max_logit")


class MoE(nn.Module):
    """Routed experts plus optional shared experts; forward returns (output, auxiliary loss).

    This is the layer training sees. Serving swaps it for moelab.infer.moe_layer.InferenceMoE, which
    shares its weights and adds the few-token decode paths and the moe_decode kernel."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(d_model, cfg)
        self.experts = Experts(cfg.num_experts, d_model, cfg.expert_hidden)
        self.shared = SwiGLU(d_model, cfg.shared_hidden_total) if cfg.num_shared_experts > 0 else None
        self.shared_gate = (
            nn.Linear(d_model, 1, bias=False) if (self.shared is not None and cfg.shared_expert_gate) else None
        )
        # NOTE (distributed): data / expert parallelism (moelab.distributed) sets this to a function
        # that sums the slot counts over every data-parallel rank, so that the balancing loss sees the
        # load of the global batch as one process would. None (the default): this process's batch.
        self.reduce_slot_counts: Callable[[torch.Tensor], torch.Tensor] | None = None
        # Multiplies the Switch-loss coefficient and the bias update rate; the trainer sets it every
        # step from the schedule (moelab.train.schedule.balance_scale).
        self.balance_scale = 1.0
        # Switch-loss load over the whole optimizer step (train.balance_scope = "step", Qwen's
        # global-batch balancing) instead of the micro-batch; the trainer sets it and calls
        # start_step before each optimizer step.
        self.balance_over_step = False
        E = cfg.num_experts
        # NOTE (activation checkpointing): False while the backward recomputes this layer's forward
        # (moelab.model.transformer sets it). The first forward already recorded the statistics, the
        # bias load and the step's balancing load; the replay adds zeros to them, and so builds its
        # Switch loss from the same step load (or its gradient would differ). A tensor, not a Python
        # flag, so that a compiled block replays the graph it ran forward: another graph saves
        # other tensors, which checkpointing refuses.
        self.register_buffer("recording", torch.ones((), dtype=torch.bool), persistent=False)
        # Training statistics since the last read (non-persistent: never saved with the weights).
        self.register_buffer("stat_tokens_per_expert", torch.zeros(E), persistent=False)
        self.register_buffer("stat_prob_sum", torch.zeros(E), persistent=False)
        self.register_buffer("stat_scalars", torch.zeros(len(_STAT_NAMES)), persistent=False)
        # Expert load since the last bias update (aux-loss-free balancing).
        self.register_buffer("load_since_update", torch.zeros(E), persistent=False)
        # The optimizer step so far (balance_over_step): slots per expert (over ranks), and the
        # router probabilities summed over this process's tokens, and their count.
        self.register_buffer("step_slots", torch.zeros(E), persistent=False)
        self.register_buffer("step_prob_sum", torch.zeros(E), persistent=False)
        self.register_buffer("step_tokens", torch.zeros(()), persistent=False)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output, auxiliary balancing loss); the loss is None outside training."""
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        routing = self.router(x_TD)
        y_TD = self.add_shared(self.experts(x_TD, routing.plan), x_TD)
        if not self.training:
            return y_TD.reshape(x_BSD.shape), None
        self._record(routing, x_TD.shape[0])
        return y_TD.reshape(x_BSD.shape), self._aux_loss(routing)

    def add_shared(self, routed_TD: torch.Tensor, x_TD: torch.Tensor) -> torch.Tensor:
        """The routed experts' output plus the shared experts' (gated when shared_expert_gate)."""
        if self.shared is None:
            return routed_TD
        shared_TD = self.shared(x_TD)
        if self.shared_gate is not None:
            shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
        return routed_TD + shared_TD

    def _aux_loss(self, routing: Routing) -> torch.Tensor:
        cfg = self.cfg
        loss = routing.logits_TE.new_zeros(())
        if cfg.aux_loss_coef > 0 and cfg.routing == "token_choice" and self.balance_scale > 0:
            # Switch Transformer: E * sum_e f_e * P_e, f_e = share of slots routed to e (no gradient),
            # P_e = mean router probability of e. Minimised (value 1) by uniform routing.
            slots_E = routing.slots_per_expert_E
            if self.reduce_slot_counts is not None:
                slots_E = self.reduce_slot_counts(slots_E)  # (distributed) load of the global batch
            if self.balance_over_step:
                # NOTE: the load of the step so far: micro-batch m is balanced against the slots of
                # micro-batches 1..m (the last one against the whole step's). An exact gradient would
                # need every micro-batch's load before the first backward; the value is exact
                # (step_balance_loss). A recomputation (activation checkpointing) runs inside this
                # micro-batch's backward, before the next forward, so it reads the same load.
                with torch.no_grad():
                    self.step_slots += self._recorded(slots_E)
                    self.step_prob_sum += self._recorded(routing.probs_TE.sum(0))
                    self.step_tokens += self._recorded(routing.probs_TE.new_full((), routing.probs_TE.shape[0]))
                slots_E = self.step_slots
            slot_share_E = slots_E.float() / slots_E.sum().clamp_min(1)
            mean_prob_E = routing.probs_TE.mean(0)
            coef = cfg.aux_loss_coef * self.balance_scale
            loss = loss + coef * cfg.num_experts * (slot_share_E * mean_prob_E).sum()
        if cfg.z_loss_coef > 0:
            # ST-MoE router z-loss: keeps logits small so softmax stays well conditioned.
            loss = loss + cfg.z_loss_coef * torch.logsumexp(routing.logits_TE, dim=-1).square().mean()
        return loss

    def start_step(self) -> None:
        """A new optimizer step: forget the step-level balancing load."""
        self.step_slots.zero_()
        self.step_prob_sum.zero_()
        self.step_tokens.zero_()

    @torch.no_grad()
    def step_balance_loss(self) -> float:
        """The Switch loss of the optimizer step so far (balance_over_step), as one forward over all
        its micro-batches would compute it: E * sum_e f_e * P_e with the step's slot shares f (over
        ranks) and this process's mean router probabilities P (the mean over ranks of this value is
        the global one), times the coefficient and balance_scale."""
        cfg = self.cfg
        share_E = self.step_slots / self.step_slots.sum().clamp_min(1)
        mean_prob_E = self.step_prob_sum / self.step_tokens.clamp_min(1)
        coef = cfg.aux_loss_coef * self.balance_scale
        return float(coef * cfg.num_experts * (share_E * mean_prob_E).sum())

    def _recorded(self, value: torch.Tensor) -> torch.Tensor:
        """`value`, or zeros during an activation-checkpointing replay (`recording` false)."""
        return torch.where(self.recording, value, torch.zeros_like(value))  # NOTE: not a product: 0 * inf is NaN

    @torch.no_grad()
    def _record(self, routing: Routing, num_tokens: int) -> None:
        kept_E = routing.plan.tokens_per_expert_E.float()
        self.stat_tokens_per_expert += self._recorded(kept_E)
        self.stat_prob_sum += self._recorded(routing.probs_TE.sum(0))
        self.load_since_update += self._recorded(routing.slots_per_expert_E.float())
        probs = routing.probs_TE
        entropy = -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1).sum()
        z = torch.logsumexp(routing.logits_TE, dim=-1).square().sum()
        routed = routing.slots_per_expert_E.sum().float()
        if self.cfg.routing == "expert_choice":
            routed = torch.tensor(float(num_tokens), device=kept_E.device)  # dropped counts tokens here
        update = torch.stack(
            [
                torch.ones((), device=kept_E.device),
                torch.tensor(float(num_tokens), device=kept_E.device),
                routed,
                routing.plan.dropped_slots.float(),
                entropy,
                z,
                torch.zeros((), device=kept_E.device),
            ]
        )
        self.stat_scalars += self._recorded(update)
        max_logit = routing.logits_TE.max()
        max_logit = torch.where(self.recording, max_logit, torch.full_like(max_logit, -math.inf))
        self.stat_scalars[6] = torch.maximum(self.stat_scalars[6], max_logit)

    def read_stats(self, reset: bool = True) -> dict[str, object]:
        """Router statistics accumulated by training forwards since the last reset.

        tokens_per_expert: slots each expert processed; dropped_frac: share of routed slots dropped
        by capacity (expert choice: share of tokens no expert took); entropy: mean per-token routing
        entropy (nats); z_loss: mean squared logsumexp of the logits; max_logit: largest logit seen.
        """
        s = dict(zip(_STAT_NAMES, self.stat_scalars.tolist()))
        tokens = max(s["tokens"], 1.0)
        stats = {
            "tokens_per_expert": self.stat_tokens_per_expert.tolist(),
            "mean_prob": (self.stat_prob_sum / tokens).tolist(),
            "tokens": s["tokens"],
            "dropped_frac": s["dropped"] / max(s["slots"], 1.0),
            "entropy": s["entropy_sum"] / tokens,
            "z_loss": s["z_loss_sum"] / tokens,
            "max_logit": s["max_logit"] if s["forwards"] > 0 else 0.0,
        }
        if reset:
            self.reset_stats()
        return stats

    def stats_state(self) -> list[torch.Tensor]:
        """The statistics accumulated since the last read, for a checkpoint taken inside a logging
        interval (moelab.train.checkpointer): copies, on the CPU."""
        return [t.detach().cpu().clone() for t in (self.stat_tokens_per_expert, self.stat_prob_sum, self.stat_scalars)]

    def load_stats_state(self, state: list[torch.Tensor]) -> None:
        for buffer, saved in zip((self.stat_tokens_per_expert, self.stat_prob_sum, self.stat_scalars), state):
            buffer.copy_(saved)

    def reset_stats(self) -> None:
        self.stat_tokens_per_expert.zero_()
        self.stat_prob_sum.zero_()
        self.stat_scalars.zero_()

    @torch.no_grad()
    def update_bias(self) -> None:
        """One aux-loss-free balancing step (DeepSeek-V3), called after each optimizer step:
        raise the bias of under-loaded experts and lower it for over-loaded ones by the update rate
        (times balance_scale)."""
        rate = self.cfg.bias_update_rate * self.balance_scale
        if rate > 0 and self.load_since_update.sum() > 0:
            load_E = self.load_since_update
            bias_E = self.router.expert_bias
            bias_E += rate * torch.sign(load_E.mean() - load_E)
            bias_E -= bias_E.mean()  # selection ignores a common shift; keep the bias from drifting
        self.load_since_update.zero_()
