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
from moelab.kernels import moe_decode as native
from moelab.model.dispatch import (
    DispatchPlan,
    experts_swiglu,
    experts_swiglu_gathered,
    experts_swiglu_one_token,
    plan_expert_choice,
    plan_token_choice,
)
from moelab.model.mlp import SwiGLU


@dataclass
class Routing:
    """What the router decided for one forward pass."""

    plan: DispatchPlan | None  # None on the few-token decode path
    logits_TE: torch.Tensor  # [T, E] fp32 router logits
    probs_TE: (
        torch.Tensor | None
    )  # [T, E] fp32 per-token distribution over experts (sums to 1); None on the decode path
    slots_per_expert_E: torch.Tensor | None  # [E] slots routed to each expert before any dropping
    expert_TK: torch.Tensor | None = None  # [T, k] chosen experts (decode path only)
    weight_TK: torch.Tensor | None = None  # [T, k] their weights (decode path only)


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

    def forward(self, x_TD: torch.Tensor, need_plan: bool = True) -> Routing:
        """Route tokens. need_plan=False (token choice, no capacity) skips building the grouped
        dispatch plan and the load counts: the few-token decode path needs neither."""
        cfg = self.cfg
        logits_TE = self._logits(x_TD)
        T = x_TD.shape[0]
        capacity = expert_capacity(T, cfg)
        if (
            not need_plan
            and capacity is None
            and cfg.routing == "token_choice"
            and cfg.scoring == "softmax"
            and cfg.renormalize
        ):
            # NOTE: decoding skips the softmax over all E experts: softmax is monotone, so the top-k
            # logits are the top-k probabilities, and renormalising k probabilities is a softmax over
            # their k logits. Equal to the general path up to rounding.
            if cfg.bias_update_rate > 0:
                expert_TK = (logits_TE + self.expert_bias).topk(cfg.top_k, dim=-1).indices
                top_TK = logits_TE.gather(1, expert_TK)
            else:
                top_TK, expert_TK = logits_TE.topk(cfg.top_k, dim=-1)
            weight_TK = torch.softmax(top_TK, dim=-1)
            if cfg.route_scale != 1.0:
                weight_TK = weight_TK * cfg.route_scale
            return Routing(
                plan=None,
                logits_TE=logits_TE,
                probs_TE=None,
                slots_per_expert_E=None,
                expert_TK=expert_TK,
                weight_TK=weight_TK,
            )
        if cfg.scoring == "softmax":
            scores_TE = torch.softmax(logits_TE, dim=-1)
            probs_TE = scores_TE
        else:
            scores_TE = torch.sigmoid(logits_TE)
            probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        if cfg.routing == "expert_choice":
            weight_EC, token_EC = scores_TE.t().topk(capacity, dim=-1)  # each expert takes its top-C tokens
            plan = plan_expert_choice(token_EC, weight_EC * cfg.route_scale, T)
            slots = plan.tokens_per_expert_E
        else:
            # NOTE: without a bias, selection is on the logits: softmax and sigmoid are monotone, so
            # the order is the scores' order, but saturated scores tie (sigmoid rounds to 1.0 above
            # a logit of about 17) where the logits do not, and every path (grouped, few-token, the
            # fused kernel) then picks the same experts.
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
            if not need_plan and capacity is None:
                return Routing(
                    plan=None,
                    logits_TE=logits_TE,
                    probs_TE=probs_TE,
                    slots_per_expert_E=None,
                    expert_TK=expert_TK,
                    weight_TK=weight_TK,
                )
            slots = torch.bincount(expert_TK.reshape(-1), minlength=cfg.num_experts)
            plan = plan_token_choice(expert_TK, weight_TK, cfg.num_experts, capacity)
        return Routing(plan=plan, logits_TE=logits_TE, probs_TE=probs_TE, slots_per_expert_E=slots)

    def _logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """[T, E] fp32 router logits (with the training jitter on the input)."""
        x32_TD = x_TD.float()
        if self.training and self.cfg.jitter > 0:
            x32_TD = x32_TD * torch.empty_like(x32_TD).uniform_(1.0 - self.cfg.jitter, 1.0 + self.cfg.jitter)
        if torch.is_autocast_enabled(x_TD.device.type):
            with torch.autocast(device_type=x_TD.device.type, enabled=False):
                return F.linear(x32_TD, self.weight.float())
        # NOTE: skipping the context manager matters at decode, where the layer is overhead-bound
        return F.linear(x32_TD, self.weight.float())


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked tensors in Hugging Face v5's fused layout:
    gate_up_proj [E, 2I, D] (gate rows first) and down_proj [E, D, I]."""

    def __init__(self, num_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, hidden))

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan, impl: str = "auto") -> torch.Tensor:
        return experts_swiglu(x_TD, plan, self.gate_up_proj, self.down_proj, impl)


# CPU: eval forwards of more than one token gather the chosen experts' weights only while one
# expert holds at most this many weights (3 * I * D); larger experts take the grouped path.
_CPU_GATHER_MAX_NUMEL = 1 << 17


@dataclass(frozen=True)
class FusedBinding:
    """MoE._fused: the fused decode kernel bound to one layer's weights (None: the layer is not
    eligible), and what it was bound to, so that a forward can tell cheaply whether it still holds.

    links: (container, key, object) for the router's config (frozen, so its identity is its
    settings) and every step from the MoE module to each weight the kernel reads
    (MoE._modules["router"] is the router, router._parameters["weight"] its weight, ...); any
    config, module or parameter replaced since binding breaks a link (absent ones link to None).
    addresses: (weight, data_ptr) for each weight bound: `.to()` on a submodule, a `.data` swap,
    `share_memory_()` (which torch.multiprocessing applies to every tensor it sends) or a storage
    resize move a weight's memory without replacing any object, and the kernel must never read
    the old, freed memory."""

    links: tuple[tuple[dict, str, object], ...]
    addresses: tuple[tuple[torch.Tensor, int], ...]
    kernel: native.FusedMoEDecode | None

    def holds(self) -> bool:
        for (
            container,
            key,
            obj,
        ) in self.links:  # NOTE: plain loops; all() over a generator cost a visible share of the decode step
            if container.get(key) is not obj:
                return False
        for tensor, address in self.addresses:
            if tensor.data_ptr() != address:
                return False
        return True


def _any_autocast() -> bool:
    # NOTE: one flag for every device, cheaper than torch.is_autocast_enabled("cpu"); falls back
    # to the public call where a torch build lacks the private one.
    is_any = getattr(torch._C, "_is_any_autocast_enabled", None)
    return is_any() if is_any is not None else torch.is_autocast_enabled("cpu")


def fused_decode_context(x: torch.Tensor, training: bool) -> bool:
    """Whether the conditions of the fused CPU decode kernel that hold for a whole forward pass are
    met: eval mode, autograd and autocast off, fp32 activations on the CPU. A Transformer checks them
    once per forward and passes the answer to every MoE layer (MoE.forward's `fused_ok`)."""
    return (
        not training and x.is_cpu and x.dtype is torch.float32 and not torch.is_grad_enabled() and not _any_autocast()
    )


_STAT_NAMES = ("forwards", "tokens", "slots", "dropped", "entropy_sum", "z_loss_sum", "max_logit")


class MoE(nn.Module):
    """Routed experts plus optional shared experts; forward returns (output, auxiliary loss)."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(d_model, cfg)
        self.experts = Experts(cfg.num_experts, d_model, cfg.expert_hidden)
        self.shared = SwiGLU(d_model, cfg.shared_hidden_total) if cfg.num_shared_experts > 0 else None
        self.shared_gate = (
            nn.Linear(d_model, 1, bias=False) if (self.shared is not None and cfg.shared_expert_gate) else None
        )
        self.impl = "auto"  # grouped matmul implementation; tests switch it
        self.native = True  # few-token CPU forwards may use the fused C kernel (moelab.kernels); tests switch it
        self._fused: FusedBinding | None = None  # the fused decode kernel bound to this layer's weights
        # Eval forwards routing at most this many token-slots take a few-token path (_expert_path).
        # NOTE: gathering copies one weight set per slot while the grouped path visits every expert,
        # so the break-even grows with E (measured: docs/architecture.md, Measured choices).
        self.decode_slots = max(16, 3 * cfg.num_experts // 2)
        # Eval forwards of at most this many tokens may take the fused C kernel (_fused_forward).
        # NOTE: it groups slots by expert but multiplies with plain vector code on one thread, so
        # at larger T the grouped path's oneDNN GEMMs win (measured: docs/architecture.md, Measured choices).
        self.native_max_tokens = 128
        self.expert_numel = 3 * cfg.expert_hidden * d_model  # weights of one routed expert
        # NOTE (distributed): data / expert parallelism (moelab.distributed) sets this to a function
        # that sums the slot counts over every data-parallel rank, so that the balancing loss sees the
        # load of the global batch as one process would. None (the default): this process's batch.
        self.reduce_slot_counts: Callable[[torch.Tensor], torch.Tensor] | None = None
        E = cfg.num_experts
        # Training statistics since the last read (non-persistent: never saved with the weights).
        self.register_buffer("stat_tokens_per_expert", torch.zeros(E), persistent=False)
        self.register_buffer("stat_prob_sum", torch.zeros(E), persistent=False)
        self.register_buffer("stat_scalars", torch.zeros(len(_STAT_NAMES)), persistent=False)
        # Expert load since the last bias update (aux-loss-free balancing).
        self.register_buffer("load_since_update", torch.zeros(E), persistent=False)

    def forward(self, x_BSD: torch.Tensor, fused_ok: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output, auxiliary balancing loss); the loss is None outside training.

        fused_ok: what `fused_decode_context` says for this forward, when the caller has checked it
        (the Transformer does, once for all its layers); None: checked here."""
        if fused_ok is None:
            fused_ok = fused_decode_context(x_BSD, self.training)
        if fused_ok and self.native:
            y = self._fused_forward(x_BSD)
            if y is not None:
                return y, None
        shape = x_BSD.shape
        x_TD = x_BSD.reshape(-1, shape[-1])
        path = self._expert_path(x_TD)
        routing = self.router(x_TD, need_plan=path == "grouped")
        experts = self.experts
        if path == "one_token":
            y_TD = experts_swiglu_one_token(
                x_TD, routing.expert_TK, routing.weight_TK, experts.gate_up_proj, experts.down_proj
            )
        elif path == "gathered":
            y_TD = experts_swiglu_gathered(
                x_TD, routing.expert_TK, routing.weight_TK, experts.gate_up_proj, experts.down_proj
            )
        else:
            y_TD = experts(x_TD, routing.plan, self.impl)
        if self.shared is not None:
            shared_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD
        if not self.training:
            return y_TD.reshape(shape), None
        self._record(routing, x_TD.shape[0])
        return y_TD.reshape(shape), self._aux_loss(routing)

    def _expert_path(self, x_TD: torch.Tensor) -> str:
        """How this forward runs the routed experts: "grouped" (training, prefill, and whatever the
        few-token paths do not cover), "gathered" or "one_token"."""
        T = x_TD.shape[0]
        # NOTE: decoding routes a handful of tokens; grouping them by expert (sort, counts, grouped
        # matmul over every expert, scatter) then costs more than the expert maths itself.
        if (
            self.training
            or T * self.cfg.top_k > self.decode_slots
            or self.cfg.routing != "token_choice"
            or self.cfg.capacity_factor is not None  # capacity drops slots: the grouped plan does that
            or type(self.experts) is not Experts  # a distributed replacement does its own dispatch
        ):
            return "grouped"
        if x_TD.device.type != "cpu":
            return "gathered"
        if T == 1 and not torch.is_grad_enabled():
            return "one_token"
        # NOTE (CPU): gathering copies the chosen experts' weights; for large experts the copy costs
        # more than visiting every group of the grouped path (measured: docs/architecture.md, Measured choices).
        return "gathered" if self.expert_numel <= _CPU_GATHER_MAX_NUMEL else "grouped"

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The whole layer in the fused C kernel (moelab.kernels.moe_decode) when this forward may
        take it, else None. The caller has checked `native` and `fused_decode_context`. Here: at
        most native_max_tokens fp32 contiguous CPU tokens of width D (eval mode and the tensor
        again: a caller's fused_ok is not trusted with memory), large experts only on one thread;
        at binding, token choice without capacity, the stock Experts, fp32 contiguous CPU weights
        and a compiled kernel.

        NOTE: at decode the PyTorch layer is bound by per-op overhead (about 20 small ops per layer
        against 5 for the dense FFN of the same active width); the kernel does the same arithmetic
        in one call. What runs here on every decode step is measured in percent of the step: after
        the kernel has streamed the expert weights through the caches, every Python object and
        torch call touched is a cache miss. Hence the kept binding, checked by identity and
        address (`FusedBinding.holds`), not rebuilt."""
        n, D = x.numel(), x.shape[-1]
        if (
            self.training
            or not x.is_cpu
            or x.dtype is not torch.float32
            or n > self.native_max_tokens * D
            or not x.is_contiguous()
        ):  # the kernel reads x as fp32 [T, D] in CPU memory, whatever a caller's fused_ok said
            return None
        if self.expert_numel > _CPU_GATHER_MAX_NUMEL and torch.get_num_threads() > 1:
            # NOTE: the kernel runs on one thread. Large experts are bandwidth-bound and PyTorch
            # splits their products over its threads; small experts gain nothing from threads
            # (measured: docs/architecture.md, Measured choices).
            return None
        binding = self._fused
        if binding is None or not binding.holds():
            binding = self._fused = self._bind_fused()
        kernel = binding.kernel
        if kernel is None or kernel.d_model != D:
            return None
        return kernel.run(x, n)

    def _bind_fused(self) -> FusedBinding:
        """Bind the kernel to this layer's current weights (kernel None when it cannot read them).

        NOTE: the weights are read through _modules / _parameters, the links FusedBinding.holds
        walks (an absent shared expert or gate is a plain None attribute, not in _modules)."""
        modules = self._modules
        experts = modules["experts"]
        links: list[tuple[dict, str, object]] = [(modules, "experts", experts)]

        def link(container: dict, key: str) -> object:
            obj = container.get(key)
            links.append((container, key, obj))
            return obj

        router = link(modules, "router")
        if type(experts) is not Experts or not isinstance(
            router, Router
        ):  # a distributed replacement dispatches itself
            return FusedBinding(links=tuple(links), addresses=(), kernel=None)
        cfg = link(router.__dict__, "cfg")  # the settings the router routes with
        shared, shared_gate = link(modules, "shared"), link(modules, "shared_gate")
        weights = [
            link(router._parameters, "weight"),
            link(router._buffers, "expert_bias") if cfg.bias_update_rate > 0 else None,  # as Router.forward selects
            link(experts._parameters, "gate_up_proj"),
            link(experts._parameters, "down_proj"),
            None if shared is None else link(link(shared._modules, "gate_up_proj")._parameters, "weight"),
            None if shared is None else link(link(shared._modules, "down_proj")._parameters, "weight"),
            None if shared_gate is None else link(shared_gate._parameters, "weight"),
        ]
        required = (weights[0], weights[2], weights[3]) + ((weights[4], weights[5]) if shared is not None else ())
        addresses = tuple((w, w.data_ptr()) for w in weights if w is not None)
        kernel = None
        if (
            cfg.routing == "token_choice"
            and cfg.capacity_factor is None
            and all(w is not None for w in required)
            and native.available()
            and native.usable(*weights)
        ):
            kernel = native.bind(
                *weights, top_k=cfg.top_k, scoring=cfg.scoring, renormalize=cfg.renormalize, route_scale=cfg.route_scale
            )
        return FusedBinding(links=tuple(links), addresses=addresses, kernel=kernel)

    def __getstate__(self):
        state = super().__getstate__()
        state["_fused"] = None  # a copy (deepcopy, pickle) binds its own weights; ctypes objects do not copy
        return state

    def _aux_loss(self, routing: Routing) -> torch.Tensor:
        cfg = self.cfg
        loss = routing.logits_TE.new_zeros(())
        if cfg.aux_loss_coef > 0 and cfg.routing == "token_choice":
            # Switch Transformer: E * sum_e f_e * P_e, f_e = share of slots routed to e (no gradient),
            # P_e = mean router probability of e. Minimised (value 1) by uniform routing.
            slots_E = routing.slots_per_expert_E
            if self.reduce_slot_counts is not None:
                slots_E = self.reduce_slot_counts(slots_E)  # (distributed) load of the global batch
            slot_share_E = slots_E.float() / slots_E.sum().clamp_min(1)
            mean_prob_E = routing.probs_TE.mean(0)
            loss = loss + cfg.aux_loss_coef * cfg.num_experts * (slot_share_E * mean_prob_E).sum()
        if cfg.z_loss_coef > 0:
            # ST-MoE router z-loss: keeps logits small so softmax stays well conditioned.
            loss = loss + cfg.z_loss_coef * torch.logsumexp(routing.logits_TE, dim=-1).square().mean()
        return loss

    @torch.no_grad()
    def _record(self, routing: Routing, num_tokens: int) -> None:
        kept_E = routing.plan.tokens_per_expert_E.float()
        self.stat_tokens_per_expert += kept_E
        self.stat_prob_sum += routing.probs_TE.sum(0)
        self.load_since_update += routing.slots_per_expert_E.float()
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
        self.stat_scalars += update
        self.stat_scalars[6] = torch.maximum(self.stat_scalars[6], routing.logits_TE.max())

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

    def reset_stats(self) -> None:
        self.stat_tokens_per_expert.zero_()
        self.stat_prob_sum.zero_()
        self.stat_scalars.zero_()

    @torch.no_grad()
    def update_bias(self) -> None:
        """One aux-loss-free balancing step (DeepSeek-V3), called after each optimizer step:
        raise the bias of under-loaded experts and lower it for over-loaded ones by the update rate."""
        rate = self.cfg.bias_update_rate
        if rate > 0 and self.load_since_update.sum() > 0:
            load_E = self.load_since_update
            bias_E = self.router.expert_bias
            bias_E += rate * torch.sign(load_E.mean() - load_E)
            bias_E -= bias_E.mean()  # selection ignores a common shift; keep the bias from drifting
        self.load_since_update.zero_()
