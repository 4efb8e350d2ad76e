"""The CLI: bad input gets one clear line and exit code 2 and leaves nothing behind; the
commands work on a trained run."""

from __future__ import annotations

import json

from moelab.cli import main

TINY = ["--preset", "tiny", "--quiet"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_usage_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l.startswith("moelab: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unknown_preset(capsys, tmp_path) -> None:
    code, _, err = run_cli(capsys, "train", "--preset", "huge", "--out", str(tmp_path / "r"))
    assert_usage_error(code, err, "--preset = 'huge'", "small-moe", "tiny")
    assert not (tmp_path / "r").exists()


def test_unknown_config_key_and_wrong_type(capsys, tmp_path) -> None:
    code, _, err = run_cli(capsys, "train", *TINY, "--set", "model.moe.experts=4", "--out", str(tmp_path / "r"))
    assert_usage_error(code, err, "model.moe.experts", "num_experts")
    code, _, err = run_cli(capsys, "train", *TINY, "--set", "train.batch_size=big", "--out", str(tmp_path / "r"))
    assert_usage_error(code, err, "train.batch_size = 'big'", "an integer")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nd_model = 3")
    code, _, err = run_cli(capsys, "train", str(bad), "--out", str(tmp_path / "r"))
    assert_usage_error(code, err, str(bad), "not valid TOML")
    assert not (tmp_path / "r").exists()


def test_missing_and_empty_data(capsys, tmp_path) -> None:
    code, _, err = run_cli(capsys, "train", *TINY, "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "r"))
    assert_usage_error(code, err, "nope.txt", "does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, _, err = run_cli(capsys, "train", *TINY, "--data", str(empty), "--out", str(tmp_path / "r"))
    assert_usage_error(code, err, "holds no text")
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    code, _, err = run_cli(capsys, "train", *TINY, "--data", str(empty_dir), "--out", str(tmp_path / "r"))
    assert_usage_error(code, err, "no files", "data.glob")
    assert not (tmp_path / "r").exists()


def test_corpus_smaller_than_one_batch(capsys, tmp_path) -> None:
    small = tmp_path / "small.txt"
    small.write_text("\n".join(f"line {i} of a very small corpus" for i in range(80)))  # ~2.6 kB
    code, _, err = run_cli(
        capsys, "train", *TINY, "--data", str(small), "--set", "train.batch_size=64", "--out", str(tmp_path / "r")
    )
    assert_usage_error(code, err, "fewer than one batch")
    assert not (tmp_path / "r").exists()


def test_non_utf8_bytes(capsys, tmp_path) -> None:
    data = tmp_path / "latin1.txt"
    data.write_bytes(("caf\u00e9 " * 50).encode("latin-1"))
    code, _, err = run_cli(capsys, "train", *TINY, "--data", str(data), "--out", str(tmp_path / "r"))
    assert_usage_error(code, err, str(data), "not UTF-8", "0xe9", "offset 3")
    assert not (tmp_path / "r").exists()


def test_out_dir_holding_another_run_is_untouched(capsys, tmp_path, tiny_run) -> None:
    before = {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*")}
    code, _, err = run_cli(capsys, "train", *TINY, "--out", str(tiny_run))
    assert_usage_error(code, err, str(tiny_run), "holds another run", "--resume")
    assert {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*")} == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "train", *TINY, "--out", str(other))
    assert_usage_error(code, err, "not empty")
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_resume_refuses_model_changes(capsys, tiny_run) -> None:
    code, _, err = run_cli(capsys, "train", "--out", str(tiny_run), "--resume", "--set", "model.d_model=32")
    assert_usage_error(code, err, "model.d_model", "train.*")


def test_resume_refuses_another_decay_scope(capsys, tiny_run) -> None:
    """The scope sets the optimizer's parameter groups; the resumed optimizer state would keep the
    saved ones, silently ignoring the new scope."""
    before = {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*")}
    code, _, err = run_cli(capsys, "train", "--out", str(tiny_run), "--resume", "--set", "train.decay_scope=ffn")
    assert_usage_error(code, err, "train.decay_scope=ffn", "'all'")
    assert {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*")} == before


def test_jsonl_without_the_field(capsys, tmp_path) -> None:
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "hello"}\n{"body": "no text field"}\n')
    code, _, err = run_cli(capsys, "train", *TINY, "--data", str(data), "--out", str(tmp_path / "r"))
    assert_usage_error(code, err, "docs.jsonl line 2", "'text'")


def test_eval_generate_info_on_a_run(capsys, tiny_run) -> None:
    code, out, _ = run_cli(capsys, "eval", str(tiny_run), "--json", "--batches", "2")
    assert code == 0
    result = json.loads(out)
    assert 0 < result["val_loss"] < 6 and result["step"] == 24
    code, out, _ = run_cli(
        capsys, "generate", str(tiny_run), "--prompt", "import ", "--max-new-tokens", "12", "--temperature", "0"
    )
    assert code == 0 and out.startswith("import ")
    code, again, _ = run_cli(
        capsys, "generate", str(tiny_run), "--prompt", "import ", "--max-new-tokens", "12", "--temperature", "0"
    )
    assert again == out  # greedy is deterministic
    code, out, _ = run_cli(capsys, "info", str(tiny_run), "--json")
    info = json.loads(out)
    assert info["params"]["total"] > info["params"]["active"] > 0
    code, out, _ = run_cli(capsys, "info", "--preset", "small-dense")
    assert code == 0 and "active parameters" in out


def test_generate_bad_input(capsys, tiny_run, tmp_path) -> None:
    code, _, err = run_cli(capsys, "generate", str(tiny_run), "--prompt", "x", "--top-p", "1.5")
    assert_usage_error(code, err, "top_p = 1.5")
    code, _, err = run_cli(capsys, "generate", str(tmp_path), "--prompt", "x")
    assert_usage_error(code, err, "not a moelab run directory")
    code, _, err = run_cli(capsys, "generate", str(tiny_run), "--prompt", "x" * 500)
    assert_usage_error(code, err, "context window is 64")


def test_eval_refuses_non_positive_batch_settings(capsys, tiny_run) -> None:
    code, _, err = run_cli(capsys, "eval", str(tiny_run), "--batch-size", "0")
    assert_usage_error(code, err, "--batch-size 0", ">= 1")
    code, _, err = run_cli(capsys, "eval", str(tiny_run), "--batches", "-2")
    assert_usage_error(code, err, "--batches -2", ">= 0")


def test_forecast_refuses_non_finite_targets(capsys, tmp_path) -> None:
    code, _, err = run_cli(capsys, "forecast", *TINY, "--target-tokens", "inf", "--out", str(tmp_path / "f"))
    assert_usage_error(code, err, "--target-tokens inf", "finite")
    assert not (tmp_path / "f").exists()


def test_a_run_that_ends_in_a_non_finite_loss_exits_non_zero(capsys, tmp_path, monkeypatch) -> None:
    """Training skips every non-finite step and sizes are bounded at load, so a NaN model is hard to
    reach; the guard is tested with an evaluation that returns NaN: the run still ends with a
    checkpoint and a summary, and the command says so and exits 1."""
    from moelab.train.trainer import Trainer

    monkeypatch.setattr(Trainer, "evaluate", lambda self: float("nan"))
    out = tmp_path / "nan"
    code, stdout, err = run_cli(capsys, "train", *TINY, "--set", "train.max_steps=4", "--out", str(out))
    assert code == 1, (stdout, err)
    assert "non-finite validation loss" in err and "moelab diagnose" in err
    assert (out / "summary.json").is_file() and list((out / "checkpoints").iterdir())


def test_out_below_a_regular_file_is_one_line(capsys, tmp_path) -> None:
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(capsys, "train", *TINY, "--out", str(tmp_path / "afile" / "run"))
    assert_usage_error(code, err, "lies below", "which is a file")


def test_absurd_sizes_on_train_are_refused_before_the_run_directory_exists(capsys, tmp_path) -> None:
    out = tmp_path / "r"
    code, _, err = run_cli(capsys, "train", *TINY, "--set", "model.d_model=100000", "--out", str(out))
    assert_usage_error(code, err, "model.d_model = 100000", "at most 65,536")
    big = ["--set", "model.d_model=32768", "--set", "model.n_layers=512", "--set", "model.ffn_hidden=131072"]
    code, _, err = run_cli(capsys, "train", *TINY, *big, "--set", "model.n_heads=256", "--out", str(out))
    assert_usage_error(code, err, "needs about", "GiB", "available")
    assert not out.exists()


def test_unreadable_config_and_data_are_one_line(capsys, tmp_path) -> None:
    """A directory where a file is expected cannot be read whatever the user's rights (root included)."""
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    (folder / "x").write_text("y")
    code, _, err = run_cli(capsys, "train", str(folder), "--out", str(tmp_path / "r"))
    assert_usage_error(code, err, str(folder), "is a directory")
    data = tmp_path / "data.jsonl"
    data.mkdir()
    code, _, err = run_cli(capsys, "train", *TINY, "--data", str(data), "--out", str(tmp_path / "r"))
    assert_usage_error(code, err, str(data))
    assert not (tmp_path / "r").exists()
