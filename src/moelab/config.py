"""Run configuration: typed dataclasses, TOML presets, dotted overrides, validation.

A run is described by one `RunConfig` (model, data, train, monitor, parallel). It is built from a
TOML file or a preset, then `--set section.key=value` overrides are applied, then it is validated
once; the resolved config is written into the run directory so the run can be reproduced from it.
Every impossible setting raises `ConfigError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from moelab.errors import ConfigError, MoelabError

PRESET_DIR = Path(__file__).parent / "presets"

ROUTING_CHOICES = ("token_choice", "expert_choice")
SCORING_CHOICES = ("softmax", "sigmoid")
TOKENIZER_CHOICES = ("bpe", "bytes", "file")
SIZE_CEILINGS = {  # ModelConfig fields
    "vocab_size": 1 << 22,
    "d_model": 1 << 16,
    "n_layers": 1 << 10,
    "n_heads": 1 << 10,
    "n_kv_heads": 1 << 10,
    "head_dim": 1 << 12,
    "ffn_hidden": 1 << 18,
    "max_seq_len": 1 << 20,
}
MOE_SIZE_CEILINGS = {
    "num_experts": 1 << 14,
    "top_k": 1 << 10,
    "expert_hidden": 1 << 18,
    "num_shared_experts": 64,
    "shared_expert_hidden": 1 << 18,
}
BALANCE_COUPLING_CHOICES = ("none", "lr", "stop_at_decay")
BALANCE_SCOPE_CHOICES = ("micro_batch", "step")
DECAY_SCOPE_CHOICES = ("all", "ffn", "non_ffn")
SCHEDULE_CHOICES = ("cosine", "wsd", "constant")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
DTYPE_CHOICES = ("auto", "float32", "bfloat16")
QK_NORM_CHOICES = ("none", "head", "full")
# experiment trackers fed from metrics.jsonl's records (moelab.train.trackers); names as Hugging Face's Trainer
REPORT_TO_CHOICES = ("tensorboard", "wandb")


@dataclass(frozen=True)
class MoEConfig:
    """The mixture-of-experts feed-forward. Present on ModelConfig.moe means the model is sparse.

    Frozen: an MoE layer is built from it and keeps it (its moe_decode kernel binding is keyed on these
    settings); derive a changed copy with dataclasses.replace."""

    num_experts: int = 8  # E, routed experts per MoE layer
    top_k: int = 2  # k, experts per token (token choice); mean experts per token (expert choice)
    expert_hidden: int = 256  # I, hidden size of one routed expert (fine-grained: smaller than ffn_hidden)
    num_shared_experts: int = 0  # experts every token uses (DeepSeek-MoE), fused into one SwiGLU
    shared_expert_hidden: int = 0  # hidden size of one shared expert; 0 = expert_hidden
    shared_expert_gate: bool = False  # sigmoid gate on the shared-expert output (Qwen2-MoE)
    routing: str = "token_choice"  # token_choice | expert_choice
    scoring: str = "softmax"  # softmax | sigmoid
    renormalize: bool = True  # rescale the k chosen weights to sum to 1
    route_scale: float = 1.0  # multiplies the routing weights (DeepSeek-V3's routed scaling factor)
    capacity_factor: float | None = None  # None = dropless; else slots per expert / (T*k/E)
    aux_loss_coef: float = 0.01  # Switch load-balancing loss
    z_loss_coef: float = 0.001  # router z-loss (ST-MoE)
    bias_update_rate: float = 0.0  # auxiliary-loss-free balancing (DeepSeek-V3); 0 = off
    jitter: float = 0.0  # multiplicative noise on the router input while training
    router_init_std: float | None = None  # None = model init_std
    lr_scale: float = 1.0  # learning-rate multiplier for the router and routed experts
    every: int = 1  # an MoE layer every n-th layer (layer i is MoE when (i+1) % every == 0)
    first_dense: int = 0  # the first m layers keep a dense FFN (DeepSeek-MoE)

    def validate(self, prefix: str = "model.moe") -> None:
        for name, ceiling in MOE_SIZE_CEILINGS.items():
            value = getattr(self, name)
            _check(value <= ceiling, f"{prefix}.{name}", value, f"at most {ceiling:,}")
        _check(self.num_experts >= 1, f"{prefix}.num_experts", self.num_experts, "an integer >= 1")
        _check(self.top_k >= 1, f"{prefix}.top_k", self.top_k, "an integer >= 1")
        if self.routing == "token_choice":
            _check(
                self.top_k <= self.num_experts,
                f"{prefix}.top_k",
                self.top_k,
                f"at most num_experts ({self.num_experts})",
            )
        _check(self.expert_hidden >= 1, f"{prefix}.expert_hidden", self.expert_hidden, "an integer >= 1")
        _check(
            self.num_shared_experts >= 0,
            f"{prefix}.num_shared_experts",
            self.num_shared_experts,
            "an integer >= 0",
        )
        _check(
            self.shared_expert_hidden >= 0,
            f"{prefix}.shared_expert_hidden",
            self.shared_expert_hidden,
            "an integer >= 0 (0 means expert_hidden)",
        )
        _check(self.routing in ROUTING_CHOICES, f"{prefix}.routing", self.routing, f"one of {ROUTING_CHOICES}")
        _check(self.scoring in SCORING_CHOICES, f"{prefix}.scoring", self.scoring, f"one of {SCORING_CHOICES}")
        if self.capacity_factor is not None:
            _check(
                math.isfinite(self.capacity_factor) and self.capacity_factor > 0,
                f"{prefix}.capacity_factor",
                self.capacity_factor,
                "a number > 0, or none for dropless routing",
            )
        _check(
            math.isfinite(self.route_scale) and self.route_scale > 0,
            f"{prefix}.route_scale",
            self.route_scale,
            "a number > 0",
        )
        _check(math.isfinite(self.lr_scale) and self.lr_scale > 0, f"{prefix}.lr_scale", self.lr_scale, "a number > 0")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "jitter"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0, f"{prefix}.{name}", value, "a number >= 0")
        _check(self.jitter < 1, f"{prefix}.jitter", self.jitter, "a number in [0, 1)")
        if self.router_init_std is not None:
            _check(self.router_init_std >= 0, f"{prefix}.router_init_std", self.router_init_std, "a number >= 0")
        _check(self.every >= 1, f"{prefix}.every", self.every, "an integer >= 1")
        _check(self.first_dense >= 0, f"{prefix}.first_dense", self.first_dense, "an integer >= 0")

    @property
    def shared_hidden_total(self) -> int:
        """Hidden size of the fused shared-expert SwiGLU (0 when there are no shared experts)."""
        return self.num_shared_experts * (self.shared_expert_hidden or self.expert_hidden)


@dataclass
class ModelConfig:
    """A decoder-only transformer; `moe` set means some layers use the MoE feed-forward."""

    vocab_size: int = 0  # 0 = taken from the tokenizer when the run starts
    d_model: int = 256  # D
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # grouped-query attention; 0 = n_heads
    head_dim: int = 0  # 0 = d_model // n_heads
    ffn_hidden: int = 1024  # hidden size of the dense SwiGLU (dense layers and the dense model)
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    # Attention options of some Hugging Face architectures (moelab.interop); off by default.
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2-MoE)
    qk_norm: str = "none"  # RMSNorm of queries and keys before rotary: none | head (per head, Qwen3-MoE) | full (OLMoE)
    moe: MoEConfig | None = None

    def validate(self, prefix: str = "model") -> None:
        _check(self.vocab_size >= 0, f"{prefix}.vocab_size", self.vocab_size, "an integer >= 0 (0 = from tokenizer)")
        _check(self.d_model >= 1, f"{prefix}.d_model", self.d_model, "an integer >= 1")
        _check(self.n_layers >= 1, f"{prefix}.n_layers", self.n_layers, "an integer >= 1")
        _check(self.n_heads >= 1, f"{prefix}.n_heads", self.n_heads, "an integer >= 1")
        if self.head_dim == 0:
            _check(
                self.d_model % self.n_heads == 0,
                f"{prefix}.d_model",
                self.d_model,
                f"a multiple of n_heads ({self.n_heads}), or set head_dim",
            )
        _check(self.head_dim >= 0, f"{prefix}.head_dim", self.head_dim, "an integer >= 0 (0 = d_model // n_heads)")
        _check(self.resolved_head_dim % 2 == 0, f"{prefix}.head_dim", self.resolved_head_dim, "an even number (rotary)")
        _check(self.n_kv_heads >= 0, f"{prefix}.n_kv_heads", self.n_kv_heads, "an integer >= 0 (0 = n_heads)")
        _check(
            self.n_heads % self.kv_heads == 0,
            f"{prefix}.n_kv_heads",
            self.n_kv_heads,
            f"a divisor of n_heads ({self.n_heads})",
        )
        _check(self.ffn_hidden >= 1, f"{prefix}.ffn_hidden", self.ffn_hidden, "an integer >= 1")
        _check(self.max_seq_len >= 1, f"{prefix}.max_seq_len", self.max_seq_len, "an integer >= 1")
        _check(self.rope_theta > 0, f"{prefix}.rope_theta", self.rope_theta, "a number > 0")
        _check(self.norm_eps > 0, f"{prefix}.norm_eps", self.norm_eps, "a number > 0")
        _check(0 < self.init_std <= 10, f"{prefix}.init_std", self.init_std, "a number in (0, 10]")
        # NOTE: ceilings far above any model this tool trains, checked before anything is allocated
        # (a config.json from elsewhere could otherwise plan terabytes); memory is checked after.
        for name, ceiling in SIZE_CEILINGS.items():
            value = getattr(self, name)
            _check(value <= ceiling, f"{prefix}.{name}", value, f"at most {ceiling:,}")
        _check(self.qk_norm in QK_NORM_CHOICES, f"{prefix}.qk_norm", self.qk_norm, f"one of {QK_NORM_CHOICES}")
        if self.moe is not None:
            self.moe.validate(f"{prefix}.moe")
            _check(
                self.moe.first_dense < self.n_layers,
                f"{prefix}.moe.first_dense",
                self.moe.first_dense,
                f"fewer than n_layers ({self.n_layers}) so that at least one layer is MoE",
            )
            _check(
                any(self.is_moe_layer(i) for i in range(self.n_layers)),
                f"{prefix}.moe.every",
                self.moe.every,
                f"a value that leaves at least one MoE layer among {self.n_layers} layers",
            )

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def is_moe_layer(self, layer: int) -> bool:
        """Layer placement: dense for the first `first_dense` layers, then MoE on every `every`-th."""
        if self.moe is None or layer < self.moe.first_dense:
            return False
        return (layer + 1) % self.moe.every == 0


@dataclass
class DataConfig:
    # "stdlib" (embedded corpus), a text file, a directory, a .jsonl or .parquet file, a `datasets`
    # save_to_disk directory, or a tokenised directory (`moelab tokenize`, nanoGPT train.bin/val.bin)
    source: str = "stdlib"
    # files to read under a directory: a list of patterns, or one string of comma-separated patterns,
    # matched on the relative path or the file name
    glob: str | list[str] = "*"
    jsonl_field: str = "text"  # the text field of JSON Lines records, or the column of Parquet / datasets
    tokenizer: str = "bpe"  # bpe (trained on the data) | bytes | file (an existing tokenizer.json)
    tokenizer_file: str = (
        ""  # with tokenizer = "file": its tokenizer.json (a tokenizer_config.json beside it names eos/pad)
    )
    vocab_size: int = 4096  # BPE vocabulary size (bytes: 256 + special tokens)
    seq_len: int = 256  # training context length
    val_fraction: float = 0.03  # share of documents held out, by a stable hash of their path
    max_bytes: int = 0  # read at most this many bytes of text (0 = all)
    cache_dir: str = ""  # token-shard cache; "" = $MOELAB_CACHE or ~/.cache/moelab

    def validate(self, prefix: str = "data") -> None:
        _check(bool(self.source), f"{prefix}.source", self.source, '"stdlib" or a path to text data')
        _check(
            self.tokenizer in TOKENIZER_CHOICES,
            f"{prefix}.tokenizer",
            self.tokenizer,
            f"one of {TOKENIZER_CHOICES}",
        )
        if self.tokenizer == "file":
            _check(
                bool(self.tokenizer_file),
                f"{prefix}.tokenizer_file",
                self.tokenizer_file,
                "the path of a tokenizer.json when data.tokenizer = 'file'",
            )
        _check(self.vocab_size >= 260, f"{prefix}.vocab_size", self.vocab_size, "an integer >= 260")
        _check(self.seq_len >= 2, f"{prefix}.seq_len", self.seq_len, "an integer >= 2")
        _check(
            0.02 <= self.val_fraction < 0.5,
            f"{prefix}.val_fraction",
            self.val_fraction,
            "a fraction in [0.02, 0.5)",
        )
        _check(self.max_bytes >= 0, f"{prefix}.max_bytes", self.max_bytes, "an integer >= 0 (0 = all)")
        _check(bool(self.jsonl_field), f"{prefix}.jsonl_field", self.jsonl_field, "a non-empty field name")


@dataclass
class TrainConfig:
    batch_size: int = 16  # sequences per micro-batch (under torchrun: over all ranks; each reads batch_size / world)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000
    max_tokens: int = 0  # stop after this many training tokens (0 = no token budget)
    max_minutes: float = 0.0  # stop after this much wall time (0 = no time budget)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final learning rate / lr
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    eval_every: int = 100
    eval_batches: int = 20
    log_every: int = 10
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    # single: one process's files (weights gathered to rank 0); sharded: every process writes its
    # own shards with torch.distributed.checkpoint (needs parallel.data_parallel = "fsdp")
    checkpoint_format: str = "single"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    sample_tokens: int = 64  # tokens of the sample printed at the end
    # Router balancing coupled to the schedule (moelab.train.schedule.balance_scale): the Switch-loss
    # coefficient and the bias update rate are multiplied by a factor in [0, 1] every step.
    balance_coupling: str = "none"  # none | lr (factor lr / peak lr) | stop_at_decay (0 from the decay phase on)
    balance_warmup_steps: int = 0  # the factor ramps linearly from 0 to 1 over these first steps (0 = off)
    router_freeze_step: int = 0  # from this step on, router weights and biases stay fixed (0 = never)
    router_freeze_at_decay: bool = False  # freeze the router when the decay phase starts
    # micro_batch: the Switch loss balances each micro-batch's load (over data-parallel ranks); step:
    # the load of the whole optimizer step, all micro-batches and ranks (global-batch balancing)
    balance_scope: str = "micro_batch"
    # Which parameters the schedule's decay lowers (a diagnostic: which part of the model the decay
    # phase helps): all | ffn (each block's dense FFN or MoE layer, router and shared experts
    # included) | non_ffn (everything else). The others follow the schedule without its decay.
    decay_scope: str = "all"
    # Experiment trackers that receive every metrics.jsonl row (their files go inside the run
    # directory): tensorboard | wandb (offline unless WANDB_MODE says otherwise). [] = none.
    report_to: list[str] = field(default_factory=list)
    # Memory and speed (docs/distributed.md): recompute each block's activations in the backward
    # instead of keeping them; torch.compile each block (the first step compiles).
    activation_checkpointing: bool = False
    compile: bool = False

    def validate(self, prefix: str = "train") -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches", "log_every"):
            value = getattr(self, name)
            _check(value >= 1, f"{prefix}.{name}", value, "an integer >= 1")
        for name in ("max_tokens", "sample_tokens", "warmup_steps"):
            value = getattr(self, name)
            _check(value >= 0, f"{prefix}.{name}", value, "an integer >= 0")
        _check(
            self.checkpoint_every >= 0,
            f"{prefix}.checkpoint_every",
            self.checkpoint_every,
            ">= 0 (0 = only at the end)",
        )
        _check(self.keep_checkpoints >= 1, f"{prefix}.keep_checkpoints", self.keep_checkpoints, "an integer >= 1")
        _check(
            self.checkpoint_format in ("single", "sharded"),
            f"{prefix}.checkpoint_format",
            self.checkpoint_format,
            "single or sharded",
        )
        _check(self.max_minutes >= 0, f"{prefix}.max_minutes", self.max_minutes, "a number >= 0 (0 = no limit)")
        _check(math.isfinite(self.lr) and self.lr > 0, f"{prefix}.lr", self.lr, "a number > 0")
        _check(0 <= self.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio", self.min_lr_ratio, "a fraction in [0, 1]")
        _check(self.schedule in SCHEDULE_CHOICES, f"{prefix}.schedule", self.schedule, f"one of {SCHEDULE_CHOICES}")
        _check(0 < self.decay_fraction <= 1, f"{prefix}.decay_fraction", self.decay_fraction, "a fraction in (0, 1]")
        _check(self.weight_decay >= 0, f"{prefix}.weight_decay", self.weight_decay, "a number >= 0")
        _check(0 <= self.beta1 < 1, f"{prefix}.beta1", self.beta1, "a number in [0, 1)")
        _check(0 <= self.beta2 < 1, f"{prefix}.beta2", self.beta2, "a number in [0, 1)")
        _check(self.grad_clip >= 0, f"{prefix}.grad_clip", self.grad_clip, "a number >= 0 (0 = off)")
        _check(self.device in DEVICE_CHOICES, f"{prefix}.device", self.device, f"one of {DEVICE_CHOICES}")
        _check(self.dtype in DTYPE_CHOICES, f"{prefix}.dtype", self.dtype, f"one of {DTYPE_CHOICES}")
        _check(
            self.balance_coupling in BALANCE_COUPLING_CHOICES,
            f"{prefix}.balance_coupling",
            self.balance_coupling,
            f"one of {BALANCE_COUPLING_CHOICES}",
        )
        _check(
            self.balance_scope in BALANCE_SCOPE_CHOICES,
            f"{prefix}.balance_scope",
            self.balance_scope,
            f"one of {BALANCE_SCOPE_CHOICES}",
        )
        _check(
            self.decay_scope in DECAY_SCOPE_CHOICES,
            f"{prefix}.decay_scope",
            self.decay_scope,
            f"one of {DECAY_SCOPE_CHOICES}",
        )
        _check(
            0 <= self.balance_warmup_steps <= self.max_steps,
            f"{prefix}.balance_warmup_steps",
            self.balance_warmup_steps,
            f"an integer in [0, train.max_steps = {self.max_steps}]",
        )
        _check(
            0 <= self.router_freeze_step <= self.max_steps,
            f"{prefix}.router_freeze_step",
            self.router_freeze_step,
            f"an integer in [0, train.max_steps = {self.max_steps}] (0 = never)",
        )
        _check(
            all(name in REPORT_TO_CHOICES for name in self.report_to)
            and len(set(self.report_to)) == len(self.report_to),
            f"{prefix}.report_to",
            self.report_to,
            f"a list of distinct tracker names, each one of {REPORT_TO_CHOICES} (or [] for none)",
        )


@dataclass
class MonitorConfig:
    """Router-health metrics and guardrails (see moelab.train.monitor and docs/monitoring.md)."""

    # Layer rules, judged at every logging interval.
    collapse_score: float = 0.5  # collapse: score >= this (0 balanced .. 1 all tokens on the same k experts)
    collapse_imbalance: float = 0.0  # also collapse: max/mean expert load >= this (0 = off)
    dead_share: float = 0.1  # an expert is starved in an interval when its share < dead_share / E
    persist_intervals: int = 5  # collapsed / starved for this many consecutive intervals before an alert
    logit_growth: float = 30.0  # alert when the max router logit exceeds this
    # Spike rules, judged at every step against the previous spike_window steps.
    spike_sigma: float = 6.0  # loss spike: step loss > rolling mean + spike_sigma * std
    grad_spike_sigma: float = 8.0  # gradient-norm spike, likewise (gradient norms have heavier tails)
    grad_spike_min_ratio: float = 3.0  # ... and a gradient-norm spike is at least this many times the rolling mean
    spike_window: int = 100  # steps in the rolling window (judging starts when it is half full)
    spike_min_rel: float = 0.02  # the std used is at least this fraction of the rolling mean
    # Actions: warn (alert only) | stop (alert, save, stop) | rollback (to the newest checkpoint).
    on_nan: str = "rollback"  # a non-finite step is always skipped; warn = skip and continue
    on_spike: str = "warn"
    on_collapse: str = "warn"
    on_dead: str = "warn"
    on_logit_growth: str = "warn"
    max_rollbacks: int = 3  # rollbacks allowed in a run before a rollback action stops it instead
    skip_batches: int = 0  # extra batches skipped after a rollback (the window since the checkpoint always is)
    expert_similarity: bool = True  # pairwise cosine similarity of experts in metrics
    debug_nan_step: int = 0  # test hook: poison the loss of this step once (0 = off)

    def validate(self, prefix: str = "monitor") -> None:
        actions = ("warn", "stop", "rollback")
        for name in ("on_nan", "on_spike", "on_collapse", "on_dead", "on_logit_growth"):
            value = getattr(self, name)
            _check(value in actions, f"{prefix}.{name}", value, f"one of {actions}")
        _check(0 < self.collapse_score <= 1, f"{prefix}.collapse_score", self.collapse_score, "a number in (0, 1]")
        _check(
            self.collapse_imbalance == 0 or self.collapse_imbalance > 1,
            f"{prefix}.collapse_imbalance",
            self.collapse_imbalance,
            "0 (off) or a number > 1 (max/mean load is 1 when balanced)",
        )
        _check(0 < self.dead_share < 1, f"{prefix}.dead_share", self.dead_share, "a fraction in (0, 1)")
        _check(self.persist_intervals >= 1, f"{prefix}.persist_intervals", self.persist_intervals, "an integer >= 1")
        _check(
            math.isfinite(self.logit_growth) and self.logit_growth > 0,
            f"{prefix}.logit_growth",
            self.logit_growth,
            "a number > 0",
        )
        for name in ("spike_sigma", "grad_spike_sigma"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value > 0, f"{prefix}.{name}", value, "a number > 0")
        _check(
            math.isfinite(self.grad_spike_min_ratio) and self.grad_spike_min_ratio >= 0,
            f"{prefix}.grad_spike_min_ratio",
            self.grad_spike_min_ratio,
            "a number >= 0 (0 = no floor)",
        )
        _check(self.spike_window >= 10, f"{prefix}.spike_window", self.spike_window, "an integer >= 10")
        _check(0 <= self.spike_min_rel < 1, f"{prefix}.spike_min_rel", self.spike_min_rel, "a fraction in [0, 1)")
        _check(self.max_rollbacks >= 0, f"{prefix}.max_rollbacks", self.max_rollbacks, "an integer >= 0")
        _check(self.skip_batches >= 0, f"{prefix}.skip_batches", self.skip_batches, "an integer >= 0")
        _check(self.debug_nan_step >= 0, f"{prefix}.debug_nan_step", self.debug_nan_step, "an integer >= 0 (0 = off)")


@dataclass
class ParallelConfig:
    """torch.distributed layout (launch with torchrun); 1 everywhere means a single process."""

    expert: int = 1  # expert-parallel group size: each rank holds E / expert experts
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    # ddp: every rank holds the whole model and optimizer state; fsdp: FSDP2 shards parameters,
    # gradients and optimizer state over the ranks (docs/distributed.md)
    data_parallel: str = "ddp"

    def validate(self, prefix: str = "parallel") -> None:
        _check(self.expert >= 1, f"{prefix}.expert", self.expert, "an integer >= 1")
        _check(self.data_parallel in ("ddp", "fsdp"), f"{prefix}.data_parallel", self.data_parallel, "ddp or fsdp")
        _check(self.backend in ("auto", "gloo", "nccl"), f"{prefix}.backend", self.backend, "auto, gloo or nccl")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> "RunConfig":
        _check_finite(self, "")
        self.model.validate()
        self.data.validate()
        self.train.validate()
        self.monitor.validate()
        self.parallel.validate()
        _check(
            self.data.seq_len <= self.model.max_seq_len,
            "data.seq_len",
            self.data.seq_len,
            f"at most model.max_seq_len ({self.model.max_seq_len})",
        )
        moe = self.model.moe
        # NOTE (distributed): a dense model has no experts to split across ranks.
        _check(
            moe is not None or self.parallel.expert == 1,
            "parallel.expert",
            self.parallel.expert,
            "1 for a dense model (expert parallelism needs model.moe)",
        )
        # NOTE (distributed): the expert all-to-alls run in eager autograd functions; compiled
        # blocks around them are untested, so the two are not combined.
        _check(
            not (self.train.compile and self.parallel.expert > 1),
            "train.compile",
            self.train.compile,
            f"false with expert parallelism (parallel.expert = {self.parallel.expert}); compile needs parallel.expert = 1",
        )
        # NOTE (distributed): fsdp with parallel.expert > 1 is a 2-D mesh (moelab.distributed.fsdp);
        # whether the world divides into expert-parallel groups is known only at launch (layout).
        fsdp = self.parallel.data_parallel == "fsdp"
        _check(
            not (self.train.checkpoint_format == "sharded" and not fsdp),
            "train.checkpoint_format",
            self.train.checkpoint_format,
            "'single' with parallel.data_parallel = 'ddp'; sharded checkpoints need parallel.data_parallel = 'fsdp'",
        )
        _check(
            not (self.train.compile and fsdp),
            "train.compile",
            self.train.compile,
            "false with parallel.data_parallel = 'fsdp' (the combination is not tested)",
        )
        if moe is not None and self.parallel.expert > 1:
            _check(
                moe.num_experts % self.parallel.expert == 0,
                "parallel.expert",
                self.parallel.expert,
                f"a divisor of model.moe.num_experts ({moe.num_experts})",
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())


def _check(ok: bool, field_name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(field_name, value, allowed)


def _check_finite(section: object, prefix: str) -> None:
    """Every number in a config is finite: inf or nan (TOML's `inf`, `nan`) is refused for every
    field, before any rule of the field's own (so `weight_decay = inf` never reaches training)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, name + ".")
        elif isinstance(value, float):
            _check(math.isfinite(value), name, value, "a finite number")


# ---------------------------------------------------------------------------------------------
# Building configs from dictionaries (TOML) with type checks and helpful errors


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(prefix or "config", data, f"a table of {cls.__name__} settings")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(path, value, f"a known key; {prefix or 'the top level'} takes {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        if isinstance(value, list):  # e.g. data.glob: a string or a list of strings
            options = [a for a in options if typing.get_origin(a) is list] or options
        return _coerce(options[0], value, path)
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str) and item is str:  # `--set train.report_to=tensorboard,wandb`
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        raise ConfigError(path, value, "a list")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return from_dict(hint, value, path)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, value, "true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(path, value, "an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(path, value, "a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, value, "a string")
    raise TypeError(f"unsupported config type {hint} at {path}")


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items() if v is not None}
    return obj


def dump_toml(data: dict[str, Any]) -> str:
    """Write a nested dict as TOML with tomli_w (None values are left out: they mean 'default').

    Scalars come before the sub-tables of each table, so the file reads top-down like the presets."""

    def ordered(table: dict[str, Any]) -> dict[str, Any]:
        scalars = {k: v for k, v in table.items() if v is not None and not isinstance(v, dict)}
        return scalars | {k: ordered(v) for k, v in table.items() if isinstance(v, dict)}

    return tomli_w.dumps(ordered(data))


# ---------------------------------------------------------------------------------------------
# Presets, files and overrides


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        raise ConfigError("--preset", name, f"one of {', '.join(preset_names())}")
    return path


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise MoelabError(f"config file {path} is a directory; give a .toml file or --preset NAME")
    if not path.is_file():
        raise MoelabError(f"config file {path} does not exist (give a .toml file or --preset NAME)")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MoelabError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:  # unreadable: permissions, a directory named like a file, I/O errors
        raise MoelabError(f"config file {path} cannot be read: {exc.strerror or exc}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """'model.moe.num_experts=16' -> (['model', 'moe', 'num_experts'], 16). Values use TOML syntax;
    a bare word that is not TOML is taken as a string."""
    if "=" not in text:
        raise ConfigError("--set", text, "key.path=value, for example model.moe.num_experts=16")
    key, raw = text.split("=", 1)
    keys = [k.strip() for k in key.strip().split(".")]
    if not all(keys):
        raise ConfigError("--set", text, "key.path=value with a non-empty dotted key")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a nested dict (a copy). `section=none` removes an optional table."""
    out = _deep_copy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            child = node.get(k)
            if child is None or not isinstance(child, dict):
                child = {}
                node[k] = child
            node = child
        node[keys[-1]] = value
    return out


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def load_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> RunConfig:
    """Resolve a config from a TOML file or a preset (default: small-moe), then overrides."""
    if path is not None and preset is not None:
        raise MoelabError("give either a config file or --preset, not both")
    if path is None:
        path = preset_path(preset or "small-moe")
    data = apply_overrides(read_toml(path), overrides or [])
    return build_config(data)


def build_config(data: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from a nested dict (a parsed TOML document)."""
    data = _deep_copy(data)
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("moe"), (str, bool)):
        flag = model["moe"]
        if flag in (False, "none", "null", "dense", "off"):
            model["moe"] = None
        elif flag in (True, "on"):
            model["moe"] = {}
    return from_dict(RunConfig, data).validate()
