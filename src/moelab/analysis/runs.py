"""The runs of a study (compare, sweep, forecast): trained, or reused when an identical finished run
is there, resumed when interrupted; WSD runs cooled down at smaller budgets; their curves read back."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from moelab.analysis.campaign import Campaign
from moelab.config import RunConfig
from moelab.errors import MoelabError
from moelab.extras import require
from moelab.files import write_atomic
from moelab.rundir import RunDir, load_model
from moelab.train.trackers import require_trackers

# Budgets (as fractions of the full one) at which a WSD run is cooled down from its stable phase.
COOLDOWN_FRACTIONS = (0.5, 0.625, 0.75, 0.875)


def require_study_packages(what: str, configs: Iterable[RunConfig], *report_modules: str) -> None:
    """Refuse a study whose report (`report_modules` of the report extra) or whose runs' trackers
    need a package that is not installed: one line, before any run trains."""
    require(what, "report", *report_modules)
    for cfg in configs:
        require_trackers(cfg.train.report_to)


def cooldown_points(cfg: RunConfig, fractions: tuple[float, ...] = COOLDOWN_FRACTIONS) -> list[tuple[int, int]]:
    """(budget steps, branch step) for each shorter budget: a WSD run with budget N_b decays over its
    last decay_fraction, so it equals the full run until step N_b - decay and can branch from there."""
    N, decay = cfg.train.max_steps, cfg.train.decay_fraction
    points = []
    for f in fractions:
        budget = max(2, round(N * f))
        start = budget - max(1, round(decay * budget))
        if cfg.train.warmup_steps < start < budget < N:
            points.append((budget, start))
    return points


def cooldown_curve(
    name: str, cfg: RunConfig, run: Path, out: Path, log: Callable[[str], None], progress: bool
) -> list[tuple[float, float]]:
    """The loss a WSD run would have reached with smaller budgets: for each budget, resume the
    stable-phase checkpoint in a branch run whose schedule ends (decays) at that budget.
    Returns (training FLOPs, final validation loss) per budget, the full run's own final included."""
    import shutil

    from moelab.train.trainer import Trainer

    curve = []
    for budget, start in cooldown_points(cfg):
        branch = out / f"{name}-cooldown-{budget}"
        rd = RunDir(branch)
        summary = rd.read_summary()
        if summary is None or summary.get("step") != budget:
            if branch.exists():
                shutil.rmtree(branch)
            source = RunDir(run).path / "checkpoints" / f"step_{start:07d}"
            if not source.is_dir():
                raise MoelabError(f"{run} has no checkpoint at step {start} to cool down from; rerun the comparison")
            branch_cfg = copy.deepcopy(RunDir(run).load_config())
            branch_cfg.train.max_steps = budget
            branch.mkdir(parents=True)
            write_atomic(branch / "config.toml", branch_cfg.to_toml())
            for f in ("tokenizer.json", "data.json"):
                shutil.copyfile(RunDir(run).path / f, branch / f)
            rows = [r for r in RunDir(run).read_metrics() if r.get("step", 0) <= start]
            write_atomic(branch / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
            shutil.copytree(source, branch / "checkpoints" / source.name, copy_function=_link_or_copy)
            log(f"[{name}] cooling down from step {start} to a budget of {budget} steps")
            Trainer(branch_cfg, branch, resume=True, log=log, progress=progress).fit()
            summary = rd.read_summary()
        curve.append((summary["flops"], summary["val_loss"]))
    final = RunDir(run).read_summary()
    curve.append((final["flops"], final["val_loss"]))
    return curve


def _link_or_copy(src: str, dst: str) -> str:
    """Checkpoint files are never modified in place, so a branch can share them by hard link."""
    import os
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


@torch.no_grad()
def inference_tokens_per_s(run: Path, tokens: int = 64, repeats: int = 3) -> float:
    """Decode speed at batch 1 with a KV cache (greedy), median of a few repeats."""
    from moelab.infer.moe_layer import prepare_for_inference
    from moelab.model import KVCache

    loaded = load_model(run, "cuda" if torch.cuda.is_available() else "cpu")
    model = prepare_for_inference(loaded.model)  # the layer serving runs
    device = next(model.parameters()).device
    length = min(model.cfg.max_seq_len, tokens + 1)
    rates = []
    for _ in range(repeats):
        cache = KVCache(model.cfg, 1, length, device, next(model.parameters()).dtype)
        token = torch.tensor([[loaded.tokenizer.eos_id]], device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for position in range(length):
            logits = model(token, positions_BT=torch.tensor([[position]], device=device), cache=cache).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(length / (time.perf_counter() - t0))
    return sorted(rates)[len(rates) // 2]


def eval_curve(run: Path) -> tuple[list[float], list[float], list[float]]:
    """(training FLOPs, training seconds, validation loss) at each evaluation of a run."""
    rows = [r for r in RunDir(run).read_metrics() if "val_loss" in r]
    return [r["flops"] for r in rows], [r["train_s"] for r in rows], [r["val_loss"] for r in rows]


def run_is_finished(run: Path, cfg: RunConfig) -> bool:
    rd = RunDir(run)
    summary = rd.read_summary()
    if summary is None or not rd.is_run():
        return False
    saved = rd.load_config()
    saved.model.vocab_size = cfg.model.vocab_size
    # NOTE: a run the monitor stopped (diverged, collapsed) would stop again: it is finished too.
    done = summary.get("step") == cfg.train.max_steps or summary.get("stopped_by") == "monitor"
    return saved.to_dict() == cfg.to_dict() and done


def train_or_reuse(
    name: str,
    cfg: RunConfig,
    run: Path,
    log: Callable[[str], None],
    progress: bool,
    checkpoint_steps: frozenset[int] = frozenset(),
) -> dict[str, Any]:
    """Train `cfg` into `run` unless an identical finished run is there; resume an interrupted one."""
    from moelab.train.trainer import Trainer

    rd = RunDir(run)
    if run_is_finished(run, cfg):
        log(f"[{name}] finished already in {run}: reusing it")
        return rd.read_summary()
    if rd.is_run() and rd.checkpoints():
        saved = rd.load_config()
        saved.model.vocab_size = 0
        wanted = copy.deepcopy(cfg)
        wanted.model.vocab_size = 0
        if saved.to_dict() != wanted.to_dict():
            raise MoelabError(f"{run} holds a run with another config; remove it or choose another --out")
        log(f"[{name}] resuming the interrupted run in {run}")
        trainer = Trainer(saved, run, resume=True, log=log, progress=progress, checkpoint_steps=checkpoint_steps)
    else:
        log(f"[{name}] training into {run}")
        trainer = Trainer(cfg, run, log=log, progress=progress, checkpoint_steps=checkpoint_steps)
    trainer.fit()
    return rd.read_summary()


def campaign_run(
    campaign: Campaign,
    name: str,
    cfg: RunConfig,
    run: Path,
    log,
    progress: bool,
    checkpoint_steps: frozenset[int] = frozenset(),
) -> dict[str, Any]:
    """train_or_reuse, counted in the study's progress (run i of n, ETA)."""
    campaign.start(name)
    trained = not run_is_finished(run, cfg)
    summary = train_or_reuse(name, cfg, run, log, progress, checkpoint_steps)
    campaign.finish(name, trained)
    return summary
