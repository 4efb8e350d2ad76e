"""Parameter and FLOP accounting for any ModelConfig, dense or MoE, without building the model.

Conventions (used by every comparison in moelab):
- A multiply-add is 2 FLOPs. Only matrix multiplications are counted (norms, activations, softmax
  and the embedding lookup are left out: they are < 1% at these sizes and the same for dense and MoE).
- Forward FLOPs per token = 2 * (active matmul parameters) + attention scores and values, where a
  token at position p attends to p + 1 keys: 2 (QK) + 2 (AV) FLOPs per key and query-head dim.
  Training averages this over a sequence of seq_len tokens, i.e. (seq_len + 1) / 2 keys per token.
- Training FLOPs = 3 * forward (backward is two matmuls per forward matmul).
- Active parameters are those one token uses: everything except the routed experts it does not
  visit. Token choice visits k experts; expert choice visits k on average (capacity factor 1).
  The router is active. The embedding table counts as a parameter but not as matmul work; the LM
  head is matmul work whether or not it is tied to the embedding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moelab.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int  # every parameter
    active: int  # parameters one token uses
    embedding: int  # the token embedding table (and the LM head when untied)
    expert_total: int  # all routed-expert parameters
    expert_active: int  # routed-expert parameters one token uses

    @property
    def total_non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding

    def to_dict(self) -> dict[str, int]:
        d = asdict(self)
        d["total_non_embedding"] = self.total_non_embedding
        d["active_non_embedding"] = self.active_non_embedding
        return d


def _attention_params(cfg: ModelConfig) -> int:
    q = cfg.n_heads * cfg.resolved_head_dim
    kv = cfg.kv_heads * cfg.resolved_head_dim
    params = cfg.d_model * q + 2 * cfg.d_model * kv + q * cfg.d_model
    if cfg.qkv_bias:  # the optional q/k/v biases and q/k norm weights (Hugging Face interop options)
        params += q + 2 * kv
    if cfg.qk_norm == "head":
        params += 2 * cfg.resolved_head_dim
    elif cfg.qk_norm == "full":
        params += q + kv
    return params


def _swiglu_params(d_model: int, hidden: int) -> int:
    return 3 * d_model * hidden


def _layer_params(cfg: ModelConfig, layer: int) -> tuple[int, int, int, int]:
    """(total, active, expert_total, expert_active) parameters of one block."""
    common = _attention_params(cfg) + 2 * cfg.d_model  # two RMSNorm weights
    if not cfg.is_moe_layer(layer):
        ffn = _swiglu_params(cfg.d_model, cfg.ffn_hidden)
        return common + ffn, common + ffn, 0, 0
    moe = cfg.moe
    router = moe.num_experts * cfg.d_model
    one_expert = _swiglu_params(cfg.d_model, moe.expert_hidden)
    shared = _swiglu_params(cfg.d_model, moe.shared_hidden_total) if moe.num_shared_experts else 0
    shared_gate = cfg.d_model if (moe.num_shared_experts and moe.shared_expert_gate) else 0
    expert_total = moe.num_experts * one_expert
    expert_active = moe.top_k * one_expert
    base = common + router + shared + shared_gate
    return base + expert_total, base + expert_active, expert_total, expert_active


def vocab_size_of(cfg: ModelConfig, fallback: int) -> int:
    return cfg.vocab_size if cfg.vocab_size > 0 else fallback


def param_counts(cfg: ModelConfig, vocab_size: int | None = None) -> ParamCounts:
    V = vocab_size if vocab_size is not None else cfg.vocab_size
    embedding = V * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    total = active = embedding + cfg.d_model  # final norm
    expert_total = expert_active = 0
    for layer in range(cfg.n_layers):
        t, a, et, ea = _layer_params(cfg, layer)
        total += t
        active += a
        expert_total += et
        expert_active += ea
    return ParamCounts(total, active, embedding, expert_total, expert_active)


def matmul_params_per_token(cfg: ModelConfig, vocab_size: int | None = None) -> int:
    """Weights one token multiplies with: active parameters minus norms and the embedding lookup,
    plus the LM head (even when it shares the embedding's storage)."""
    V = vocab_size if vocab_size is not None else cfg.vocab_size
    n = V * cfg.d_model  # LM head
    for layer in range(cfg.n_layers):
        _, active, _, _ = _layer_params(cfg, layer)
        n += active - 2 * cfg.d_model
    return n


def attention_flops_per_token(cfg: ModelConfig, keys: float) -> float:
    """Score (QK) and weighted-sum (AV) FLOPs of one token attending to `keys` keys, all layers."""
    return 4.0 * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim * keys


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, vocab_size: int | None = None) -> float:
    """Mean forward FLOPs per token over a causal sequence of seq_len tokens."""
    return 2.0 * matmul_params_per_token(cfg, vocab_size) + attention_flops_per_token(cfg, (seq_len + 1) / 2)


def train_flops_per_token(cfg: ModelConfig, seq_len: int, vocab_size: int | None = None) -> float:
    return 3.0 * forward_flops_per_token(cfg, seq_len, vocab_size)


def inference_flops_per_token(cfg: ModelConfig, context: int, vocab_size: int | None = None) -> float:
    """FLOPs to generate one token with a KV cache holding `context` earlier tokens."""
    return 2.0 * matmul_params_per_token(cfg, vocab_size) + attention_flops_per_token(cfg, context + 1)


def memory_estimate_bytes(
    cfg: ModelConfig,
    batch_size: int,
    seq_len: int,
    vocab_size: int | None = None,
    param_bytes: int = 4,
) -> dict[str, int]:
    """Rough training memory: weights, AdamW state (2 fp32 per weight), gradients, and activations
    saved for backward (about 34 * D values per token per layer plus the logits)."""
    V = vocab_size if vocab_size is not None else cfg.vocab_size
    counts = param_counts(cfg, V)
    weights = counts.total * param_bytes
    grads = counts.total * 4
    optimizer = counts.total * 8
    tokens = batch_size * seq_len
    per_layer = 0
    for layer in range(cfg.n_layers):
        if cfg.is_moe_layer(layer):
            moe = cfg.moe
            ffn_act = moe.top_k * (3 * moe.expert_hidden + 2 * cfg.d_model) + 3 * moe.shared_hidden_total
        else:
            ffn_act = 3 * cfg.ffn_hidden
        per_layer += 12 * cfg.d_model + ffn_act  # SDPA keeps no T x T score matrix
    activations = tokens * (per_layer + 3 * V) * 4
    return {
        "weights": weights,
        "gradients": grads,
        "optimizer": optimizer,
        "activations": activations,
        "total": weights + grads + optimizer + activations,
    }
