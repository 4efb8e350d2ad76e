"""Few-token expert paths for inference: routing and expert maths for a handful of tokens (decoding),
where grouping slots by expert (sort, counts, a grouped matmul over every expert, scatter) costs more
than the expert maths itself.

Shape legend: T tokens, k experts per token, E experts, S = T*k token-slots, D model width, I expert
hidden size. Every function here equals the training layer's grouped path (moelab.model.moe) up to
rounding; tests/infer/test_moe_layer.py checks each against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelab.model.mlp import swiglu_product
from moelab.model.moe import Router


def route_few_tokens(router: Router, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token choice without capacity: (expert_TK, weight_TK) as `Router.forward` chooses them, with
    no dispatch plan and no load counts (decoding needs neither)."""
    cfg = router.cfg
    logits_TE = router.logits(x_TD)
    if cfg.scoring == "softmax" and cfg.renormalize:
        # NOTE: skips the softmax over all E experts: softmax is monotone, so the top-k logits are
        # the top-k probabilities, and renormalising k probabilities is a softmax over their k
        # logits. Equal to Router.choose up to rounding.
        if cfg.bias_update_rate > 0:
            expert_TK = (logits_TE + router.expert_bias).topk(cfg.top_k, dim=-1).indices
            top_TK = logits_TE.gather(1, expert_TK)
        else:
            top_TK, expert_TK = logits_TE.topk(cfg.top_k, dim=-1)
        weight_TK = torch.softmax(top_TK, dim=-1)
        return expert_TK, weight_TK * cfg.route_scale if cfg.route_scale != 1.0 else weight_TK
    scores_TE, _ = router.scores(logits_TE)
    return router.choose(logits_TE, scores_TE)


def experts_swiglu_gathered(
    x_TD: torch.Tensor,
    expert_TK: torch.Tensor,
    weight_TK: torch.Tensor,
    gate_up_E2ID: torch.Tensor,
    down_EDI: torch.Tensor,
) -> torch.Tensor:
    """The same result as `experts_swiglu` for a few tokens (decoding): index the chosen experts'
    weights and run one batched matmul per projection. Only the k chosen experts per token are
    touched; unchosen experts cost nothing. Copies S = T*k weight sets, so it is for small S only."""
    T, k = expert_TK.shape
    D = x_TD.shape[1]
    dtype = out_dtype = x_TD.dtype
    if torch.is_autocast_enabled(x_TD.device.type):
        dtype = torch.get_autocast_dtype(x_TD.device.type)
    experts_S = expert_TK.reshape(-1)  # [S], slot s = token * k + choice
    # NOTE: weights are cast after the gather, so only the chosen experts are converted.
    # One matmul per token against its k experts' gate/up rows stacked ([k*2I, D]) instead of
    # one per slot: x is not replicated k times, and at one token it is a single matrix-vector product.
    gate_up_T_K2I_D = gate_up_E2ID.index_select(0, experts_S).to(dtype).view(T, -1, D)
    gate_up_S12I = torch.bmm(x_TD.to(dtype)[:, None, :], gate_up_T_K2I_D.transpose(1, 2)).view(T * k, 1, -1)
    gate_S1I, up_S1I = gate_up_S12I.chunk(2, dim=-1)
    hidden_S1I = swiglu_product(gate_S1I, up_S1I, weight_TK.reshape(-1, 1, 1).to(dtype))
    out_S1D = torch.bmm(hidden_S1I, down_EDI.index_select(0, experts_S).to(dtype).transpose(1, 2))
    # [T, D]: the k experts of each token summed in at least fp32, as the grouped path accumulates
    acc_dtype = torch.promote_types(out_S1D.dtype, torch.float32)
    return out_S1D.view(T, k, D).to(acc_dtype).sum(1).to(out_dtype)


def experts_swiglu_one_token(
    x_1D: torch.Tensor,
    expert_1K: torch.Tensor,
    weight_1K: torch.Tensor,
    gate_up_E2ID: torch.Tensor,
    down_EDI: torch.Tensor,
) -> torch.Tensor:
    """The same result as `experts_swiglu` for one token on the CPU with autograd off (batch-1
    decoding): the k chosen experts' weights are read where they lie, one matrix-vector product
    per projection, and the k outputs accumulate in fp32.

    NOTE: a loop over the k chosen experts, never over all E. Gathering their weights first
    (`experts_swiglu_gathered`) writes and re-reads a copy of them, which at large experts costs more
    than the matmuls (measured: docs/architecture.md, Measured choices). The expert ids and weights come to the host with `.tolist()`:
    free on the CPU, a device sync on accelerators (hence CPU only), and no gradient (hence
    inference only)."""
    out_dtype = dtype = x_1D.dtype
    if torch.is_autocast_enabled(x_1D.device.type):
        dtype = torch.get_autocast_dtype(x_1D.device.type)
        x_1D = x_1D.to(dtype)
    acc_dtype = torch.promote_types(dtype, torch.float32)  # as the grouped path accumulates
    out_1D = None
    for e, w in zip(expert_1K[0].tolist(), weight_1K[0].tolist()):
        gate_1I, up_1I = F.linear(x_1D, gate_up_E2ID[e].to(dtype)).chunk(2, dim=-1)
        hidden_1I = swiglu_product(gate_1I, up_1I).mul_(w)
        down_DI = down_EDI[e].to(dtype)
        if out_1D is None:
            out_1D = F.linear(hidden_1I, down_DI).to(acc_dtype)  # no copy when already acc_dtype
        elif dtype == acc_dtype:
            out_1D.addmm_(hidden_1I, down_DI.t())
        else:
            out_1D += F.linear(hidden_1I, down_DI)
    return out_1D.to(out_dtype)
