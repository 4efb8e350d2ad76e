"""Decoder-only transformer: RMSNorm, rotary attention (grouped-query, SDPA), dense or MoE FFN, KV cache.

Shape legend: B batch, T new tokens, L cached length, D model width, H query heads, G key/value heads,
Dh head dim, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moelab.config import ModelConfig
from moelab.model.mlp import SwiGLU
from moelab.model.moe import MoE


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # [B, T, V]
    aux_loss: torch.Tensor  # [] sum of the MoE layers' balancing losses (0 in eval mode)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # NOTE: the mean of squares in fp32, as bf16 loses the small terms
        x32 = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_len, Dh] for the rotate-half convention (the one Hugging Face uses)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x_BHTDh: torch.Tensor, cos_BTDh: torch.Tensor, sin_BTDh: torch.Tensor) -> torch.Tensor:
    half = x_BHTDh.shape[-1] // 2
    rotated = torch.cat([-x_BHTDh[..., half:], x_BHTDh[..., :half]], dim=-1)
    cos, sin = cos_BTDh[:, None].to(x_BHTDh.dtype), sin_BTDh[:, None].to(x_BHTDh.dtype)
    return x_BHTDh * cos + rotated * sin


class KVCache:
    """Keys and values of `batch` sequences (rows), up to `max_len` positions each.

    The model writes the keys of token (row r, position p) at [layer, r, :, p]; a row's positions
    are its tokens' indices in that sequence, so rows of different lengths share one cache.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device | str, dtype: torch.dtype):
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds model.max_seq_len {cfg.max_seq_len}")
        shape = (cfg.n_layers, batch, cfg.kv_heads, max_len, cfg.resolved_head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = cfg.resolved_head_dim
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        # Optional q/k RMSNorm before rotary (off by default; Hugging Face interop): "head" normalises
        # each head with one [Dh] weight shared by all heads (Qwen3-MoE), "full" the whole projection
        # with one [H*Dh] / [G*Dh] weight (OLMoE).
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":
            full = cfg.qk_norm == "full"
            self.q_norm = RMSNorm(self.n_heads * self.head_dim if full else self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.n_kv_heads * self.head_dim if full else self.head_dim, cfg.norm_eps)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_BTDh: torch.Tensor,
        sin_BTDh: torch.Tensor,
        positions_BT: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
        rows_B: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q, k = self.q_proj(x_BTD), self.k_proj(x_BTD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos_BTDh, sin_BTDh)
        k = apply_rotary(k, cos_BTDh, sin_BTDh)
        gqa = self.n_kv_heads != self.n_heads
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = self._cached_attention(q, k, v, positions_BT, cache, layer, rows_B, gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    @staticmethod
    def _cached_attention(q, k, v, positions_BT, cache, layer, rows_B, gqa):
        B, T = positions_BT.shape
        k_cache, v_cache = cache.k[layer], cache.v[layer]  # [rows, G, Lmax, Dh]
        if rows_B is None:
            # NOTE: rows 0..B-1 (a serving engine keeps its live rows packed at the front): slicing
            # gives views, so reading the cached keys below copies nothing.
            k_cache, v_cache = k_cache[:B], v_cache[:B]
            row_index = torch.arange(B, device=positions_BT.device)[:, None].expand(B, T)
        else:
            row_index = rows_B[:, None].expand(B, T)
        k_cache[row_index, :, positions_BT] = k.transpose(1, 2).to(k_cache.dtype)  # [B, T, G, Dh]
        v_cache[row_index, :, positions_BT] = v.transpose(1, 2).to(v_cache.dtype)
        length = int(positions_BT.max()) + 1  # keys past every query's position are never visible
        if rows_B is None:
            keys, values = k_cache[:, :, :length], v_cache[:, :, :length]  # [B, G, L, Dh] views
        else:
            keys, values = k_cache[rows_B, :, :length], v_cache[rows_B, :, :length]  # gathered copies
        keys, values = keys.to(q.dtype), values.to(q.dtype)
        visible_BTL = torch.arange(length, device=q.device)[None, None, :] <= positions_BT[:, :, None]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible_BTL[:, None], enable_gqa=gqa)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        self.ffn: nn.Module = MoE(cfg.d_model, cfg.moe) if self.is_moe else SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x, cos, sin, positions, cache, layer, rows) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.attn(self.attn_norm(x), cos, sin, positions, cache, layer, rows)
        if self.is_moe:
            ffn_out, aux = self.ffn(self.ffn_norm(x))
            return x + ffn_out, aux
        return x + self.ffn(self.ffn_norm(x)), None


@contextmanager
def _replaying(block: Block) -> Iterator[None]:
    """While the backward recomputes `block` (activation checkpointing): its MoE layer records
    nothing, since the first forward already did (MoE.recording)."""
    block.ffn.recording.fill_(False)
    try:
        yield
    finally:
        block.ffn.recording.fill_(True)


def _checkpoint_contexts(block: Block) -> tuple[nullcontext, object]:
    """torch.utils.checkpoint's context_fn: nothing around the forward, `_replaying` around the
    recomputation."""
    return nullcontext(), (_replaying(block) if isinstance(block.ffn, MoE) else nullcontext())


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (it is taken from the tokenizer when a run starts)")
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rotary_tables(cfg.resolved_head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Training-time forms of the blocks, set by the trainer (train.activation_checkpointing,
        # train.compile); neither changes parameters, names or the state dict.
        self.activation_checkpointing = False
        self.blocks_compiled = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; projections into the residual stream scaled by
        1/sqrt(2 * n_layers) (GPT-2) so the residual variance does not grow with depth."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or ".attn_norm." in name or ".ffn_norm." in name:
                p.fill_(1.0)  # also the optional attn.q_norm / attn.k_norm
            elif name.endswith(".bias"):
                p.zero_()  # the optional q/k/v biases (model.qkv_bias)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                p.normal_(0.0, out_std)
            elif name.endswith("router.weight"):
                router_std = self.cfg.moe.router_init_std if self.cfg.moe is not None else None
                p.normal_(0.0, std if router_std is None else router_std)
            elif name.endswith("shared_gate.weight"):
                p.normal_(0.0, std)
            else:
                p.normal_(0.0, std)
        for moe in self.moe_layers():
            moe.router.expert_bias.zero_()

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def forward(
        self,
        tokens_BT: torch.Tensor,
        positions_BT: torch.Tensor | None = None,
        cache: KVCache | None = None,
        rows_B: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Logits for every position. With a cache, `positions_BT` (default: 0..T-1) says where each
        new token sits in its sequence and `rows_B` (default: 0..B-1) which cache row it uses."""
        B, T = tokens_BT.shape
        if positions_BT is None:
            if T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds model.max_seq_len {self.cfg.max_seq_len}")
            positions = torch.arange(T, device=tokens_BT.device)
            cos, sin = self.rope_cos[:T][None], self.rope_sin[:T][None]
            positions_BT = positions[None].expand(B, T) if cache is not None else None
        else:
            if int(positions_BT.max()) >= self.cfg.max_seq_len:
                raise ValueError(f"position {int(positions_BT.max())} exceeds model.max_seq_len {self.cfg.max_seq_len}")
            cos, sin = self.rope_cos[positions_BT], self.rope_sin[positions_BT]
        if cache is not None and rows_B is None and B > cache.batch:
            raise ValueError(f"batch of {B} rows exceeds the cache's {cache.batch} rows")
        x = self.embed(tokens_BT)
        aux_total = x.new_zeros((), dtype=torch.float32)
        # NOTE: compiled blocks serve training forwards only; evaluation and decoding (other shapes,
        # a cache) run eager rather than recompile for every new shape.
        eager = self.blocks_compiled and (cache is not None or not self.training)
        recompute = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        with torch.compiler.set_stance("force_eager") if eager else nullcontext():
            for i, block in enumerate(self.blocks):
                if recompute:
                    # Only the block's input is kept; its activations are recomputed in the backward.
                    x, aux = checkpoint(
                        block,
                        x,
                        cos,
                        sin,
                        positions_BT,
                        cache,
                        i,
                        rows_B,
                        use_reentrant=False,
                        context_fn=partial(_checkpoint_contexts, block),
                    )
                else:
                    x, aux = block(x, cos, sin, positions_BT, cache, i, rows_B)
                if aux is not None:
                    aux_total = aux_total + aux
        logits = self.lm_head(self.norm(x))
        return ModelOutput(logits=logits, aux_loss=aux_total)

    def compile_blocks(self, **options) -> None:
        """torch.compile every block, in place (`nn.Module.compile`: names and state dict unchanged),
        for training forwards (train.compile). Called where a model is built for training, never
        at import; the first forward compiles. The eager blocks stay the reference."""
        for block in self.blocks:
            block.compile(**options)
        self.blocks_compiled = True

    def router_stats(self, reset: bool = True) -> dict[int, dict[str, object]]:
        """Per-layer router statistics since the last reset, keyed by layer index."""
        return {i: b.ffn.read_stats(reset) for i, b in enumerate(self.blocks) if b.is_moe}

    def start_step(self, balance_over_step: bool) -> None:
        """Before each optimizer step: whether the Switch loss balances the whole step's load
        (train.balance_scope = "step") rather than each micro-batch's, and a fresh count of it."""
        for moe in self.moe_layers():
            moe.balance_over_step = balance_over_step
            moe.start_step()

    def step_balance_loss(self) -> float:
        """The step's Switch loss summed over MoE layers (balance_over_step)."""
        return sum(moe.step_balance_loss() for moe in self.moe_layers())

    def set_balance_scale(self, scale: float) -> None:
        """The factor on every MoE layer's Switch-loss coefficient and bias update rate."""
        for moe in self.moe_layers():
            moe.balance_scale = scale

    def update_router_biases(self) -> None:
        for moe in self.moe_layers():
            moe.update_bias()
