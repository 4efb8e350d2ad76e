"""What the router-health metrics and the monitor cost, as a share of training step time, in one process.

Two variants of the trainer's step run on the same model, optimizer and batches:

    plain    forward, backward, clip, optimizer step, router bias update (what training needs)
    monitor  the same, plus what the monitor adds: `Monitor.check_step` every step and, every
             log_every-th step, `router_health` (all per-layer metrics, expert similarity included),
             `Monitor.check_interval` and serialising the metrics line

They alternate in blocks of whole logging intervals (plain, monitor, monitor, plain, ...), so drifting
machine load hits both alike; the overhead is the median over rounds of monitor / plain - 1. The
time spent inside the monitor's own calls is also timed directly (less noisy on a busy machine) and
reported as a share of the plain step time. On a machine shared with other jobs, wall-clock blocks
swing with the others' load; `--clock cpu --threads 1` times this process's own CPU time on one
thread instead, which other processes do not inflate (CPU only). The routers' statistics buffers, which the MoE layers
fill in every training forward whether or not anyone reads them, count as training in both variants.
Batches are random tokens: the metrics' cost does not depend on the text.

    python benchmarks/monitor_overhead.py [--preset small-moe] [--rounds 5] [--intervals 2] [--device auto]
        [--clock wall|cpu] [--threads N] [--set KEY=VALUE ...] [--out benchmarks/results/monitor_overhead.json]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moelab.config import load_config  # noqa: E402
from moelab.device import resolve_device  # noqa: E402
from moelab.model import Transformer  # noqa: E402
from moelab.model.health import health_to_metrics, router_health  # noqa: E402
from moelab.train.monitor import Monitor  # noqa: E402
from moelab.train.schedule import build_optimizer  # noqa: E402
from moelab.train.trainer import autocast_dtype  # noqa: E402


class Bench:
    def __init__(self, preset: str, overrides: list[str], device: str, clock: str = "wall"):
        self.clock = time.perf_counter if clock == "wall" else time.process_time
        self.cfg = load_config(preset=preset, overrides=overrides)
        cfg = self.cfg
        self.device = resolve_device(device)
        self.amp = autocast_dtype(cfg.train.dtype, self.device)
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = cfg.data.vocab_size if cfg.data.tokenizer == "bpe" else 260
        torch.manual_seed(0)
        self.model = Transformer(cfg.model).to(self.device).train()
        self.optimizer = build_optimizer(self.model, cfg.train)
        moe = cfg.model.moe
        self.monitor = Monitor(cfg.monitor, moe.num_experts if moe else 0, moe.top_k if moe else 1)
        gen = torch.Generator().manual_seed(0)
        B, T = cfg.train.batch_size, cfg.data.seq_len
        self.batches = [
            torch.randint(0, cfg.model.vocab_size, (B, T + 1), generator=gen).to(self.device) for _ in range(8)
        ]
        self.step = 0
        self.monitor_s = 0.0  # time inside the monitor's calls

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_step(self, with_monitor: bool) -> None:
        cfg = self.cfg
        batch = self.batches[self.step % len(self.batches)]
        x, y = batch[:, :-1], batch[:, 1:]
        ctx = torch.autocast(device_type=self.device.type, dtype=self.amp) if self.amp else nullcontext()
        with ctx:
            out = self.model(x)
        loss = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), y.reshape(-1))
        (loss + out.aux_loss).backward()
        # The trainer turns both into Python floats every step, monitor or not.
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip))
        loss_value = float(loss.detach())
        log_now = (self.step + 1) % cfg.train.log_every == 0
        if with_monitor:
            t0 = self.clock()
            self.monitor.check_step(self.step + 1, loss_value, grad_norm)
            health = (
                router_health(self.model, self.model.router_stats(), cfg.monitor.expert_similarity) if log_now else None
            )
            self.sync()
            self.monitor_s += self.clock() - t0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_router_biases()
        if not with_monitor:
            # NOTE: without readers the statistics buffers just keep accumulating; reset them as the
            # trainer's read would, so both variants run the same forward code on the same buffers.
            if log_now:
                for moe in self.model.moe_layers():
                    moe.reset_stats()
        elif log_now:
            t0 = self.clock()
            record = {"step": self.step + 1, "loss": loss_value, "grad_norm": grad_norm}
            self.monitor.check_interval(self.step + 1, loss_value, grad_norm, health, record)
            record.update(health_to_metrics(health))
            io.StringIO().write(json.dumps(record) + "\n")
            self.monitor_s += self.clock() - t0
        self.step += 1

    def block(self, steps: int, with_monitor: bool) -> float:
        self.sync()
        t0 = self.clock()
        for _ in range(steps):
            self.train_step(with_monitor)
        self.sync()
        return self.clock() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small-moe")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=5, help="rounds of (plain, monitor) block pairs")
    ap.add_argument("--intervals", type=int, default=2, help="logging intervals per block")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps of each variant first")
    ap.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall-clock time, or this process's CPU time (CPU device only)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "monitor_overhead.json"))
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args.preset, args.overrides, args.device, args.clock)
    if args.clock == "cpu" and bench.device.type != "cpu":
        raise SystemExit("--clock cpu measures CPU work: use it with the CPU device")
    cfg = bench.cfg
    log_every = cfg.train.log_every
    steps = log_every * args.intervals
    for variant in (False, True):
        bench.block(args.warmup, variant)
    bench.step = 0
    plain_s, monitor_s, inside_s = [], [], []
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        for with_monitor in order:
            before = bench.monitor_s
            seconds = bench.block(steps, with_monitor)
            (monitor_s if with_monitor else plain_s).append(seconds)
            if with_monitor:
                inside_s.append(bench.monitor_s - before)
    ratios = [m / p for m, p in zip(monitor_s, plain_s)]
    step_s = statistics.median(plain_s) / steps
    direct = statistics.median(inside_s) / statistics.median(plain_s)
    result = {
        "preset": args.preset,
        "overrides": args.overrides,
        "device": str(bench.device)
        + (f" ({torch.cuda.get_device_name(bench.device)})" if bench.device.type == "cuda" else ""),
        "autocast": str(bench.amp) if bench.amp else "none (fp32)",
        "clock": args.clock,
        "log_every": log_every,
        "steps_per_block": steps,
        "rounds": args.rounds,
        "plain_step_s": step_s,
        "monitor_step_s": statistics.median(monitor_s) / steps,
        "overhead_ab": statistics.median(ratios) - 1,
        "overhead_ab_per_round": [r - 1 for r in ratios],
        "monitor_calls_s_per_interval": statistics.median(inside_s) / args.intervals,
        "overhead_direct": direct,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    print(
        f"{args.preset} on {result['device']}, autocast {result['autocast']}, log_every {log_every}, "
        f"{args.rounds} rounds of {steps}-step blocks, {result['threads']} threads, {args.clock} clock"
    )
    print(f"{'variant':<12}{'s/step':>12}")
    print(f"{'plain':<12}{result['plain_step_s']:>12.4f}")
    print(f"{'monitor':<12}{result['monitor_step_s']:>12.4f}")
    print(
        f"overhead (interleaved A/B, median of rounds): {result['overhead_ab']:+.2%}  "
        f"(rounds: {', '.join(f'{r:+.1%}' for r in result['overhead_ab_per_round'])})"
    )
    print(
        f"overhead (time inside monitor calls / plain step time): {result['overhead_direct']:.2%}  "
        f"({result['monitor_calls_s_per_interval'] * 1000:.1f} ms per logging interval)"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
