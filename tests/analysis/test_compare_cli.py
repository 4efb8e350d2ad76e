"""compare, sweep and forecast end to end on the tiny preset: outputs, pairing, resume."""

from __future__ import annotations

import json

import pytest

from moelab.analysis.budget import Budget
from moelab.analysis.compare import dense_twin
from moelab.analysis.curves import compute_multiplier
from moelab.cli import main
from moelab.config import load_config
from moelab.errors import MoelabError
from moelab.model import accounting as acc


def test_dense_twin_matches_active_flops_or_total_params() -> None:
    moe = load_config(preset="small-moe")
    vocab = 2048
    twin = dense_twin(moe, "active")
    assert twin.model.moe is None
    flops_moe = acc.train_flops_per_token(moe.model, moe.data.seq_len, vocab)
    flops_dense = acc.train_flops_per_token(twin.model, twin.data.seq_len, vocab)
    assert abs(flops_dense - flops_moe) / flops_moe < 0.005
    total = dense_twin(moe, "total")
    p_moe, p_dense = acc.param_counts(moe.model, vocab).total, acc.param_counts(total.model, vocab).total
    assert abs(p_dense - p_moe) / p_moe < 0.005
    with pytest.raises(MoelabError, match="must be an MoE"):
        dense_twin(twin)


def test_budget_parsing() -> None:
    assert Budget.parse("tokens=2e6") == Budget("tokens", 2e6)
    assert Budget.parse("minutes=1.5").kind == "minutes"
    for bad in ("tokens", "flops=-1", "hours=2", "tokens=abc"):
        with pytest.raises(MoelabError, match="--budget"):
            Budget.parse(bad)


@pytest.mark.slow
def test_compare_end_to_end_and_resume(tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", "--preset", "tiny", "--budget", "tokens=12288", "--evals", "4", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "compute multiplier" in text and "report:" in text
    results = json.loads((out / "compare.json").read_text())
    dense, moe = results["models"]["dense"], results["models"]["tiny"]
    assert dense["kind"] == "dense" and moe["kind"] == "moe"
    assert dense["tokens"] == moe["tokens"] == 12288  # same budget in tokens (24 steps of 512)
    assert abs(dense["train_flops_per_token"] - moe["train_flops_per_token"]) / dense["train_flops_per_token"] < 0.01
    assert moe["total_params"] > dense["total_params"]
    expected = compute_multiplier(
        dense["curve"]["flops"], dense["curve"]["val_loss"], moe["curve"]["flops"], moe["curve"]["val_loss"]
    )
    assert moe["compute_multiplier"] == expected
    for name in ("report.html", "loss_vs_flops.png", "loss_vs_time.png"):
        assert (out / name).stat().st_size > 1000
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "compute multiplier" in html.lower()
    # a second invocation reuses both finished runs
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    assert main(argv) == 0
    assert "reusing" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")} == stamps


@pytest.mark.slow
def test_sweep_end_to_end(tmp_path, capsys) -> None:
    out = tmp_path / "sweep"
    code = main(
        [
            "sweep",
            "--preset",
            "tiny",
            "--experts",
            "1,2,4",
            "--granularity",
            "1,2",
            "--budget",
            "tokens=4096",
            "--evals",
            "2",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    results = json.loads((out / "sweep.json").read_text())
    labels = {r["label"] for r in results["rows"]}
    assert labels == {"E1-G1", "E2-G1", "E4-G1", "E2-G2", "E4-G2"}
    assert any("E1-G2" in s for s in results["skipped"])
    flops = {r["train_flops_per_token"] for r in results["rows"]}
    assert (max(flops) - min(flops)) / min(flops) < 0.01  # fixed active compute (router aside)
    for key, front in results["pareto"].items():
        assert front, key
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 4


@pytest.mark.slow
def test_forecast_ladder_end_to_end(tmp_path, capsys) -> None:
    out = tmp_path / "fc"
    code = main(
        [
            "forecast",
            "--preset",
            "tiny",
            "--widths",
            "32,64",
            "--tokens",
            "2048,4096,6144",
            "--target-params",
            "1e9",
            "--target-tokens",
            "2e10",
            "--bootstrap",
            "5",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "predicted to" in text and "WARNING: extrapolation" in text
    data = json.loads((out / "forecast.json").read_text())
    assert len(data["points"]) == 12
    assert data["forecast"]["trend"] in ("grows", "shrinks", "flips", "holds")
    # the backtest: fitted without the largest rung, against what that rung's two runs measured
    bt = data["backtest"]
    assert bt["rung"] == "w64-t6.14e+03" and bt["fitted_runs"] == 10
    measured = {p["label"].split("-")[0]: p["loss"] for p in data["points"] if p["label"].endswith("w64-t6.14e+03")}
    assert bt["measured"] == {
        "dense": measured["dense"],
        "moe": measured["moe"],
        "advantage": measured["dense"] - measured["moe"],
    }
    for key in ("dense", "moe"):
        assert bt["error_percent"][key] == pytest.approx(100 * (bt["predicted"][key] - measured[key]) / measured[key])
    assert "backtest: the law refitted without rung w64-t6.14e+03 (10 runs)" in text
    assert "Backtest" in (out / "report.html").read_text()
    # a named rung reuses every run and backtests on it
    assert (
        main(
            [
                "forecast",
                "--preset",
                "tiny",
                "--widths",
                "32,64",
                "--tokens",
                "2048,4096,6144",
                "--holdout",
                "w32-t4096",
                "--bootstrap",
                "5",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads((out / "forecast.json").read_text())["backtest"]["rung"] == "w32-t4.1e+03"


def test_compare_bad_input(capsys, tmp_path) -> None:
    assert main(["compare", "--preset", "small-dense", "--out", str(tmp_path / "x")]) == 2
    assert "must be an MoE" in capsys.readouterr().err
    assert main(["compare", "--preset", "tiny", "--budget", "weeks=2", "--out", str(tmp_path / "x")]) == 2
    assert "--budget" in capsys.readouterr().err
    assert main(["sweep", "--preset", "tiny", "--experts", "0,4"]) == 2
    assert "--experts" in capsys.readouterr().err


@pytest.mark.slow
def test_wsd_cooldown_branch_equals_a_run_with_that_budget(tmp_path) -> None:
    """A branch cooled down from the stable phase must reproduce exactly the run that had the
    smaller budget from the start (same data order, same schedule up to the branch)."""
    from moelab.analysis.runs import cooldown_curve, cooldown_points
    from moelab.rundir import RunDir
    from moelab.train.trainer import Trainer

    settings = [
        "train.schedule=wsd",
        "train.max_steps=32",
        "train.warmup_steps=2",
        "train.eval_every=8",
        "train.checkpoint_every=8",
        "train.sample_tokens=0",
        "train.log_every=1",
    ]
    cfg = load_config(preset="tiny", overrides=settings)
    points = cooldown_points(cfg)
    assert points == [(16, 13), (20, 16), (24, 19), (28, 22)]
    main_run = tmp_path / "runs" / "m"
    Trainer(cfg, main_run, log=lambda s: None, progress=False, checkpoint_steps=frozenset(s for _, s in points)).fit()
    curve = cooldown_curve("m", cfg, main_run, tmp_path / "runs", log=lambda s: None, progress=False)
    assert len(curve) == 5
    direct = load_config(preset="tiny", overrides=settings + ["train.max_steps=20"])
    result = Trainer(direct, tmp_path / "direct", log=lambda s: None, progress=False).fit()
    assert curve[1][1] == result.val_loss  # exactly the run with a 20-step budget
    branch_losses = [
        (r["step"], r["loss"]) for r in RunDir(tmp_path / "runs" / "m-cooldown-20").read_metrics() if "loss" in r
    ]
    direct_losses = [(r["step"], r["loss"]) for r in RunDir(tmp_path / "direct").read_metrics() if "loss" in r]
    assert branch_losses == direct_losses


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--tune", "lr=abc"], "--tune 'lr=abc'"),
        (["--tune", "lr="], "--tune 'lr='"),
        (["--tune", "lr=-1e-3,2e-3"], "--tune 'lr=-1e-3,2e-3'"),
        (["--seeds", "0"], "--seeds 0"),
        (["--tune", "--tune-fraction", "0"], "--tune-fraction 0"),
        (["--tune", "--tune-fraction", "1.5"], "--tune-fraction 1.5"),
        (["--tune-fraction", "0.5"], "needs --tune"),
        (["--tune-fraction", "0.25"], "needs --tune"),  # the default's value, given without --tune
        (["--tune", "decay=0.1,0.2"], "wsd"),
    ],
)
def test_compare_bad_tuning_and_seeds_write_nothing(tmp_path, capsys, flags, named) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "--preset", "tiny", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
def test_tuned_seeded_compare_resumes_without_retraining(tmp_path, capsys) -> None:
    """An interrupted tuned comparison (a final run never finished) continues: the missing run is
    trained, every finished one (tuning and final) is reused untouched."""
    import shutil

    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--preset",
        "tiny",
        "--budget",
        "tokens=8192",
        "--evals",
        "2",
        "--tune",
        "lr=2e-3,4e-3",
        "--tune-fraction",
        "0.5",
        "--seeds",
        "2",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "tuning at 0.5 of the budget" in text and "<- chosen" in text and "2 seeds" in text
    results = json.loads((out / "compare.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["runs"]) == 4 + 4
    for arm in ("dense", "tiny"):
        best = results["tuning"][arm]["best"]["lr"]
        assert results["models"][arm]["settings"]["lr"] == best
        losses = {p["settings"]["lr"]: p["val_loss"] for p in results["tuning"][arm]["points"]}
        assert losses[best] == min(losses.values())
    assert len(results["models"]["tiny"]["loss_gap_seeds"]) == 2
    # interrupt: the last final run disappears, as if killed before it started
    (last,) = out.glob("runs/tiny-lr*-seed1")  # final runs are named by the arm's tuned settings
    shutil.rmtree(last)
    (out / "compare.json").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/**/summary.json")}
    assert len(stamps) == 7
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("reusing it") == 7 and "run 8 of 8: tiny-seed1" in err
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/**/summary.json") if p in stamps} == stamps
    again = json.loads((out / "compare.json").read_text())
    assert again["models"]["tiny"]["loss_gap_seeds"] == results["models"]["tiny"]["loss_gap_seeds"]
    # a wider grid trains only its new points; finals at a newly chosen point go beside the old ones
    wider = [a if a != "lr=2e-3,4e-3" else "lr=1e-3,2e-3,4e-3" for a in argv]
    assert main(wider) == 0
    err = capsys.readouterr().err
    assert "training into" in err and err.count("tune/dense-lr0.001] training into") == 1
    assert "tune/dense-lr0.002] finished already" in err and "tune/tiny-lr0.004] finished already" in err
    widened = json.loads((out / "compare.json").read_text())
    for arm in ("dense", "tiny"):
        losses = {p["settings"]["lr"]: p["val_loss"] for p in widened["tuning"][arm]["points"]}
        assert len(losses) == 3 and widened["models"][arm]["settings"]["lr"] == min(losses, key=losses.get)


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--holdout", "w48-t2048"], "--holdout 'w48-t2048' is not a rung of the ladder"),
        (["--holdout", "w32-t999"], "is not a rung of the ladder: one of w32-t2.05e+03"),
        (["--holdout", "largest-ish"], "is not a rung"),
        (["--tokens", "2048,4096", "--holdout", "w32-t2048"], "at least 5 rungs"),
    ],
)
def test_forecast_bad_holdout_writes_nothing(tmp_path, capsys, flags, named) -> None:
    out = tmp_path / "fc"
    argv = ["forecast", "--preset", "tiny", "--widths", "32,64", "--tokens", "2048,4096,6144", "--out", str(out)]
    assert main(argv + flags) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and len(err.splitlines()) == 1
    assert not out.exists()
