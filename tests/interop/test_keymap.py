"""The key maps: every tensor element has exactly one place, the maps read both ways, the config
defaults match transformers, and the parity tests catch a swapped key."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moelab.checkpoint import model_state
from moelab.config import build_config
from moelab.interop import keymap
from moelab.interop.architectures import ARCHITECTURES, DEFAULTS, MIXTRAL_MOE
from moelab.interop.export import export_hf, plan_export
from moelab.model import Transformer
from tests.interop.conftest import LOGIT_TOL, perturb_, write_moelab_run
from tests.interop.test_export import BASE, CASES

CONFIG_CLASSES = {
    "llama": "LlamaConfig",
    "mixtral": "MixtralConfig",
    "qwen2_moe": "Qwen2MoeConfig",
    "qwen3_moe": "Qwen3MoeConfig",
    "olmoe": "OlmoeConfig",
}


def test_defaults_match_transformers_config_classes(transformers) -> None:
    for arch, class_name in CONFIG_CLASSES.items():
        cls = getattr(transformers, class_name)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, ours in DEFAULTS[arch].items():
            if key == "rope_theta":
                theirs = cls().rope_parameters["rope_theta"]
            elif key in fields:
                field = fields[key]
                theirs = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            else:
                theirs = None  # a key the class does not know is absent
            assert ours == theirs, (arch, key, ours, theirs)


@pytest.mark.parametrize("name", list(CASES))
def test_every_element_has_exactly_one_place_and_the_map_reads_both_ways(name) -> None:
    settings, arch, _ = CASES[name]
    cfg = build_config(
        {"model": {**BASE, **settings, "vocab_size": 40, "max_seq_len": 16}, "data": {"seq_len": 8}}
    ).model
    model = Transformer(cfg)
    perturb_(model)
    architecture, cfg2, state, slots, _ = plan_export(cfg, model_state(model))
    assert architecture.name == arch
    assert len({s.hf for s in slots}) == len(slots)  # no Hugging Face name twice
    hf = keymap.to_hf(state, slots)
    counts = {n: torch.zeros_like(t) for n, t in state.items()}
    back = {n: torch.full_like(t, float("nan")) for n, t in state.items()}
    for slot in slots:
        keymap.take(counts[slot.ours], slot).add_(1)
        keymap.put(back[slot.ours], slot, hf[slot.hf])
    for n, t in state.items():
        if n.endswith("expert_bias"):
            continue  # moelab-only; zero, never exported
        assert bool((counts[n] == 1).all()), n  # every element exactly once
        assert torch.equal(back[n], t), n  # and read back bit for bit


def test_the_parity_check_catches_a_swapped_key(transformers, tmp_path, monkeypatch) -> None:
    """Meta-test: with gate and up swapped in the Mixtral key map (an easy slip), export still
    loads but the logits disagree far beyond the tolerance."""
    run, model = write_moelab_run(
        tmp_path / "run", {**BASE, "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 16}}
    )
    swapped = tuple(
        (hf, ours, {keymap.GATE: keymap.UP, keymap.UP: keymap.GATE}.get(part, part))
        for hf, ours, part in ARCHITECTURES["mixtral"].keymap
    )
    assert any(t in MIXTRAL_MOE for t in ARCHITECTURES["mixtral"].keymap)
    monkeypatch.setattr(type(ARCHITECTURES["mixtral"]), "keymap", swapped)
    export_hf(run, tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 259, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float((hf_model(ids).logits - model(ids).logits).abs().max()) > 100 * LOGIT_TOL
