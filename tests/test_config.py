"""Config validation names the field, the value and what is allowed; overrides and TOML round-trip."""

from __future__ import annotations

import pytest

from moelab.config import RunConfig, build_config, load_config, preset_names
from moelab.errors import ConfigError


def build(**sections) -> RunConfig:
    return build_config(sections)


@pytest.mark.parametrize(
    "overrides,field,allowed",
    [
        ({"model": {"moe": {"num_experts": 4, "top_k": 5}}}, "model.moe.top_k", "at most num_experts (4)"),
        ({"model": {"d_model": 100, "n_heads": 3}}, "model.d_model", "multiple of n_heads (3)"),
        ({"model": {"moe": {"capacity_factor": 0.0}}}, "model.moe.capacity_factor", "a number > 0"),
        ({"model": {"moe": {"capacity_factor": -1.5}}}, "model.moe.capacity_factor", "a number > 0"),
        ({"model": {"moe": {"scoring": "relu"}}}, "model.moe.scoring", "one of ('softmax', 'sigmoid')"),
        ({"model": {"moe": {"routing": "hash"}}}, "model.moe.routing", "one of ('token_choice', 'expert_choice')"),
        ({"model": {"n_heads": 4, "n_kv_heads": 3}}, "model.n_kv_heads", "a divisor of n_heads (4)"),
        ({"data": {"seq_len": 512}}, "data.seq_len", "at most model.max_seq_len"),
        ({"train": {"schedule": "linear"}}, "train.schedule", "one of"),
        ({"model": {"n_layers": 2, "moe": {"first_dense": 2}}}, "model.moe.first_dense", "fewer than n_layers"),
    ],
)
def test_impossible_settings_name_field_value_and_allowed(overrides, field, allowed) -> None:
    with pytest.raises(ConfigError) as info:
        build(**overrides)
    message = str(info.value)
    assert info.value.field == field
    assert message.startswith(field)
    assert allowed in message
    assert repr(info.value.value) in message


def test_unknown_key_and_wrong_type() -> None:
    with pytest.raises(ConfigError, match=r"model.moe.num_expert = 8 .*takes num_experts"):
        build(model={"moe": {"num_expert": 8}})
    with pytest.raises(ConfigError, match=r"train.lr = 'fast' .*a number"):
        build(train={"lr": "fast"})
    with pytest.raises(ConfigError, match=r"model.n_layers = 2.5 .*an integer"):
        build(model={"n_layers": 2.5})
    with pytest.raises(ConfigError, match=r"model.tie_embeddings = 1 .*true or false"):
        build(model={"tie_embeddings": 1})


def test_presets_load_and_overrides_apply() -> None:
    names = preset_names()
    assert {"small-moe", "small-dense", "tiny"} <= set(names)
    for name in names:
        load_config(preset=name)
    cfg = load_config(
        preset="small-moe", overrides=["model.moe.num_experts=16", "train.lr=1e-3", "data.source=/tmp/x.txt"]
    )
    assert cfg.model.moe.num_experts == 16
    assert cfg.train.lr == 1e-3
    assert cfg.data.source == "/tmp/x.txt"
    dense = load_config(preset="small-moe", overrides=["model.moe=none"])
    assert dense.model.moe is None
    with pytest.raises(ConfigError, match="--preset"):
        load_config(preset="nope")


def test_toml_round_trip(tmp_path) -> None:
    cfg = load_config(preset="small-moe", overrides=["model.moe.capacity_factor=1.25"])
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    again = load_config(path)
    assert again == cfg


def test_toml_round_trip_with_lists_and_quoting(tmp_path) -> None:
    cfg = load_config(
        preset="tiny",
        overrides=[
            'data.glob=["*.py", "*.txt"]',
            'train.report_to=["tensorboard", "wandb"]',
            'data.source="C:\\\\data\\\\a \\"quoted\\" dir"',
        ],
    )
    assert cfg.data.glob == ["*.py", "*.txt"] and cfg.train.report_to == ["tensorboard", "wandb"]
    text = cfg.to_toml()
    assert "[model.moe]" in text and "report_to = [" in text
    path = tmp_path / "config.toml"
    path.write_text(text)
    assert load_config(path) == cfg
    assert load_config(path).to_toml() == text


def test_report_to_takes_known_tracker_names_once() -> None:
    assert build().train.report_to == []
    with pytest.raises(ConfigError, match=r"train.report_to = \['wandb', 'wandb'\].*distinct"):
        build(train={"report_to": ["wandb", "wandb"]})
    with pytest.raises(ConfigError, match=r"train.report_to = \['comet'\].*one of \('tensorboard', 'wandb'\)"):
        build(train={"report_to": ["comet"]})


@pytest.mark.parametrize(
    "setting",
    [
        "train.weight_decay=inf",
        "model.init_std=inf",
        "model.rope_theta=inf",
        "train.lr=nan",
        "monitor.spike_sigma=-inf",
    ],
)
def test_non_finite_numbers_are_refused_for_every_field(setting) -> None:
    field = setting.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config(preset="tiny", overrides=[setting])
    assert field in str(err.value) and "a finite number" in str(err.value)
