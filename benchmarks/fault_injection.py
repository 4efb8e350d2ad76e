"""Kill training at random moments (checkpoint writes included) and check that nothing is lost.

For each trial: train the tiny preset with a checkpoint at every step (so that many kills land inside
a checkpoint write), SIGKILL the process after a random delay, then check every checkpoint left
behind: each must either be refused by verification or load completely (a checkpoint that verifies
but fails to load, or loads different weights than it hashed, counts as accepted-corrupt: must be 0).
Then `--resume` it, again with a random kill, until it finishes. At the end every finished run's
weights must equal the uninterrupted reference run's bit for bit, and its metrics.jsonl training
lines must equal the reference's (wall-clock fields aside).

    python benchmarks/fault_injection.py [--trials 8] [--steps 30] [--out runs/fault-injection]

Prints kills, resumes, checkpoints checked, accepted-corrupt, stale temporary folders found and
removed, and whether each run matches the reference (with a checkpoint every step, a kill loses at
most the step in progress); writes JSON beside the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from safetensors.torch import load_file  # noqa: E402

from moelab.checkpoint import MODEL_FILE, list_checkpoints, verify_checkpoint  # noqa: E402
from moelab.errors import CheckpointError  # noqa: E402
from moelab.files import read_jsonl  # noqa: E402


def settings(steps: int) -> list[str]:
    return [
        "--set", f"train.max_steps={steps}",
        "--set", "train.checkpoint_every=1",
        "--set", "train.keep_checkpoints=2",
        "--set", "train.log_every=2",
        "--set", "train.eval_every=10",
        "--set", "train.sample_tokens=0",
    ]  # fmt: skip


def train(out: Path, steps: int, resume: bool, kill_after: float | None, in_write: bool = False) -> tuple[bool, bool]:
    """Run `moelab train`; SIGKILL it after `kill_after` seconds, or (in_write) as soon as a checkpoint
    write is seen in progress after that. (finished, killed inside a write)."""
    command = [sys.executable, "-m", "moelab", "train", "--quiet", "--out", str(out)]
    command += ["--resume"] if resume else ["--preset", "tiny", *settings(steps)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = None if kill_after is None else time.perf_counter() + kill_after
    while proc.poll() is None:
        if deadline is not None and time.perf_counter() >= deadline:
            writing = any((out / "checkpoints").glob(".tmp-*")) if (out / "checkpoints").is_dir() else False
            if writing or not in_write:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return False, writing
        time.sleep(0.0005 if in_write else 0.01)
    if proc.returncode != 0:
        raise RuntimeError(f"moelab train failed (exit {proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
    return True, False


def check_checkpoints(run: Path) -> tuple[int, int, int]:
    """(checked, refused, accepted_corrupt) over the run's checkpoints as a kill left them."""
    checked = refused = corrupt = 0
    for path in list_checkpoints(run):
        checked += 1
        try:
            verify_checkpoint(path)
        except CheckpointError:
            refused += 1
            continue
        try:
            load_file(str(path / MODEL_FILE))
            import torch

            state = torch.load(path / "trainer.pt", weights_only=True)
            if not isinstance(state, dict) or "optimizer" not in state:
                corrupt += 1
        except Exception:
            corrupt += 1
    return checked, refused, corrupt


def training_lines(run: Path) -> list[dict]:
    timing = {"tokens_per_s", "train_s", "elapsed_s"}
    return [{k: v for k, v in r.items() if k not in timing} for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/fault-injection")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    reference = out / "reference"
    start = time.perf_counter()
    train(reference, args.steps, resume=False, kill_after=None)
    reference_s = time.perf_counter() - start
    ref_weights = load_file(str(list_checkpoints(reference)[-1] / MODEL_FILE))
    totals = {
        "kills": 0,
        "in_write": 0,
        "resumes": 0,
        "checked": 0,
        "refused": 0,
        "accepted_corrupt": 0,
        "stale_seen": 0,
    }
    trials = []
    for trial in range(args.trials):
        run = out / f"trial-{trial}"
        finished = False
        while not finished:
            kill_after = rng.uniform(0.2, 1.0) * reference_s if totals["kills"] < (trial + 1) * 3 else None
            resume = (run / "config.toml").is_file()  # a kill before the config was written left an empty directory
            # every other kill waits for a checkpoint write in progress
            finished, in_write = train(run, args.steps, resume, kill_after, in_write=totals["kills"] % 2 == 1)
            totals["resumes"] += int(resume)
            if not finished:
                totals["kills"] += 1
                totals["in_write"] += int(in_write)
                totals["stale_seen"] += (
                    len(list((run / "checkpoints").glob(".tmp-*"))) if (run / "checkpoints").is_dir() else 0
                )
                checked, refused, corrupt = check_checkpoints(run)
                totals["checked"] += checked
                totals["refused"] += refused
                totals["accepted_corrupt"] += corrupt
        weights = load_file(str(list_checkpoints(run)[-1] / MODEL_FILE))
        same = weights.keys() == ref_weights.keys() and all((weights[k] == ref_weights[k]).all() for k in weights)
        lines_same = training_lines(run) == training_lines(reference)
        stale_left = list((run / "checkpoints").glob(".tmp-*"))
        trials.append(
            {"trial": trial, "weights_equal": bool(same), "metrics_equal": lines_same, "stale_left": len(stale_left)}
        )
        print(f"trial {trial}: weights {'equal' if same else 'DIFFER'}, metrics {'equal' if lines_same else 'DIFFER'}")
    print(
        f"kills {totals['kills']} ({totals['in_write']} inside a checkpoint write), resumes {totals['resumes']}, checkpoints checked after a kill {totals['checked']} "
        f"(refused {totals['refused']}), accepted-corrupt {totals['accepted_corrupt']}, stale temporary folders seen "
        f"{totals['stale_seen']} (left after the runs: {sum(t['stale_left'] for t in trials)}), runs equal to the "
        f"reference {sum(t['weights_equal'] and t['metrics_equal'] for t in trials)} of {len(trials)}"
    )
    (out / "fault_injection.json").write_text(json.dumps({"totals": totals, "trials": trials}, indent=1) + "\n")


if __name__ == "__main__":
    main()
