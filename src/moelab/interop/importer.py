"""`moelab import HF_DIR OUT_RUN_DIR`: a Hugging Face checkpoint in a local directory as a moelab run.

Reads config.json (architecture and settings; anything moelab cannot compute exactly is refused,
naming the file and the key), the safetensors weights (renamed through the architecture's key map,
the same table export uses) and the tokenizer (tokenizer.json, with the end-of-text and padding
tokens named by tokenizer_config.json). Nothing is fetched: HF_DIR must be a local directory.

The run gets a weights-only checkpoint (see moelab.interop.runs): everything that loads a run's
model (generate, export, upcycle, moelab.rundir.load_model) reads it like any run. Evaluating or
fine-tuning it on text also needs moelab's data pipeline to tokenise with the imported tokenizer,
which it cannot do yet (docs/interop.md, "Limitations").
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from moelab.config import DataConfig, ModelConfig, RunConfig
from moelab.data.tokenizer import HF_TOKENIZER_CONFIG, TextTokenizer, special_tokens_in
from moelab.device import check_fits
from moelab.errors import ConfigError, MoelabError
from moelab.interop import keymap
from moelab.interop.architectures import (
    IGNORED_SUFFIXES,
    MOELAB_ONLY,
    Architecture,
    read_hf_config,
)
from moelab.interop.export import HF_TOKENIZER_FILES, moelab_shapes
from moelab.interop.runs import check_new_run_dir, write_fresh_run
from moelab.interop.weights import WeightFiles
from moelab.model import Transformer
from moelab.model.accounting import param_counts


@dataclass
class HFCheckpoint:
    """A Hugging Face checkpoint loaded as a moelab model (eval mode, fp32)."""

    dir: Path
    architecture: Architecture
    cfg: ModelConfig
    model: Transformer


@dataclass
class ImportResult:
    run_dir: Path
    architecture: str
    params: int
    tokenizer_vocab: int


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MoelabError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MoelabError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MoelabError(f"{path} is not a JSON object")
    return data


def _local_dir(hf_dir: str | Path) -> Path:
    path = Path(hf_dir)
    if not path.is_dir():
        raise MoelabError(
            f"{path} is not a local directory: moelab import reads a downloaded checkpoint and never the network "
            "(download it first, e.g. `hf download ORG/NAME --local-dir DIR`)"
        )
    return path


def load_hf_checkpoint(hf_dir: str | Path, max_seq_len: int | None = None) -> HFCheckpoint:
    """Build the moelab model of a Hugging Face checkpoint directory and load its weights.

    max_seq_len overrides config.json's max_position_embeddings (moelab keeps rotary tables and
    KV caches of that length)."""
    hf_dir = _local_dir(hf_dir)
    config_path = hf_dir / "config.json"
    raw = _read_json(config_path)
    if max_seq_len is not None:
        if max_seq_len < 1:
            raise MoelabError(f"--max-seq-len {max_seq_len} is not allowed: an integer >= 1")
        raw["max_position_embeddings"] = max_seq_len
    arch, cfg = read_hf_config(raw, config_path)
    try:
        cfg.validate()  # the size ceilings, before anything is allocated
    except ConfigError as exc:
        raise MoelabError(f"{config_path}: {exc}") from None
    # NOTE: the state read from the files, the model it goes into, and the copy load_state_dict makes
    params = param_counts(cfg).total
    check_fits(3 * 4 * params, f"importing {config_path} ({params:,} parameters in fp32)")
    state = load_hf_weights(hf_dir, arch, cfg)
    model = Transformer(cfg)
    model.load_state_dict(state, strict=False)  # keys checked by load_hf_weights; a tied head follows the embedding
    model.eval()
    return HFCheckpoint(hf_dir, arch, cfg, model)


def load_hf_weights(hf_dir: Path, arch: Architecture, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """moelab state dict (fp32) from the safetensors weights of `hf_dir`, through `arch`'s key map."""
    shapes = moelab_shapes(cfg)
    slots = keymap.expand(arch.keymap, shapes, cfg.n_layers, cfg.moe.num_experts if cfg.moe else 0)
    left = [n for n in keymap.uncovered(slots, shapes) if not n.endswith(MOELAB_ONLY)]
    if left:
        raise MoelabError(f"internal error: the {arch.name} key map has no source for {left[:4]}")
    state = {name: torch.zeros(shape) for name, shape in shapes.items()}  # selection biases stay zero
    with WeightFiles(hf_dir) as files:
        available = set(files.names())
        expected = {s.hf for s in slots}
        missing = [s.hf for s in slots if s.hf not in available]
        if missing:
            raise MoelabError(
                f"{hf_dir}: the weights lack {len(missing)} tensors that config.json implies, e.g. {', '.join(missing[:3])}"
            )
        ignorable = lambda n: n.endswith(IGNORED_SUFFIXES) or (cfg.tie_embeddings and n == "lm_head.weight")
        unexpected = sorted(n for n in available - expected if not ignorable(n))
        if unexpected:
            raise MoelabError(
                f"{files.file_of(unexpected[0])}: {len(unexpected)} tensors that config.json does not describe "
                f"(model_type {arch.name}), e.g. {', '.join(unexpected[:3])}"
            )
        for slot in slots:
            want = keymap.slot_shape(shapes[slot.ours], slot)
            got = files.shape(slot.hf)
            if got != want:
                raise MoelabError(
                    f"{files.file_of(slot.hf)}: {slot.hf} has shape {list(got)}, but config.json implies {list(want)}"
                )
            tensor = files.read(slot.hf)
            if not tensor.is_floating_point():
                raise MoelabError(
                    f"{files.file_of(slot.hf)}: {slot.hf} has dtype {tensor.dtype}; moelab loads floating-point weights only"
                )
            tensor = tensor.float()
            if not bool(torch.isfinite(tensor).all()):
                raise MoelabError(f"{files.file_of(slot.hf)}: {slot.hf} contains NaN or infinite values")
            keymap.put(state[slot.ours], slot, tensor)
    return state


def load_hf_tokenizer(hf_dir: Path, config: dict[str, Any]) -> tuple[TextTokenizer, dict[str, Any]]:
    """The tokenizer of `hf_dir` and the tokenizer_config.json to keep with it (naming eos / pad;
    when the file lacks them, they are taken from generation_config.json or config.json)."""
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise MoelabError(
            f"{path} is missing: moelab needs the fast-tokenizer file (save it with "
            "AutoTokenizer.from_pretrained(...).save_pretrained(DIR) from a transformers install)"
        )
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a plain Exception on malformed JSON
        raise MoelabError(f"{path} cannot be read: {exc}") from None
    config_path = hf_dir / HF_TOKENIZER_CONFIG
    tok_config = _read_json(config_path) if config_path.is_file() else {}
    eos, pad = special_tokens_in(tok_config, config_path)  # as TextTokenizer.load will read them
    if eos is None:
        generation = hf_dir / "generation_config.json"
        ids = (_read_json(generation) if generation.is_file() else {}).get("eos_token_id", config.get("eos_token_id"))
        eos_id = ids[0] if isinstance(ids, list) and ids else ids
        eos = tokenizer.id_to_token(eos_id) if isinstance(eos_id, int) else None
        if eos is None:
            raise MoelabError(
                f"{config_path} names no eos_token, and neither generation_config.json nor config.json has an eos_token_id in the vocabulary"
            )
        pad_id = config.get("pad_token_id")
        pad = tokenizer.id_to_token(pad_id) if isinstance(pad_id, int) else None
        tok_config = {**tok_config, "eos_token": eos, "pad_token": pad}
    try:
        text_tokenizer = TextTokenizer(tokenizer, eos, pad)
    except MoelabError as exc:
        raise MoelabError(f"{path}: {exc} (named by {config_path.name})") from None
    return text_tokenizer, tok_config


def import_hf(hf_dir: str | Path, out: str | Path, max_seq_len: int | None = None) -> ImportResult:
    """Import the Hugging Face checkpoint in local directory `hf_dir` as the moelab run `out`."""
    hf_dir = _local_dir(hf_dir)
    check_new_run_dir(out)  # the cheap checks before the weights
    tokenizer, tok_config = load_hf_tokenizer(hf_dir, _read_json(hf_dir / "config.json"))
    checkpoint = load_hf_checkpoint(hf_dir, max_seq_len)
    cfg = checkpoint.cfg
    if tokenizer.vocab_size > cfg.vocab_size:
        raise MoelabError(
            f"{hf_dir / 'tokenizer.json'} has {tokenizer.vocab_size} tokens, more than config.json's vocab_size {cfg.vocab_size}"
        )
    # Fine-tuning and evaluating tokenise text with the imported tokenizer (kept in the run).
    data = DataConfig(tokenizer="file", tokenizer_file=str((Path(out) / "tokenizer.json").resolve()))
    data.seq_len = min(data.seq_len, cfg.max_seq_len)
    run_cfg = RunConfig(model=cfg, data=data).validate()
    with tempfile.TemporaryDirectory() as tmp:
        files = {
            name: hf_dir / name for name in (*HF_TOKENIZER_FILES, "generation_config.json") if (hf_dir / name).is_file()
        }
        files[HF_TOKENIZER_CONFIG] = Path(tmp) / HF_TOKENIZER_CONFIG
        files[HF_TOKENIZER_CONFIG].write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")
        source = f"import: {hf_dir.resolve()} ({checkpoint.architecture.name})"
        run = write_fresh_run(out, run_cfg, checkpoint.model, files, source)
    params = sum(p.numel() for p in checkpoint.model.parameters())
    return ImportResult(run.path, checkpoint.architecture.name, params, tokenizer.vocab_size)
