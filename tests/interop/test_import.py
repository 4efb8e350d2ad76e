"""Import: tiny random checkpoints built with transformers' own classes load into moelab with the
same logits (fp32, <= 1e-4) and the same greedy tokens; malformed or unsupported ones are refused
naming the file and the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moelab.cli import main
from moelab.errors import MoelabError
from moelab.interop.importer import import_hf, load_hf_checkpoint
from moelab.rundir import load_model
from tests.interop.conftest import LOGIT_TOL, greedy, hf_greedy, hf_tokenizer, perturb_

COMMON = dict(
    vocab_size=300,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=258,
)

# name -> (config class, model class, settings beyond COMMON, what the import must find)
CASES = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    ),
    "qwen2_moe": (  # shared expert with its gate, qkv bias, no renormalisation, a dense first layer
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            intermediate_size=64,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[0],
            norm_topk_prob=False,
        ),
    ),
    "qwen3_moe": (  # per-head q/k norm, head_dim != hidden / heads, MoE every second layer, renormalised
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            intermediate_size=64,
            moe_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=2,
            head_dim=16,
        ),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(intermediate_size=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False),
    ),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(intermediate_size=64, tie_word_embeddings=True)),
}


def build_hf(transformers, name: str, out, seed: int = 0, **changes):
    """Save a tiny random `name` checkpoint (weights and tokenizer) into `out`; returns the model."""
    config_cls, model_cls, settings = CASES[name]
    config = getattr(transformers, config_cls)(**{**COMMON, **settings, **changes})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    perturb_(model, seed)
    model.save_pretrained(out)
    hf_tokenizer(transformers, out)
    return model


@pytest.mark.parametrize("name", list(CASES))
def test_import_matches_transformers_logits_and_greedy_tokens(transformers, tmp_path, name) -> None:
    hf_model = build_hf(transformers, name, tmp_path / "hf")
    result = import_hf(tmp_path / "hf", tmp_path / "run")
    assert result.architecture == name
    loaded = load_model(tmp_path / "run")  # what eval / generate / serve read
    ids = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = loaded.model(ids).logits
    diff = float((expected - got).abs().max())
    print(f"{name}: import max |logit diff| {diff:.2e}")
    assert diff <= LOGIT_TOL
    assert float(expected.abs().max()) > 0.5  # logits are not trivially small
    prompt = loaded.tokenizer.encode("def main():")
    assert greedy(loaded.model, prompt, 12) == hf_greedy(hf_model, prompt, 12)
    # the imported tokenizer keeps its own special tokens
    assert (loaded.tokenizer.eos_token, loaded.tokenizer.pad_token) == ("</s>", "<pad>")
    assert loaded.tokenizer.eos_id == 257 and loaded.step == 0


def test_import_reads_the_settings_each_architecture_implies(transformers, tmp_path) -> None:
    build_hf(transformers, "qwen2_moe", tmp_path / "q2")
    cfg = load_hf_checkpoint(tmp_path / "q2").cfg
    assert cfg.qkv_bias and cfg.qk_norm == "none" and cfg.rope_theta == 5000.0
    moe = cfg.moe
    assert (moe.num_shared_experts, moe.shared_expert_hidden, moe.shared_expert_gate) == (1, 24, True)
    assert (moe.first_dense, moe.every, moe.renormalize, moe.expert_hidden) == (1, 1, False, 16)
    build_hf(transformers, "qwen3_moe", tmp_path / "q3")
    cfg = load_hf_checkpoint(tmp_path / "q3").cfg
    assert cfg.qk_norm == "head" and cfg.resolved_head_dim == 16 and cfg.moe.every == 2 and cfg.moe.renormalize
    build_hf(transformers, "olmoe", tmp_path / "olmoe")
    cfg = load_hf_checkpoint(tmp_path / "olmoe", max_seq_len=32).cfg
    assert cfg.qk_norm == "full" and cfg.max_seq_len == 32 and not cfg.moe.renormalize


def test_import_cli_writes_a_complete_run(transformers, tmp_path, capsys) -> None:
    build_hf(transformers, "mixtral", tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "mixtral" in out and str(tmp_path / "run") in out
    # the run directory is complete: config, tokenizer files, a verified step-0 checkpoint
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.toml", "tokenizer.json", "tokenizer_config.json", "data.json", "checkpoints"} <= names
    assert json.loads((tmp_path / "run" / "data.json").read_text())["origin"].startswith("import: ")


# ---------------------------------------------------------------------------------------------
# Malformed and unsupported checkpoints


@pytest.fixture(scope="module")
def base_hf(transformers, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "mixtral"
    build_hf(transformers, "mixtral", out)
    return out


def edited(base, tmp_path, config: dict | None = None, drop=(), add: dict | None = None):
    """A copy of `base` with config.json keys changed and tensors dropped or added."""
    out = tmp_path / "edited"
    shutil.copytree(base, out)
    if config:
        data = json.loads((out / "config.json").read_text())
        data.update(config)
        (out / "config.json").write_text(json.dumps(data))
    if drop or add:
        tensors = load_file(out / "model.safetensors")
        for name in drop:
            tensors.pop(name)
        tensors.update(add or {})
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def refused(hf_dir, tmp_path, *fragments, **kwargs) -> str:
    with pytest.raises(MoelabError) as info:
        import_hf(hf_dir, tmp_path / "run", **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert not (tmp_path / "run").exists()  # nothing half-written
    return message


def test_unsupported_settings_are_refused_naming_the_file_and_key(base_hf, tmp_path) -> None:
    cases = [
        ({"model_type": "gpt2"}, ["config.json", "model_type", "gpt2"]),
        (
            {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}},
            ["config.json", "rope_parameters", "linear"],
        ),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, ["rope_scaling", "dynamic"]),
        ({"sliding_window": 16}, ["config.json", "sliding_window"]),
        ({"hidden_act": "gelu"}, ["hidden_act", "gelu"]),
        ({"quantization_config": {"quant_method": "gptq"}}, ["quantization_config"]),
        ({"num_local_experts": 0}, ["num_local_experts"]),
    ]
    for i, (change, fragments) in enumerate(cases):
        case_dir = tmp_path / f"case{i}"
        case_dir.mkdir()
        refused(edited(base_hf, case_dir, config=change), case_dir, *fragments)


def test_sliding_window_covering_the_context_is_accepted(base_hf, tmp_path) -> None:
    hf_dir = edited(base_hf, tmp_path, config={"sliding_window": 16})
    assert load_hf_checkpoint(hf_dir, max_seq_len=16).cfg.max_seq_len == 16


def test_architecture_specific_refusals(transformers, tmp_path) -> None:
    build_hf(transformers, "olmoe", tmp_path / "olmoe", clip_qkv=8.0)
    refused(tmp_path / "olmoe", tmp_path, "clip_qkv")
    build_hf(transformers, "llama", tmp_path / "llama", attention_bias=True)
    refused(tmp_path / "llama", tmp_path, "attention_bias")
    build_hf(transformers, "qwen2_moe", tmp_path / "qwen2", mlp_only_layers=[1])
    refused(tmp_path / "qwen2", tmp_path, "mlp_only_layers")


def test_missing_unexpected_and_misshapen_tensors_are_named(base_hf, tmp_path) -> None:
    gone = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    refused(edited(base_hf, tmp_path / "a", drop=[gone]), tmp_path / "a", gone, "lack")
    extra = "model.layers.0.self_attn.q_norm.weight"
    message = refused(
        edited(base_hf, tmp_path / "b", add={extra: torch.ones(32)}), tmp_path / "b", extra, "model.safetensors"
    )
    assert "does not describe" in message
    message = refused(
        edited(base_hf, tmp_path / "c", config={"num_key_value_heads": 4}),
        tmp_path / "c",
        "model.safetensors",
        "k_proj",
        "shape",
    )
    nan = {"model.norm.weight": torch.full((32,), float("nan"))}
    refused(edited(base_hf, tmp_path / "d", add=nan), tmp_path / "d", "model.norm.weight", "NaN")


def test_broken_files_are_named(base_hf, tmp_path) -> None:
    refused(tmp_path / "no-such-dir", tmp_path, "not a local directory")
    refused("mistralai/Mixtral-8x7B-v0.1", tmp_path, "never the network")
    hf_dir = edited(base_hf, tmp_path / "a")
    (hf_dir / "config.json").write_text("{not json")
    refused(hf_dir, tmp_path / "a", "config.json", "not valid JSON")
    hf_dir = edited(base_hf, tmp_path / "b")
    data = (hf_dir / "model.safetensors").read_bytes()
    (hf_dir / "model.safetensors").write_bytes(data[:100])
    refused(hf_dir, tmp_path / "b", "model.safetensors", "not a readable safetensors file")
    hf_dir = edited(base_hf, tmp_path / "c")
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")
    refused(hf_dir, tmp_path / "c", "pytorch_model.bin", "safetensors")
    hf_dir = edited(base_hf, tmp_path / "d")
    (hf_dir / "tokenizer.json").unlink()
    refused(hf_dir, tmp_path / "d", "tokenizer.json", "missing")
    hf_dir = edited(base_hf, tmp_path / "e")
    (hf_dir / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}})
    )
    refused(hf_dir, tmp_path / "e", "model.safetensors.index.json", "missing")


def test_cli_bad_input_is_one_line_naming_the_file(base_hf, tmp_path, capsys) -> None:
    hf_dir = edited(base_hf, tmp_path, config={"rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    assert main(["import", str(hf_dir), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("moelab: error:") and str(hf_dir / "config.json") in err


def test_imported_model_evaluates_and_fine_tunes_with_its_own_tokenizer(transformers, tmp_path, capsys) -> None:
    """`moelab eval` and `moelab train --resume` tokenise text with the imported tokenizer."""
    build_hf(transformers, "mixtral", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run", max_seq_len=64)
    text = tmp_path / "text.txt"
    text.write_text("".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(400)))
    run = str(tmp_path / "run")
    assert main(["eval", run, "--data", str(text), "--json", "--batches", "2"]) == 0
    before = json.loads(capsys.readouterr().out)["val_loss"]
    overrides = [
        "--set",
        "train.max_steps=30",
        "--set",
        "train.batch_size=8",
        "--set",
        "train.eval_every=30",
        "--set",
        "train.sample_tokens=0",
        "--set",
        "data.seq_len=32",
    ]
    # an imported run has read no data yet, so --data may point it at the text
    assert main(["train", "--out", run, "--resume", "--data", str(text), "--quiet", *overrides]) == 0
    capsys.readouterr()
    assert main(["eval", run, "--json", "--batches", "2"]) == 0
    after = json.loads(capsys.readouterr().out)["val_loss"]
    assert after < before - 0.5


@pytest.mark.parametrize(
    "change, fragments",
    [
        ({"vocab_size": 10**9}, ["vocab_size", "at most"]),
        ({"hidden_size": 10**7, "intermediate_size": 10**7}, ["d_model", "at most"]),
        ({"num_hidden_layers": 10**6}, ["n_layers", "at most"]),
        ({"max_position_embeddings": 10**9}, ["max_seq_len", "at most"]),
        ({"num_local_experts": 10**6}, ["num_experts", "at most"]),
        # within every ceiling, yet far beyond this machine: refused by the memory check
        ({"vocab_size": 1 << 22, "hidden_size": 1 << 16, "num_attention_heads": 64}, ["needs about", "GiB"]),
    ],
)
def test_hostile_sizes_are_refused_before_allocating(base_hf, tmp_path, change, fragments) -> None:
    import resource
    import time

    hf_dir = edited(base_hf, tmp_path, config=change)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    refused(hf_dir, tmp_path, "config.json", *fragments)
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200 * 1024  # KiB: under 200 MiB
