"""Export: moelab models load in transformers with no custom code, no missing or unexpected keys,
the same logits (fp32, <= 1e-4) and the same greedy tokens; the tokenizer loads with AutoTokenizer;
what no architecture can express is refused naming the setting."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from moelab.cli import main
from moelab.data.tokenizer import bytes_tokenizer
from moelab.errors import MoelabError
from moelab.infer.chat import render_chat
from moelab.interop.export import export_hf
from moelab.interop.importer import import_hf, load_hf_checkpoint
from moelab.rundir import load_model
from tests.interop.conftest import (
    LOGIT_TOL,
    greedy,
    hf_greedy,
    transformers_warnings,
    write_moelab_run,
)

BASE = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64, "rope_theta": 5000.0}
MOE = {"num_experts": 4, "top_k": 2, "expert_hidden": 16}

# name -> (model settings beyond BASE, architecture chosen, a note the export must make, if any)
CASES = {
    "mixtral": ({"moe": {**MOE, "route_scale": 1.5}, "tie_embeddings": False}, "mixtral", "route_scale"),
    "qwen2_moe_gated_shared": (
        {
            "n_layers": 3,
            "qkv_bias": True,
            "moe": {
                **MOE,
                "num_shared_experts": 2,
                "shared_expert_hidden": 8,
                "shared_expert_gate": True,
                "renormalize": False,
                "first_dense": 1,
            },
        },
        "qwen2_moe",
        None,
    ),
    "qwen2_moe_ungated_shared": ({"moe": {**MOE, "num_shared_experts": 1}}, "qwen2_moe", "zero shared_expert_gate"),
    "qwen2_moe_no_shared": ({"moe": {**MOE, "renormalize": False}}, "qwen2_moe", "hidden size 1 with zero weights"),
    "qwen3_moe": ({"qk_norm": "head", "head_dim": 16, "moe": {**MOE, "every": 2}}, "qwen3_moe", None),
    "olmoe": ({"qk_norm": "full", "moe": {**MOE, "renormalize": False}}, "olmoe", None),
    "llama": ({}, "llama", None),
}


def run_for(tmp_path, name, **extra):
    settings, _, _ = CASES[name]
    return write_moelab_run(tmp_path / "run", {**BASE, **settings, **extra})


def load_hf(transformers, path, **kwargs):
    """AutoModelForCausalLM.from_pretrained, asserting no missing / unexpected / mismatched keys and
    no warnings."""
    with transformers_warnings() as warnings:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    assert not any(info.values()), info
    assert not warnings, [w.getMessage() for w in warnings]
    return model.eval()


@pytest.mark.parametrize("name", list(CASES))
def test_export_loads_in_transformers_with_equal_logits_and_greedy_tokens(transformers, tmp_path, name) -> None:
    _, arch, note = CASES[name]
    run, model = run_for(tmp_path, name)
    result = export_hf(run, tmp_path / "hf")
    assert result.architecture == arch
    if note:
        assert any(note in n for n in result.notes), result.notes
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    } <= files
    hf_model = load_hf(transformers, tmp_path / "hf")
    assert hf_model.config.model_type == arch
    ids = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        got = hf_model(ids).logits
    diff = float((expected - got).abs().max())
    print(f"{name} ({arch}): export max |logit diff| {diff:.2e}")
    assert diff <= LOGIT_TOL
    assert float(expected.abs().max()) > 0.5
    prompt = list("def main():".encode())
    assert hf_greedy(hf_model, prompt, 12) == greedy(model, prompt, 12)
    # and back: importing the export gives the same function
    again = load_hf_checkpoint(tmp_path / "hf").model
    with torch.no_grad():
        assert float((again(ids).logits - expected).abs().max()) <= 1e-5


def test_exported_tokenizer_loads_with_autotokenizer(transformers, tmp_path) -> None:
    run, _ = run_for(tmp_path, "mixtral")
    export_hf(run, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = bytes_tokenizer()
    text = "def f(x):\n    return 'héllo' + \"wörld\" 😀<|endoftext|>"
    assert hf_tok(text)["input_ids"] == ours.encode(text)
    assert hf_tok.decode(ours.encode(text)) == ours.decode(ours.encode(text), skip_special=False)
    assert (hf_tok.eos_token, hf_tok.pad_token, hf_tok.eos_token_id) == ("<|endoftext|>", "<|pad|>", ours.eos_id)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == render_chat(messages)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert config["eos_token_id"] == ours.eos_id and config["pad_token_id"] == ours.pad_id
    assert generation["eos_token_id"] == [ours.eos_id, ours.token_id("<|im_end|>")]


def test_sharded_export_writes_an_index_that_both_sides_read(transformers, tmp_path) -> None:
    run, model = run_for(tmp_path, "mixtral")
    result = export_hf(run, tmp_path / "hf", max_shard_bytes=40_000)
    shards = sorted(p.name for p in (tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    stored = {}
    for shard in shards:
        with safe_open(str(tmp_path / "hf" / shard), "pt") as f:
            stored.update({k: f.get_tensor(k) for k in f.keys()})
    assert index["weight_map"] == {k: v for k, v in index["weight_map"].items() if k in stored} and len(stored) == len(
        index["weight_map"]
    )
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    assert "model.safetensors.index.json" in result.files
    ids = torch.randint(0, 259, (1, 16), generator=torch.Generator().manual_seed(2))
    hf_model = load_hf(transformers, tmp_path / "hf")
    with torch.no_grad():
        expected = model(ids).logits
        assert float((hf_model(ids).logits - expected).abs().max()) <= LOGIT_TOL
        assert float((load_hf_checkpoint(tmp_path / "hf").model(ids).logits - expected).abs().max()) <= 1e-5


def test_bfloat16_export(transformers, tmp_path) -> None:
    run, model = run_for(tmp_path, "llama")
    export_hf(run, tmp_path / "hf", dtype="bfloat16")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    with torch.no_grad():  # the same model with weights rounded to bf16, run in fp32 on both sides
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    hf_model = load_hf(transformers, tmp_path / "hf", dtype=torch.float32)
    ids = torch.randint(0, 259, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert float((hf_model(ids).logits - model(ids).logits).abs().max()) <= LOGIT_TOL


def test_imported_model_exports_back_with_its_own_tokenizer(transformers, tmp_path) -> None:
    from tests.interop.test_import import build_hf

    original = build_hf(transformers, "qwen2_moe", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    export_hf(tmp_path / "run", tmp_path / "again")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["eos_token_id"] == 257 and config["bos_token_id"] == 256
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "again")
    assert (hf_tok.eos_token, hf_tok.pad_token) == ("</s>", "<pad>")
    again = load_hf(transformers, tmp_path / "again")
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert float((again(ids).logits - original(ids).logits).abs().max()) <= LOGIT_TOL


# ---------------------------------------------------------------------------------------------
# Refusals


REFUSALS = {
    "expert_choice": ({"moe": {**MOE, "routing": "expert_choice"}}, None, "model.moe.routing = 'expert_choice'"),
    "capacity": ({"moe": {**MOE, "capacity_factor": 1.25}}, None, "model.moe.capacity_factor = 1.25"),
    "sigmoid": ({"moe": {**MOE, "scoring": "sigmoid"}}, None, "model.moe.scoring = 'sigmoid'"),
    "qk_norm_and_shared": (
        {"qk_norm": "head", "moe": {**MOE, "num_shared_experts": 1}},
        None,
        "q/k norm together with shared experts",
    ),
    "olmoe_dense_layers": ({"qk_norm": "full", "moe": {**MOE, "first_dense": 1}}, None, "first_dense"),
    "mixtral_shared": ({"moe": {**MOE, "num_shared_experts": 1}}, "mixtral", "model.moe.num_shared_experts = 1"),
    "mixtral_no_renorm": ({"moe": {**MOE, "renormalize": False}}, "mixtral", "model.moe.renormalize = false"),
    "llama_for_moe": ({"moe": MOE}, "llama", "llama is dense"),
    "qwen3_without_qk_norm": ({"moe": MOE}, "qwen3_moe", "model.qk_norm = 'none'"),
    "dense_qk_norm": ({"qk_norm": "head"}, None, "Llama has no q/k norm"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_inexpressible_models_are_refused_naming_the_feature(tmp_path, name) -> None:
    settings, arch, fragment = REFUSALS[name]
    run, _ = write_moelab_run(tmp_path / "run", {**BASE, **settings})
    with pytest.raises(MoelabError) as info:
        export_hf(run, tmp_path / "hf", arch=arch)
    assert fragment in str(info.value), str(info.value)
    assert not (tmp_path / "hf").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf")]  # no temporary left behind


def test_selection_bias_is_exported_only_while_unused(tmp_path) -> None:
    settings = {**BASE, "moe": {**MOE, "bias_update_rate": 0.01}}
    run, _ = write_moelab_run(tmp_path / "zero", settings)
    assert export_hf(run, tmp_path / "hf").architecture == "mixtral"  # all biases still zero

    from moelab.checkpoint import model_state
    from moelab.interop.export import plan_export

    loaded = load_model(run)
    loaded.model.blocks[1].ffn.router.expert_bias[0] = 0.5
    with pytest.raises(MoelabError, match="bias_update_rate = 0.01 with non-zero expert selection biases"):
        plan_export(loaded.cfg.model, model_state(loaded.model))


def test_export_cli(tmp_path, capsys) -> None:
    run, _ = run_for(tmp_path, "mixtral")
    assert main(["export", str(run), str(tmp_path / "hf"), "--max-shard-size", "50KB"]) == 0
    out = capsys.readouterr().out
    assert "as mixtral" in out and "model.safetensors.index.json" in out and "note: route_scale" in out
    # a non-empty output directory is refused; so is an inexpressible model, in one line
    assert main(["export", str(run), str(tmp_path / "hf")]) == 2
    assert "not empty" in capsys.readouterr().err
    bad, _ = write_moelab_run(tmp_path / "bad", {**BASE, "moe": {**MOE, "routing": "expert_choice"}})
    assert main(["export", str(bad), str(tmp_path / "hf2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moelab: error:") and "\n" not in err and "expert_choice" in err
    assert main(["export", str(run), str(tmp_path / "hf3"), "--max-shard-size", "lots"]) == 2
    assert "shard size" in capsys.readouterr().err
