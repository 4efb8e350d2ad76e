"""`moelab export RUN_DIR OUT_DIR`: a run's model as a Hugging Face checkpoint that
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load with no custom code.

Steps: pick the architecture (moelab.interop.architectures), rewrite the model into an exactly
equivalent form that architecture can hold (`export_equivalent`), rename every tensor through the
architecture's key map, and write config.json, generation_config.json, the weights (sharded above a
size limit) and the tokenizer files. The output is written to a temporary directory and renamed into
place, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moelab.checkpoint import model_state
from moelab.config import ModelConfig
from moelab.data.tokenizer import (
    EOS,
    HF_TOKENIZER_CONFIG,
    IM_END,
    IM_START,
    PAD,
    TextTokenizer,
)
from moelab.errors import MoelabError
from moelab.infer.chat import CHAT_TEMPLATE
from moelab.interop import keymap
from moelab.interop.architectures import (
    MOELAB_ONLY,
    Architecture,
    candidates,
    get_architecture,
    unexportable,
    with_moe,
)
from moelab.interop.weights import DEFAULT_MAX_SHARD_BYTES, write_safetensors
from moelab.rundir import load_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Tokenizer files an imported run keeps from its Hugging Face directory and exports again.
HF_TOKENIZER_FILES = ("tokenizer.json", HF_TOKENIZER_CONFIG, "special_tokens_map.json", "chat_template.jinja")


@dataclass
class ExportResult:
    out_dir: Path
    architecture: str
    files: list[str]
    notes: list[str] = field(default_factory=list)  # the exact rewrites export_equivalent applied


def moelab_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors a moelab model of `cfg` saves (a tied LM head once),
    without allocating it."""
    from moelab.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def _moe_layers(cfg: ModelConfig) -> list[int]:
    return [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]


def export_equivalent(
    arch: Architecture, cfg: ModelConfig, state: dict[str, torch.Tensor]
) -> tuple[ModelConfig, dict[str, torch.Tensor], list[str]]:
    """`cfg` and its weights rewritten into a form `arch` can hold that computes exactly the same
    function, with a note per rewrite. Each rewrite is exact in floating point:

    - route_scale is folded into the routed experts' down projections (the expert output is linear
      in down_proj), since no architecture has a routing scale;
    - an unused selection bias (bias_update_rate > 0, all biases zero) is dropped;
    - Qwen2-MoE only: an ungated shared expert gets a zero gate weight (sigmoid(0) = 1/2) and a doubled
      down projection; no shared expert becomes one of hidden size 1 with zero weights (output 0).
    """
    state = dict(state)
    notes: list[str] = []
    moe = cfg.moe
    if moe is None:
        return cfg, state, notes
    if moe.route_scale != 1.0:
        for i in _moe_layers(cfg):
            name = f"blocks.{i}.ffn.experts.down_proj"
            state[name] = state[name] * moe.route_scale
        notes.append(f"route_scale {moe.route_scale:g} folded into the routed experts' down projections")
        cfg = with_moe(cfg, route_scale=1.0)
    if moe.bias_update_rate > 0:
        cfg = with_moe(cfg, bias_update_rate=0.0)  # unexportable_state refused a bias in use
    if arch.name == "qwen2_moe":
        D = cfg.d_model
        if cfg.moe.num_shared_experts and not cfg.moe.shared_expert_gate:
            for i in _moe_layers(cfg):
                state[f"blocks.{i}.ffn.shared_gate.weight"] = torch.zeros(1, D)
                state[f"blocks.{i}.ffn.shared.down_proj.weight"] = (
                    state[f"blocks.{i}.ffn.shared.down_proj.weight"] * 2.0
                )
            notes.append(
                "ungated shared experts written with a zero shared_expert_gate (sigmoid(0) = 1/2) and doubled down projections"
            )
            cfg = with_moe(cfg, shared_expert_gate=True)
        elif not cfg.moe.num_shared_experts:
            for i in _moe_layers(cfg):
                state[f"blocks.{i}.ffn.shared.gate_up_proj.weight"] = torch.zeros(2, D)
                state[f"blocks.{i}.ffn.shared.down_proj.weight"] = torch.zeros(D, 1)
                state[f"blocks.{i}.ffn.shared_gate.weight"] = torch.zeros(1, D)
            notes.append(
                "no shared expert: written as a Qwen2-MoE shared expert of hidden size 1 with zero weights, which adds exactly 0"
            )
            cfg = with_moe(cfg, num_shared_experts=1, shared_expert_hidden=1, shared_expert_gate=True)
    return cfg, state, notes


def unexportable_state(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> list[str]:
    """Weights no architecture can express: a selection bias in use."""
    if cfg.moe is None or cfg.moe.bias_update_rate <= 0:
        return []
    biased = [n for n, t in state.items() if n.endswith(MOELAB_ONLY) and bool(t.abs().max() > 0)]
    if not biased:
        return []
    return [
        f"model.moe.bias_update_rate = {cfg.moe.bias_update_rate:g} with non-zero expert selection biases ({biased[0]}, ...): "
        "auxiliary-loss-free balancing changes which experts are chosen, and no supported architecture has such a bias"
    ]


def plan_export(
    cfg: ModelConfig, state: dict[str, torch.Tensor], arch: str | None = None
) -> tuple[Architecture, ModelConfig, dict[str, torch.Tensor], list[keymap.Slot], list[str]]:
    """Choose the architecture (or check the one asked for) and map the weights onto it.

    Returns (architecture, equivalent config, equivalent state, slots, notes); raises MoelabError
    naming every setting that stands in the way."""
    reasons = unexportable(cfg) + unexportable_state(cfg, state)
    if reasons:
        raise MoelabError("cannot export: no Hugging Face architecture expresses " + "; ".join(reasons))
    tried = [get_architecture(arch)] if arch else candidates(cfg)
    refusals = []
    for architecture in tried:
        cfg2, state2, notes = export_equivalent(architecture, cfg, state)
        problems = architecture.problems(cfg2)
        if problems:
            refusals.append(f"{architecture.name} cannot hold " + ", ".join(problems))
            continue
        shapes = moelab_shapes(cfg2)
        wrong = [n for n in shapes if n not in state2 or tuple(state2[n].shape) != shapes[n]]
        if wrong or len(shapes) != len(state2):
            raise MoelabError(
                f"internal error: the weights do not fit the {architecture.name} form of the model ({wrong[:3]})"
            )
        moe = cfg2.moe
        slots = keymap.expand(architecture.keymap, state2, cfg2.n_layers, moe.num_experts if moe else 0)
        left = [n for n in keymap.uncovered(slots, state2) if not n.endswith(MOELAB_ONLY)]
        if left:  # a feature problems() missed: refuse rather than drop weights
            refusals.append(f"{architecture.name} has no place for {', '.join(left[:4])}")
            continue
        return architecture, cfg2, state2, slots, notes
    raise MoelabError("cannot export: " + "; ".join(refusals))


def export_hf(
    run: str | Path,
    out: str | Path,
    arch: str | None = None,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> ExportResult:
    """Export a run (its newest checkpoint) or one checkpoint to the Hugging Face directory `out`."""
    if dtype not in DTYPES:
        raise MoelabError(f"--dtype {dtype!r} is not allowed: one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MoelabError(f"output directory {out} exists and is not empty; choose a new or empty directory")
    loaded = load_model(run)
    cfg = loaded.cfg.model
    architecture, cfg2, state, slots, notes = plan_export(cfg, model_state(loaded.model), arch)
    tensors = {name: t.to(DTYPES[dtype]) for name, t in keymap.to_hf(state, slots).items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        files = write_safetensors(tensors, tmp, max_shard_bytes)
        tokens = _write_tokenizer(loaded.run.path, loaded.tokenizer, cfg.max_seq_len, tmp)
        config = architecture.to_hf_config(cfg2)
        config.update(
            {
                "bos_token_id": tokens["bos"],
                "eos_token_id": tokens["eos"],
                "pad_token_id": tokens["pad"],
                "dtype": dtype,
            }
        )
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", tokens["generation"])
        files += ["config.json", "generation_config.json"] + tokens["files"]
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, architecture.name, sorted(files), notes)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _write_tokenizer(run_dir: Path, tokenizer: TextTokenizer, max_len: int, out: Path) -> dict[str, Any]:
    """Tokenizer files and special-token ids. A run imported from Hugging Face gives back the files
    it came with; a moelab tokenizer gets its ChatML template and special tokens."""
    tokenizer.save(out / "tokenizer.json")
    files = ["tokenizer.json"]
    imported = (run_dir / HF_TOKENIZER_CONFIG).is_file()
    if imported:
        for name in HF_TOKENIZER_FILES[1:]:
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, out / name)
                files.append(name)
        config = json.loads((out / HF_TOKENIZER_CONFIG).read_text(encoding="utf-8"))
        bos = config.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        bos_id = tokenizer.tokenizer.token_to_id(bos) if bos else None
        eos_ids: int | list[int] = tokenizer.eos_id
        generation = run_dir / "generation_config.json"
        generation = json.loads(generation.read_text(encoding="utf-8")) if generation.is_file() else {}
    else:
        special = {
            "bos_token": None,
            "eos_token": EOS,
            "pad_token": PAD,
            "unk_token": None,
            "additional_special_tokens": [IM_START, IM_END],
        }
        _write_json(
            out / HF_TOKENIZER_CONFIG,
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                **special,
                "model_max_length": max_len,
                "clean_up_tokenization_spaces": False,
                "chat_template": CHAT_TEMPLATE,
            },
        )
        _write_json(out / "special_tokens_map.json", {k: v for k, v in special.items() if v is not None})
        files += [HF_TOKENIZER_CONFIG, "special_tokens_map.json"]
        bos_id = None
        # a chat reply ends with <|im_end|>, a document with <|endoftext|>: generation stops at either
        eos_ids = [tokenizer.eos_id, tokenizer.token_id(IM_END)]
        generation = {}
    generation = {
        **generation,
        "bos_token_id": bos_id,
        "eos_token_id": generation.get("eos_token_id", eos_ids),
        "pad_token_id": tokenizer.pad_id,
    }
    return {"bos": bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id, "generation": generation, "files": files}
