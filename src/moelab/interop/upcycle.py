"""`moelab upcycle DENSE_RUN OUT_RUN --experts E --top-k k [--granularity G]`: sparse upcycling.

A dense model's SwiGLU FFN (hidden H) becomes E routed experts of hidden I = H / G. SwiGLU is a sum
over its hidden units, so the FFN is exactly the sum of G pieces (hidden units [g*I, (g+1)*I)):

    FFN(x) = sum_g down[:, piece g] (silu(gate[piece g] x) * up[piece g] x)

Expert e = r*G + g holds piece g; the E / G "replicas" r each hold one whole copy of the FFN.
The router starts so that tokens choose whole replicas: the router rows of one replica's G experts
are equal (one random row per replica), so their logits tie and top-k (k a multiple of G) takes all
G pieces of the best k/G replicas. With renormalised weights (each piece of m chosen replicas gets
p_r / (G * sum p)) and route_scale = G, the MoE output is sum_r p_r / sum p * FFN(x) = FFN(x): the
upcycled model starts equal to the dense one (G = 1 is classic upcycling: every expert a copy).

Attention, norms and embeddings are copied. The new run gets a weights-only checkpoint (see
moelab.interop.runs); `moelab train --out OUT_RUN --resume` trains it from step 0.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from moelab.config import MoEConfig, RunConfig, apply_overrides, build_config
from moelab.errors import ConfigError, MoelabError
from moelab.interop.runs import check_new_run_dir, write_fresh_run
from moelab.model import Transformer
from moelab.rundir import load_model

PROBE_TOKENS = 32  # tokens of the check that the upcycled model starts equal to the dense one


@dataclass
class UpcycleResult:
    run_dir: Path
    experts: int
    top_k: int
    granularity: int
    expert_hidden: int
    max_logit_diff: float  # |upcycled - dense| logits on a probe sequence at step 0


def upcycled_config(
    dense: RunConfig, experts: int, top_k: int, granularity: int = 1, overrides: list[str] | None = None
) -> RunConfig:
    """The dense run's config with an MoE FFN in every layer (model.moe.every / first_dense may be
    overridden, as may any train.*, monitor.* or model.moe.* setting)."""
    if dense.model.moe is not None:
        raise MoelabError("the run is already a mixture of experts; upcycling starts from a dense run")
    H = dense.model.ffn_hidden
    G = granularity
    if G < 1 or H % G:
        raise MoelabError(
            f"--granularity {G} is not allowed: a divisor of the dense FFN's hidden size {H} (experts of hidden {H} / G)"
        )
    if experts < 1 or experts % G:
        raise MoelabError(
            f"--experts {experts} is not allowed: a positive multiple of --granularity {G} (each copy of the FFN is split into G experts)"
        )
    if top_k < 1 or top_k % G or top_k > experts:
        raise MoelabError(
            f"--top-k {top_k} is not allowed: a multiple of --granularity {G}, at most --experts {experts} "
            "(a token must take whole copies of the FFN for the upcycled model to start equal to the dense one)"
        )
    for text in overrides or []:
        key = text.split("=", 1)[0].strip()
        if not key.startswith(("model.moe.", "train.", "monitor.")):
            raise MoelabError(
                f"--set {text} cannot change an upcycled model: only model.moe.*, train.* and monitor.* settings may change"
            )
    moe = MoEConfig(num_experts=experts, top_k=top_k, expert_hidden=H // G, route_scale=float(G), renormalize=True)
    data = dense.to_dict()
    data["model"]["moe"] = {k: v for k, v in dataclasses.asdict(moe).items() if v is not None}
    try:
        return build_config(apply_overrides(data, overrides or []))
    except ConfigError as exc:
        raise MoelabError(f"the upcycled config is not valid: {exc}") from None


@torch.no_grad()
def upcycle_weights(dense: Transformer, sparse: Transformer, granularity: int, seed: int = 0) -> None:
    """Fill `sparse` (an MoE twin of `dense`) from `dense` as the module docstring describes."""
    dense_state = dense.state_dict()
    for name, tensor in sparse.state_dict().items():
        if name in dense_state and dense_state[name].shape == tensor.shape:
            tensor.copy_(dense_state[name])  # attention, norms, embeddings, dense layers kept dense
    G = granularity
    generator = torch.Generator().manual_seed(seed)
    for i, block in enumerate(sparse.blocks):
        if not block.is_moe:
            continue
        ffn = dense.blocks[i].ffn
        moe = block.ffn
        H, I, E = ffn.hidden, moe.cfg.expert_hidden, moe.cfg.num_experts
        gate_HD, up_HD = ffn.gate_up_proj.weight[:H], ffn.gate_up_proj.weight[H:]
        down_DH = ffn.down_proj.weight
        for e in range(E):
            piece = slice((e % G) * I, (e % G + 1) * I)
            moe.experts.gate_up_proj[e].copy_(torch.cat([gate_HD[piece], up_HD[piece]]))
            moe.experts.down_proj[e].copy_(down_DH[:, piece])
        std = moe.cfg.router_init_std if moe.cfg.router_init_std is not None else sparse.cfg.init_std
        rows_RD = torch.randn(E // G, moe.router.weight.shape[1], generator=generator) * std
        moe.router.weight.copy_(rows_RD.repeat_interleave(G, dim=0))  # expert r*G + g gets row r
        moe.router.expert_bias.zero_()


@torch.no_grad()
def max_logit_diff(a: Transformer, b: Transformer, tokens: int = PROBE_TOKENS, seed: int = 0) -> float:
    """Largest |logit difference| of two models on one random sequence (eval mode)."""
    T = min(tokens, a.cfg.max_seq_len)
    ids = torch.randint(0, a.cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(seed))
    was = a.training, b.training
    a.eval(), b.eval()
    diff = float((a(ids).logits - b(ids).logits).abs().max())
    a.train(was[0]), b.train(was[1])
    return diff


def upcycle(
    dense_run: str | Path,
    out: str | Path,
    experts: int,
    top_k: int,
    granularity: int = 1,
    overrides: list[str] | None = None,
) -> UpcycleResult:
    """Upcycle a dense run (its newest checkpoint) or checkpoint into the new MoE run `out`."""
    check_new_run_dir(out)
    loaded = load_model(dense_run)
    cfg = upcycled_config(loaded.cfg, experts, top_k, granularity, overrides)
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    upcycle_weights(loaded.model, model, granularity, cfg.train.seed)
    diff = max_logit_diff(loaded.model, model)
    tokenizer_files = {"tokenizer.json": loaded.run.tokenizer_path}
    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json"):
        if (loaded.run.path / name).is_file():  # a dense model imported from Hugging Face
            tokenizer_files[name] = loaded.run.path / name
    data_meta = json.loads(loaded.run.data_path.read_text()) if loaded.run.data_path.is_file() else {}
    data_meta.pop("origin", None)
    source = f"upcycle: {loaded.checkpoint.resolve()} (step {loaded.step}), E={experts} k={top_k} G={granularity}"
    run = write_fresh_run(out, cfg, model, tokenizer_files, source, data_meta)
    return UpcycleResult(run.path, experts, top_k, granularity, cfg.model.moe.expert_hidden, diff)
