"""The MoE layer as serving runs it, and the step that puts it in place.

`prepare_for_inference(model)` swaps every MoE layer of a Transformer for an `InferenceMoE` that
shares its weights (the same parameter objects under the same names, so the state dict, export and
checkpoints are unchanged) and adds what only inference needs, chosen per forward:

1. the moe_decode kernel (moelab.kernels.moe_decode): the whole layer in one native call for a few
   fp32 tokens on the CPU with autograd and autocast off;
2. the few-token paths (moelab.infer.few_token): top-k routing without a dispatch plan, then the
   chosen experts' weights gathered or read in place;
3. otherwise the training layer's grouped path (prefill, evaluation, capacity, expert choice).

The generation engine and `moelab generate` take this step; the trainer never does (its end-of-run
sample decodes through the training layer). Expert parallelism swaps the experts module the same way
(moelab.distributed.expert_parallel); an InferenceMoE over such experts takes the grouped path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from moelab.infer.few_token import experts_swiglu_gathered, experts_swiglu_one_token, route_few_tokens
from moelab.kernels import moe_decode
from moelab.model.moe import Experts, MoE, Router

# Eval forwards of at most this many tokens may take the moe_decode kernel.
# NOTE: it groups slots by expert but multiplies with plain vector code on one thread, so at
# larger T the grouped path's oneDNN GEMMs win (measured: docs/architecture.md, Measured choices).
MOE_DECODE_MAX_TOKENS = 128

# CPU: eval forwards of more than one token gather the chosen experts' weights only while one
# expert holds at most this many weights (3 * I * D); larger experts take the grouped path.
GATHER_MAX_EXPERT_NUMEL = 1 << 17

M = TypeVar("M", bound=nn.Module)


def few_token_max_slots(num_experts: int) -> int:
    """Eval forwards routing at most this many token-slots (T * k) take a few-token path.

    NOTE: gathering copies one weight set per slot while the grouped path visits every expert, so
    the break-even grows with E (measured: docs/architecture.md, Measured choices)."""
    return max(16, 3 * num_experts // 2)


@dataclass(frozen=True)
class MoEDecodeBinding:
    """The moe_decode kernel bound to one layer's weights (kernel None: the layer is not eligible),
    and what it was bound to, so that a forward can tell cheaply whether it still holds.

    links: (container, key, object) for the router's config (frozen, so its identity is its
    settings) and every step from the layer to each weight the kernel reads
    (layer._modules["router"] is the router, router._parameters["weight"] its weight, ...); any
    config, module or parameter replaced since binding breaks a link (absent ones link to None).
    addresses: (weight, data_ptr) for each weight bound: `.to()` on a submodule, a `.data` swap,
    `share_memory_()` (which torch.multiprocessing applies to every tensor it sends) or a storage
    resize move a weight's memory without replacing any object, and the kernel must never read
    the old, freed memory."""

    links: tuple[tuple[dict, str, object], ...]
    addresses: tuple[tuple[torch.Tensor, int], ...]
    kernel: moe_decode.MoEDecodeKernel | None

    def holds(self) -> bool:
        # NOTE: plain loops; all() over a generator cost a visible share of the decode step
        for container, key, obj in self.links:
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


class InferenceMoE(MoE):
    """A trained MoE layer's weights with the inference paths (module docstring). Eval only: it
    keeps no routing statistics, so a training forward is refused."""

    def __init__(self, trained: MoE, use_moe_decode: bool = True):
        # NOTE: not MoE.__init__, which would allocate fresh weights: this layer adopts the trained
        # layer's modules, so both hold the same parameters under the same names.
        nn.Module.__init__(self)
        self.cfg = trained.cfg
        self.router = trained.router
        self.experts = trained.experts
        self.shared = trained.shared
        self.shared_gate = trained.shared_gate
        self.reduce_slot_counts = None
        self.use_moe_decode = use_moe_decode
        self.few_token_max_slots = few_token_max_slots(self.cfg.num_experts)
        self.expert_numel = self.experts.gate_up_proj[0].numel() * 3 // 2  # 3 * I * D weights per expert
        self._moe_decode: MoEDecodeBinding | None = None
        self.train(trained.training)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, None]:
        if self.training:
            raise RuntimeError("InferenceMoE is for evaluation: train the model before prepare_for_inference")
        if self.use_moe_decode and x_BSD.is_cpu and not torch.is_grad_enabled() and not _any_autocast():
            y_BSD = self._moe_decode_forward(x_BSD)
            if y_BSD is not None:
                return y_BSD, None
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        path = self._expert_path(x_TD)
        if path == "grouped":
            return super().forward(x_BSD)
        expert_TK, weight_TK = route_few_tokens(self.router, x_TD)
        few_token = experts_swiglu_one_token if path == "one_token" else experts_swiglu_gathered
        y_TD = few_token(x_TD, expert_TK, weight_TK, self.experts.gate_up_proj, self.experts.down_proj)
        return self.add_shared(y_TD, x_TD).reshape(x_BSD.shape), None

    def _expert_path(self, x_TD: torch.Tensor) -> str:
        """How this forward runs the routed experts: "grouped" (the training layer's path, for
        whatever the few-token paths do not cover), "gathered" or "one_token"."""
        T = x_TD.shape[0]
        if (
            T * self.cfg.top_k > self.few_token_max_slots
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
        return "gathered" if self.expert_numel <= GATHER_MAX_EXPERT_NUMEL else "grouped"

    def _moe_decode_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The whole layer in the moe_decode kernel when this forward may take it, else None. The
        caller has checked the CPU, autograd and autocast; here: at most MOE_DECODE_MAX_TOKENS fp32
        contiguous tokens of width D, large experts only on one thread; at binding, token choice
        without capacity, the stock Experts, fp32 contiguous CPU weights and a compiled kernel.

        NOTE: at decode the PyTorch layer is bound by per-op overhead (about 20 small ops per layer
        against 5 for the dense FFN of the same active width); the kernel does the same arithmetic
        in one call. What runs here on every decode step is measured in percent of the step: after
        the kernel has streamed the expert weights through the caches, every Python object and
        torch call touched is a cache miss. Hence the kept binding, checked by identity and
        address (`MoEDecodeBinding.holds`), not rebuilt."""
        n, D = x.numel(), x.shape[-1]
        if x.dtype is not torch.float32 or n > MOE_DECODE_MAX_TOKENS * D or not x.is_contiguous():
            return None
        if self.expert_numel > GATHER_MAX_EXPERT_NUMEL and torch.get_num_threads() > 1:
            # NOTE: the kernel runs on one thread. Large experts are bandwidth-bound and PyTorch
            # splits their products over its threads; small experts gain nothing from threads
            # (measured: docs/architecture.md, Measured choices).
            return None
        binding = self._moe_decode
        if binding is None or not binding.holds():
            binding = self._moe_decode = self._bind_moe_decode()
        kernel = binding.kernel
        if kernel is None or kernel.d_model != D:
            return None
        return kernel.run(x, n)

    def _bind_moe_decode(self) -> MoEDecodeBinding:
        """Bind the kernel to this layer's current weights (kernel None when it cannot read them).

        NOTE: the weights are read through _modules / _parameters, the links MoEDecodeBinding.holds
        walks (an absent shared expert or gate is a plain None attribute, not in _modules)."""
        modules = self._modules
        experts = modules["experts"]
        links: list[tuple[dict, str, object]] = [(modules, "experts", experts)]

        def link(container: dict, key: str) -> object:
            obj = container.get(key)
            links.append((container, key, obj))
            return obj

        router = link(modules, "router")
        if type(experts) is not Experts or not isinstance(router, Router):  # a replacement dispatches itself
            return MoEDecodeBinding(links=tuple(links), addresses=(), kernel=None)
        cfg = link(router.__dict__, "cfg")  # the settings the router routes with
        shared, shared_gate = link(modules, "shared"), link(modules, "shared_gate")
        weights = [
            link(router._parameters, "weight"),
            link(router._buffers, "expert_bias") if cfg.bias_update_rate > 0 else None,  # as Router.choose selects
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
            and moe_decode.available()
            and moe_decode.usable(*weights)
        ):
            kernel = moe_decode.bind(
                *weights, top_k=cfg.top_k, scoring=cfg.scoring, renormalize=cfg.renormalize, route_scale=cfg.route_scale
            )
        return MoEDecodeBinding(links=tuple(links), addresses=addresses, kernel=kernel)

    def __getstate__(self):
        state = super().__getstate__()
        state["_moe_decode"] = None  # a copy (deepcopy, pickle) binds its own weights; ctypes objects do not copy
        return state


def prepare_for_inference(model: M, use_moe_decode: bool = True) -> M:
    """Put the model in eval mode and swap each MoE layer in it (a Transformer, or any module that
    holds one) for an InferenceMoE over the same weights, in place; returns the model. Idempotent.
    use_moe_decode=False keeps the moe_decode kernel off (the PyTorch paths only; tests and
    benchmarks compare the two)."""
    model.eval()
    for parent in list(model.modules()):
        for name, layer in list(parent.named_children()):
            if isinstance(layer, InferenceMoE):
                layer.use_moe_decode = use_moe_decode
            elif isinstance(layer, MoE):
                setattr(parent, name, InferenceMoE(layer, use_moe_decode))
    return model
