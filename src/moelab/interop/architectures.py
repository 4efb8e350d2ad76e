"""The Hugging Face architectures moelab reads and writes, each with one key map and one config map.

| moelab model                                              | architecture (config.json model_type) |
| --------------------------------------------------------- | -------------------------------------- |
| dense                                                     | llama                                  |
| MoE, every layer, top-k renormalised, no shared expert   | mixtral                                |
| MoE with shared experts, dense layers, qkv bias, or no    | qwen2_moe                              |
|   renormalisation (softmax router, no q/k norm)           |                                        |
| MoE with per-head q/k norm (model.qk_norm = "head")       | qwen3_moe                              |
| MoE with whole-projection q/k norm (model.qk_norm="full") | olmoe                                  |

Every architecture routes with a softmax over all experts, then top-k, then optionally renormalises
the k weights: moelab's token-choice softmax router. What none of them has (expert-choice routing,
token dropping by capacity, sigmoid scoring, a selection bias in use) is refused, naming the setting.

Hugging Face checkpoints are read through the defaults of transformers' own config classes (5.x):
`DEFAULTS` lists the value each architecture assumes for a key that config.json leaves out (a test
checks them against the installed transformers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from moelab.config import ModelConfig, MoEConfig
from moelab.errors import ConfigError, MoelabError
from moelab.interop.keymap import ALL, GATE, UP, KeyMap

# ---------------------------------------------------------------------------------------------
# Key maps: (Hugging Face name, moelab name, part). See moelab.interop.keymap.

EMBEDDINGS: KeyMap = (
    ("model.embed_tokens.weight", "embed.weight", ALL),
    ("model.norm.weight", "norm.weight", ALL),
    ("lm_head.weight", "lm_head.weight", ALL),  # absent when tied to the embedding
)
ATTENTION: KeyMap = (
    ("model.layers.{L}.input_layernorm.weight", "blocks.{L}.attn_norm.weight", ALL),
    ("model.layers.{L}.self_attn.q_proj.weight", "blocks.{L}.attn.q_proj.weight", ALL),
    ("model.layers.{L}.self_attn.k_proj.weight", "blocks.{L}.attn.k_proj.weight", ALL),
    ("model.layers.{L}.self_attn.v_proj.weight", "blocks.{L}.attn.v_proj.weight", ALL),
    ("model.layers.{L}.self_attn.o_proj.weight", "blocks.{L}.attn.o_proj.weight", ALL),
    ("model.layers.{L}.post_attention_layernorm.weight", "blocks.{L}.ffn_norm.weight", ALL),
)
QKV_BIAS: KeyMap = (
    ("model.layers.{L}.self_attn.q_proj.bias", "blocks.{L}.attn.q_proj.bias", ALL),
    ("model.layers.{L}.self_attn.k_proj.bias", "blocks.{L}.attn.k_proj.bias", ALL),
    ("model.layers.{L}.self_attn.v_proj.bias", "blocks.{L}.attn.v_proj.bias", ALL),
)
QK_NORM: KeyMap = (
    ("model.layers.{L}.self_attn.q_norm.weight", "blocks.{L}.attn.q_norm.weight", ALL),
    ("model.layers.{L}.self_attn.k_norm.weight", "blocks.{L}.attn.k_norm.weight", ALL),
)
DENSE_MLP: KeyMap = (
    ("model.layers.{L}.mlp.gate_proj.weight", "blocks.{L}.ffn.gate_up_proj.weight", GATE),
    ("model.layers.{L}.mlp.up_proj.weight", "blocks.{L}.ffn.gate_up_proj.weight", UP),
    ("model.layers.{L}.mlp.down_proj.weight", "blocks.{L}.ffn.down_proj.weight", ALL),
)
MIXTRAL_MOE: KeyMap = (
    ("model.layers.{L}.block_sparse_moe.gate.weight", "blocks.{L}.ffn.router.weight", ALL),
    ("model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight", "blocks.{L}.ffn.experts.gate_up_proj", GATE),
    ("model.layers.{L}.block_sparse_moe.experts.{E}.w3.weight", "blocks.{L}.ffn.experts.gate_up_proj", UP),
    ("model.layers.{L}.block_sparse_moe.experts.{E}.w2.weight", "blocks.{L}.ffn.experts.down_proj", ALL),
)
QWEN_MOE: KeyMap = (  # also OLMoE's names
    ("model.layers.{L}.mlp.gate.weight", "blocks.{L}.ffn.router.weight", ALL),
    ("model.layers.{L}.mlp.experts.{E}.gate_proj.weight", "blocks.{L}.ffn.experts.gate_up_proj", GATE),
    ("model.layers.{L}.mlp.experts.{E}.up_proj.weight", "blocks.{L}.ffn.experts.gate_up_proj", UP),
    ("model.layers.{L}.mlp.experts.{E}.down_proj.weight", "blocks.{L}.ffn.experts.down_proj", ALL),
)
QWEN2_SHARED: KeyMap = (
    ("model.layers.{L}.mlp.shared_expert.gate_proj.weight", "blocks.{L}.ffn.shared.gate_up_proj.weight", GATE),
    ("model.layers.{L}.mlp.shared_expert.up_proj.weight", "blocks.{L}.ffn.shared.gate_up_proj.weight", UP),
    ("model.layers.{L}.mlp.shared_expert.down_proj.weight", "blocks.{L}.ffn.shared.down_proj.weight", ALL),
    ("model.layers.{L}.mlp.shared_expert_gate.weight", "blocks.{L}.ffn.shared_gate.weight", ALL),
)

# moelab tensors no Hugging Face architecture has: exported only when they have no effect, and
# zero after import. The selection bias is used only when model.moe.bias_update_rate > 0.
MOELAB_ONLY = ("router.expert_bias",)

# Tensors some checkpoints carry that hold nothing to load (old rotary caches).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

# Values transformers 5.x assumes for config.json keys left out (checked by tests/interop).
_COMMON_DEFAULTS: dict[str, Any] = {
    "num_key_value_heads": None,
    "head_dim": None,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
}
DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        **_COMMON_DEFAULTS,
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "mixtral": {
        **_COMMON_DEFAULTS,
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096 * 32,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "sliding_window": None,
        "num_experts_per_tok": 2,
        "num_local_experts": 8,
        "router_aux_loss_coef": 0.001,
    },
    "qwen2_moe": {
        **_COMMON_DEFAULTS,
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "decoder_sparse_step": 1,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "num_experts_per_tok": 4,
        "num_experts": 60,
        "norm_topk_prob": False,
        "router_aux_loss_coef": 0.001,
        "mlp_only_layers": None,
        "qkv_bias": True,
    },
    "qwen3_moe": {
        **_COMMON_DEFAULTS,
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "decoder_sparse_step": 1,
        "moe_intermediate_size": 768,
        "num_experts_per_tok": 8,
        "num_experts": 128,
        "norm_topk_prob": False,
        "router_aux_loss_coef": 0.001,
        "mlp_only_layers": None,
    },
    "olmoe": {
        **_COMMON_DEFAULTS,
        "vocab_size": 50304,
        "hidden_size": 2048,
        "intermediate_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
        "clip_qkv": None,
        "num_experts_per_tok": 8,
        "num_experts": 64,
        "router_aux_loss_coef": 0.01,
        "norm_topk_prob": False,
    },
}
# config.json spellings transformers accepts for the same setting (its attribute_map).
ALIASES: dict[str, dict[str, str]] = {
    "qwen3_moe": {"num_local_experts": "num_experts"},
    "olmoe": {"num_local_experts": "num_experts"},
}


# ---------------------------------------------------------------------------------------------
# Reading config.json


class HFConfig:
    """A config.json with the architecture's defaults filled in; errors name the file and key."""

    def __init__(self, raw: dict[str, Any], model_type: str, path: Path):
        raw = dict(raw)
        for alias, key in ALIASES.get(model_type, {}).items():
            if alias in raw and key not in raw:
                raw[key] = raw.pop(alias)
        self.raw = raw
        self.values = {**DEFAULTS[model_type], **raw}
        self.path = path

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def error(self, key: str, allowed: str) -> MoelabError:
        return MoelabError(f"{self.path}: {key} = {self.get(key)!r} is not supported: {allowed}")

    def int(self, key: str, minimum: int = 1) -> int:
        value = self.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.error(key, f"an integer >= {minimum}")
        return value

    def float(self, key: str) -> float:
        value = self.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise self.error(key, "a number > 0")
        return float(value)

    def bool(self, key: str) -> bool:
        value = self.get(key)
        if not isinstance(value, bool):
            raise self.error(key, "true or false")
        return value

    def require(self, key: str, ok: Callable[[Any], bool], allowed: str) -> None:
        if not ok(self.get(key)):
            raise self.error(key, allowed)

    def rope_theta(self) -> float:
        """The rotary base; only plain rotary is supported (no scaling, no partial rotary)."""
        params = self.raw.get("rope_parameters")
        theta = self.raw.get("rope_theta", self.get("rope_theta"))
        if params is not None:
            if not isinstance(params, dict) or not all(
                isinstance(v, (int, float, str, type(None))) for v in params.values()
            ):
                raise self.error("rope_parameters", "one set of plain rotary parameters (not one per layer type)")
            kind = params.get("rope_type", params.get("type", "default"))
            if kind != "default":
                raise self.error("rope_parameters", f'rope_type "default"; moelab has no {kind!r} rotary scaling')
            if params.get("partial_rotary_factor", 1.0) != 1.0:
                raise self.error("rope_parameters", "partial_rotary_factor 1 (moelab rotates the whole head)")
            theta = params.get("rope_theta", theta)
        scaling = self.raw.get("rope_scaling")
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
            if kind != "default":
                raise self.error("rope_scaling", f"none; moelab has no {kind!r} rotary scaling")
        if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not theta > 0:
            raise self.error("rope_theta", "a number > 0")
        return float(theta)


# ---------------------------------------------------------------------------------------------
# Architectures


def _all_moe(cfg: ModelConfig) -> bool:
    return all(cfg.is_moe_layer(i) for i in range(cfg.n_layers))


class Architecture:
    """One Hugging Face architecture: its key map, its config.json both ways, and what it cannot hold."""

    name: str  # config.json model_type
    hf_class: str  # config.json architectures[0]
    keymap: KeyMap
    sparse: bool  # an MoE architecture (else dense)

    # -- export --------------------------------------------------------------------------------

    def problems(self, cfg: ModelConfig) -> list[str]:
        """The settings of `cfg` this architecture cannot express (empty: it can)."""
        out = []
        if self.sparse and cfg.moe is None:
            out.append(f"a dense model (model.moe is none); {self.name} is a mixture of experts")
        if not self.sparse and cfg.moe is not None:
            out.append(f"model.moe (a mixture of experts); {self.name} is dense")
        return out

    def to_hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
        """config.json for `cfg` (token ids and dtype are added by the exporter)."""
        return {
            "architectures": [self.hf_class],
            "model_type": self.name,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.resolved_head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len,
            "initializer_range": cfg.init_std,
            "rms_norm_eps": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings,
            # both spellings: rope_parameters (transformers 5) and rope_theta (older readers)
            "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "attention_dropout": 0.0,
            "use_cache": True,
        }

    # -- import --------------------------------------------------------------------------------

    def from_hf_config(self, hf: HFConfig) -> ModelConfig:
        """The moelab model of a config.json, or MoelabError naming the key it cannot load."""
        if "quantization_config" in hf.raw:
            raise hf.error("quantization_config", "none; moelab loads unquantised weights only")
        hf.require("hidden_act", lambda v: v in ("silu", "swish"), '"silu" (SwiGLU feed-forward)')
        heads = hf.int("num_attention_heads")
        kv_heads = heads if hf.get("num_key_value_heads") is None else hf.int("num_key_value_heads")
        d_model = hf.int("hidden_size")
        head_dim = d_model // heads if hf.get("head_dim") is None else hf.int("head_dim")
        return ModelConfig(
            vocab_size=hf.int("vocab_size"),
            d_model=d_model,
            n_layers=hf.int("num_hidden_layers"),
            n_heads=heads,
            n_kv_heads=kv_heads,
            head_dim=0 if head_dim * heads == d_model else head_dim,  # 0: moelab's default, d_model // n_heads
            ffn_hidden=hf.int("intermediate_size"),
            max_seq_len=hf.int("max_position_embeddings"),
            rope_theta=hf.rope_theta(),
            norm_eps=hf.float("rms_norm_eps"),
            tie_embeddings=hf.bool("tie_word_embeddings"),
            init_std=hf.float("initializer_range"),
        )

    def check_attention_window(self, hf: HFConfig, cfg: ModelConfig) -> None:
        """Sliding-window attention is refused unless the window covers the whole context."""
        window = hf.get("sliding_window")
        enabled = hf.get("use_sliding_window", True)
        if enabled and window is not None and window < cfg.max_seq_len:
            raise hf.error(
                "sliding_window",
                f"none, or at least the context length ({cfg.max_seq_len}); moelab attends to the whole context",
            )


class Llama(Architecture):
    name, hf_class, sparse = "llama", "LlamaForCausalLM", False
    keymap = EMBEDDINGS + ATTENTION + DENSE_MLP

    def problems(self, cfg):
        out = super().problems(cfg)
        if cfg.qkv_bias:
            out.append("model.qkv_bias = true (Llama's attention_bias also adds an output-projection bias)")
        if cfg.qk_norm != "none":
            out.append(f"model.qk_norm = {cfg.qk_norm!r} (Llama has no q/k norm)")
        return out

    def to_hf_config(self, cfg):
        return {
            **super().to_hf_config(cfg),
            "intermediate_size": cfg.ffn_hidden,
            "attention_bias": False,
            "mlp_bias": False,
            "pretraining_tp": 1,
        }

    def from_hf_config(self, hf):
        hf.require("attention_bias", lambda v: v is False, "false (moelab has no output-projection bias)")
        hf.require("mlp_bias", lambda v: v is False, "false (moelab's feed-forward has no biases)")
        return super().from_hf_config(hf)


class Mixtral(Architecture):
    name, hf_class, sparse = "mixtral", "MixtralForCausalLM", True
    keymap = EMBEDDINGS + ATTENTION + MIXTRAL_MOE

    def problems(self, cfg):
        out = super().problems(cfg)
        if cfg.moe is not None:
            if not _all_moe(cfg):
                out.append(
                    "dense layers among the MoE layers (model.moe.first_dense / every); every Mixtral layer is MoE"
                )
            if not cfg.moe.renormalize:
                out.append("model.moe.renormalize = false (Mixtral always renormalises the top-k weights)")
            if cfg.moe.num_shared_experts:
                out.append(
                    f"model.moe.num_shared_experts = {cfg.moe.num_shared_experts} (Mixtral has no shared experts)"
                )
        if cfg.qkv_bias:
            out.append("model.qkv_bias = true (Mixtral's attention has no biases)")
        if cfg.qk_norm != "none":
            out.append(f"model.qk_norm = {cfg.qk_norm!r} (Mixtral has no q/k norm)")
        return out

    def to_hf_config(self, cfg):
        moe = cfg.moe
        return {
            **super().to_hf_config(cfg),
            "intermediate_size": moe.expert_hidden,
            "num_local_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "sliding_window": None,
            "router_aux_loss_coef": moe.aux_loss_coef,
            "router_jitter_noise": 0.0,
            "output_router_logits": False,
        }

    def from_hf_config(self, hf):
        cfg = super().from_hf_config(hf)
        self.check_attention_window(hf, cfg)
        cfg.moe = MoEConfig(
            num_experts=hf.int("num_local_experts"),
            top_k=hf.int("num_experts_per_tok"),
            expert_hidden=hf.int("intermediate_size"),
            renormalize=True,
            aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0),
        )
        return cfg


def _qwen_layers(hf: HFConfig, n_layers: int) -> tuple[int, int]:
    """(first_dense, every) reproducing decoder_sparse_step and mlp_only_layers, or an error."""
    step = hf.int("decoder_sparse_step")
    dense_only = hf.get("mlp_only_layers") or []
    if not isinstance(dense_only, list) or not all(isinstance(i, int) for i in dense_only):
        raise hf.error("mlp_only_layers", "a list of layer indices")
    sparse = [i for i in range(n_layers) if i not in dense_only and (i + 1) % step == 0]
    if not sparse:
        raise hf.error(
            "mlp_only_layers",
            "settings that leave at least one MoE layer (decoder_sparse_step and mlp_only_layers make every layer dense)",
        )
    first = sparse[0]
    if sparse != [i for i in range(first, n_layers) if (i + 1) % step == 0]:
        raise hf.error(
            "mlp_only_layers",
            "the first layers only (moelab places MoE layers as: layer i >= first_dense with (i+1) % every == 0)",
        )
    return first, step


def _qwen_layer_settings(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "intermediate_size": cfg.ffn_hidden,
        "decoder_sparse_step": cfg.moe.every,
        "mlp_only_layers": list(range(cfg.moe.first_dense)),
        "use_sliding_window": False,
        "sliding_window": None,
    }


class Qwen2Moe(Architecture):
    name, hf_class, sparse = "qwen2_moe", "Qwen2MoeForCausalLM", True
    keymap = EMBEDDINGS + ATTENTION + QKV_BIAS + DENSE_MLP + QWEN_MOE + QWEN2_SHARED

    def problems(self, cfg):
        out = super().problems(cfg)
        if cfg.moe is not None and not (cfg.moe.num_shared_experts and cfg.moe.shared_expert_gate):
            out.append("no gated shared expert (Qwen2-MoE always has one; see export_equivalent)")
        if cfg.qk_norm != "none":
            out.append(f"model.qk_norm = {cfg.qk_norm!r} (Qwen2-MoE has no q/k norm)")
        return out

    def to_hf_config(self, cfg):
        moe = cfg.moe
        return {
            **super().to_hf_config(cfg),
            **_qwen_layer_settings(cfg),
            "max_window_layers": cfg.n_layers,
            "layer_types": ["full_attention"] * cfg.n_layers,
            "moe_intermediate_size": moe.expert_hidden,
            "shared_expert_intermediate_size": moe.shared_hidden_total,
            "num_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "norm_topk_prob": moe.renormalize,
            "qkv_bias": cfg.qkv_bias,
            "router_aux_loss_coef": moe.aux_loss_coef,
            "output_router_logits": False,
        }

    def from_hf_config(self, hf):
        cfg = super().from_hf_config(hf)
        self.check_attention_window(hf, cfg)
        layer_types = hf.get("layer_types")
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            raise hf.error("layer_types", '"full_attention" for every layer (moelab has no sliding-window layers)')
        first_dense, every = _qwen_layers(hf, cfg.n_layers)
        cfg.qkv_bias = hf.bool("qkv_bias")
        cfg.moe = MoEConfig(
            num_experts=hf.int("num_experts"),
            top_k=hf.int("num_experts_per_tok"),
            expert_hidden=hf.int("moe_intermediate_size"),
            num_shared_experts=1,
            shared_expert_hidden=hf.int("shared_expert_intermediate_size"),
            shared_expert_gate=True,
            renormalize=hf.bool("norm_topk_prob"),
            aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0),
            every=every,
            first_dense=first_dense,
        )
        return cfg


class Qwen3Moe(Architecture):
    name, hf_class, sparse = "qwen3_moe", "Qwen3MoeForCausalLM", True
    keymap = EMBEDDINGS + ATTENTION + QK_NORM + DENSE_MLP + QWEN_MOE

    def problems(self, cfg):
        out = super().problems(cfg)
        if cfg.qk_norm != "head":
            out.append(f'model.qk_norm = {cfg.qk_norm!r} (Qwen3-MoE normalises each head\'s queries and keys: "head")')
        if cfg.moe is not None and cfg.moe.num_shared_experts:
            out.append(f"model.moe.num_shared_experts = {cfg.moe.num_shared_experts} (Qwen3-MoE has no shared experts)")
        if cfg.qkv_bias:
            out.append("model.qkv_bias = true (Qwen3-MoE's attention_bias also adds an output-projection bias)")
        return out

    def to_hf_config(self, cfg):
        moe = cfg.moe
        return {
            **super().to_hf_config(cfg),
            **_qwen_layer_settings(cfg),
            "moe_intermediate_size": moe.expert_hidden,
            "num_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "norm_topk_prob": moe.renormalize,
            "attention_bias": False,
            "router_aux_loss_coef": moe.aux_loss_coef,
            "output_router_logits": False,
        }

    def from_hf_config(self, hf):
        hf.require("attention_bias", lambda v: v is False, "false (moelab has no output-projection bias)")
        cfg = super().from_hf_config(hf)
        self.check_attention_window(hf, cfg)
        first_dense, every = _qwen_layers(hf, cfg.n_layers)
        cfg.qk_norm = "head"
        cfg.moe = MoEConfig(
            num_experts=hf.int("num_experts"),
            top_k=hf.int("num_experts_per_tok"),
            expert_hidden=hf.int("moe_intermediate_size"),
            renormalize=hf.bool("norm_topk_prob"),
            aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0),
            every=every,
            first_dense=first_dense,
        )
        return cfg


class Olmoe(Architecture):
    name, hf_class, sparse = "olmoe", "OlmoeForCausalLM", True
    keymap = EMBEDDINGS + ATTENTION + QK_NORM + QWEN_MOE

    def problems(self, cfg):
        out = super().problems(cfg)
        if cfg.qk_norm != "full":
            out.append(
                f'model.qk_norm = {cfg.qk_norm!r} (OLMoE normalises the whole query and key projections: "full")'
            )
        if cfg.head_dim not in (0, cfg.d_model // cfg.n_heads):
            out.append(f"model.head_dim = {cfg.head_dim} (OLMoE's head size is d_model / n_heads)")
        if cfg.moe is not None:
            if not _all_moe(cfg):
                out.append(
                    "dense layers among the MoE layers (model.moe.first_dense / every); every OLMoE layer is MoE"
                )
            if cfg.moe.num_shared_experts:
                out.append(f"model.moe.num_shared_experts = {cfg.moe.num_shared_experts} (OLMoE has no shared experts)")
        if cfg.qkv_bias:
            out.append("model.qkv_bias = true (OLMoE's attention_bias also adds an output-projection bias)")
        return out

    def to_hf_config(self, cfg):
        moe = cfg.moe
        config = super().to_hf_config(cfg)
        del config["head_dim"]  # OLMoE derives it (and its q/k norm sizes) from hidden_size
        return {
            **config,
            "intermediate_size": moe.expert_hidden,
            "num_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "norm_topk_prob": moe.renormalize,
            "attention_bias": False,
            "clip_qkv": None,
            "router_aux_loss_coef": moe.aux_loss_coef,
            "output_router_logits": False,
        }

    def from_hf_config(self, hf):
        hf.require("attention_bias", lambda v: v is False, "false (moelab has no output-projection bias)")
        hf.require("clip_qkv", lambda v: v is None, "none (moelab does not clip queries, keys and values)")
        cfg = super().from_hf_config(hf)
        if cfg.head_dim:
            raise hf.error(
                "head_dim",
                f"hidden_size / num_attention_heads ({cfg.d_model // cfg.n_heads}); OLMoE's q/k norms assume it",
            )
        cfg.qk_norm = "full"
        cfg.moe = MoEConfig(
            num_experts=hf.int("num_experts"),
            top_k=hf.int("num_experts_per_tok"),
            expert_hidden=hf.int("intermediate_size"),
            renormalize=hf.bool("norm_topk_prob"),
            aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0),
        )
        return cfg


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (Llama(), Mixtral(), Qwen2Moe(), Qwen3Moe(), Olmoe())}


def get_architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise MoelabError(f"architecture {name!r} is not supported: one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def read_hf_config(raw: dict[str, Any], path: Path) -> tuple[Architecture, ModelConfig]:
    """The architecture and moelab model of a parsed config.json (MoelabError naming what is wrong)."""
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise MoelabError(f"{path}: model_type = {model_type!r} is not supported: one of {', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[model_type]
    hf = HFConfig(raw, model_type, path)
    cfg = arch.from_hf_config(hf)
    try:
        cfg.validate()
    except ConfigError as exc:
        raise MoelabError(f"{path} describes a model moelab cannot build: {exc}") from None
    return arch, cfg


# ---------------------------------------------------------------------------------------------
# Choosing an architecture for export


def unexportable(cfg: ModelConfig) -> list[str]:
    """Settings no supported architecture can express, whichever is chosen."""
    moe = cfg.moe
    if moe is None:
        return []
    out = []
    if moe.routing != "token_choice":
        out.append(
            f"model.moe.routing = {moe.routing!r} (expert-choice routing: every supported architecture routes each token to its top-k experts)"
        )
    if moe.capacity_factor is not None:
        out.append(
            f"model.moe.capacity_factor = {moe.capacity_factor} (token dropping by expert capacity: the supported architectures are dropless)"
        )
    if moe.scoring != "softmax":
        out.append(f"model.moe.scoring = {moe.scoring!r} (the supported architectures score experts with a softmax)")
    if cfg.qk_norm != "none" and moe.num_shared_experts:
        out.append(
            "q/k norm together with shared experts (Qwen2-MoE has shared experts but no q/k norm; Qwen3-MoE and OLMoE the reverse)"
        )
    return out


def candidates(cfg: ModelConfig) -> list[Architecture]:
    """Architectures to try for `cfg`, most specific first."""
    if cfg.moe is None:
        return [ARCHITECTURES["llama"]]
    if cfg.qk_norm == "full":
        return [ARCHITECTURES["olmoe"]]
    if cfg.qk_norm == "head":
        return [ARCHITECTURES["qwen3_moe"]]
    return [ARCHITECTURES["mixtral"], ARCHITECTURES["qwen2_moe"]]


def with_moe(cfg: ModelConfig, **changes: Any) -> ModelConfig:
    """A copy of `cfg` with some MoE settings changed."""
    return replace(cfg, moe=replace(cfg.moe, **changes))
