"""Expert parallelism on 2 processes: all-to-all volume per step and where the time goes.

One MoE layer (DESIGN.md configurations: coarse D=512 I=1024 E=8 k=2, fine-grained D=512 I=256 E=64
k=8), T tokens per step in total, T/2 on each of 2 ranks, fp32, forward + backward:

    expert parallel   each rank holds E/2 experts; slots travel by all_to_all_single (gloo)
    data parallel     each rank holds all E experts; no all-to-all, but the expert gradients are
                      all-reduced every step (what DDP does for replicated experts)
    one process       the whole batch in one process with 2 threads (the same 2 cores), for scale

Communication is the time inside the collectives (the all-to-alls and their count exchange, or the
gradient all-reduce), measured per rank; compute is the rest of the step. The step time is the
slowest rank's. Bytes are what one rank sends per step: slots routed to its own experts never leave
it. On a CPU with gloo over loopback TCP, "communication" is memory copies through the kernel plus
waiting for the other rank; it says nothing about NCCL over NVLink or InfiniBand.

    python benchmarks/expert_parallel.py [--steps 5] [--tokens 4096] [--configs coarse,fine]
    torchrun --nproc-per-node 2 benchmarks/expert_parallel.py       (no one-process column)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moelab.config import MoEConfig  # noqa: E402
from moelab.distributed.expert_parallel import (  # noqa: E402
    CommMeter,
    expert_parallel_modules,
    shard_experts,
)
from moelab.model.moe import MoE  # noqa: E402

CONFIGS = {
    "coarse": dict(D=512, I=1024, E=8, k=2),
    "fine": dict(D=512, I=256, E=64, k=8),
}


def build(c: dict) -> MoE:
    torch.manual_seed(1)
    moe = MoE(c["D"], MoEConfig(num_experts=c["E"], top_k=c["k"], expert_hidden=c["I"]))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5)
    return moe.train()


def tokens_for(rank: int, T: int, D: int) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(100 + rank))


def one_process(c: dict, T: int, steps: int, warmup: int) -> float:
    """Median forward+backward seconds of the layer on all T tokens in this process."""
    moe = build(c)
    x = tokens_for(0, T, c["D"])[None]
    times = []
    for i in range(warmup + steps):
        times.append(step(moe, x))
    return statistics.median(times[warmup:])


def step(moe: MoE, x: torch.Tensor, group=None, meter: CommMeter | None = None) -> float:
    """One forward+backward; with `group`, the experts' gradients are all-reduced as DDP would."""
    x = x.detach().requires_grad_(True)  # as inside a model: the layer's input has a gradient too
    t0 = time.perf_counter()
    y, aux = moe(x)
    (y.square().mean() + aux).backward()
    if group is not None:  # data parallel: DDP's all-reduce of the replicated experts' gradients
        flat = torch.cat([moe.experts.gate_up_proj.grad.reshape(-1), moe.experts.down_proj.grad.reshape(-1)])
        t1 = time.perf_counter()
        dist.all_reduce(flat, group=group)
        meter.seconds += time.perf_counter() - t1
        world = dist.get_world_size(group)
        meter.bytes_sent += int(flat.numel() * flat.element_size() * 2 * (world - 1) / world)  # ring all-reduce
    total = time.perf_counter() - t0
    moe.zero_grad(set_to_none=True)
    return total


VARIANTS = ("expert parallel", "data parallel")


def measure(c: dict, T: int, steps: int, warmup: int, rank: int, world: int) -> dict[str, dict]:
    """Both variants, interleaved step by step so that a change in the machine's load hits both."""
    group = dist.new_group(list(range(world)))
    models, meters = {}, {}
    for variant in VARIANTS:
        moe = build(c)
        meters[variant] = CommMeter()
        if variant == "expert parallel":
            shard_experts(moe, shard=rank, group=group, group_size=world)
            for _, m in expert_parallel_modules(moe):
                m.meter = meters[variant]
        models[variant] = moe
    x = tokens_for(rank, T // world, c["D"])[None]
    rows: dict[str, list] = {v: [] for v in VARIANTS}
    for i in range(warmup + steps):
        for variant in VARIANTS:
            meter = meters[variant]
            meter.reset()
            dist.barrier(group=group)
            total = step(models[variant], x, group if variant == "data parallel" else None, meter)
            if i >= warmup:
                rows[variant].append(
                    {
                        "total_s": total,
                        "comm_s": meter.seconds,
                        "bytes": meter.bytes_sent,
                        "phases": dict(meter.by_phase),
                    }
                )
    out = {}
    for variant, r in rows.items():
        out[variant] = {
            "total_s": statistics.median(x["total_s"] for x in r),
            "comm_s": statistics.median(x["comm_s"] for x in r),
            "bytes": statistics.median(x["bytes"] for x in r),
            "phases": {k: statistics.median(x["phases"].get(k, 0.0) for x in r) for k in r[0]["phases"]},
        }
    return out


def worker(rank: int, world: int, args: argparse.Namespace, baseline: dict[str, float]) -> None:
    torch.set_num_threads(1)
    results = {}
    for name in args.configs.split(","):
        mine = measure(CONFIGS[name], args.tokens, args.steps, args.warmup, rank, world)
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        results[name] = {variant: [r[variant] for r in everyone] for variant in VARIANTS}
    if rank == 0:
        report(results, baseline, args, world)


def expected_bytes(c: dict, T: int, world: int) -> int:
    """All-to-all bytes one rank sends per step with perfectly balanced routing: the (W-1)/W of its
    T/W*k slots that leave it, [D] fp32 each, four times (dispatch, return, and their gradients)."""
    slots = T // world * c["k"]
    return int(4 * slots * (world - 1) / world * c["D"] * 4)


def report(results: dict, baseline: dict[str, float], args: argparse.Namespace, world: int) -> None:
    lines = [
        f"MoE layer forward+backward on {world} processes x 1 thread (gloo, CPU), {args.tokens} tokens per step in total; "
        f"median of {args.steps} steps (variants interleaved); torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "",
        f"{'config':8} {'variant':16} {'step ms':>8} {'compute ms':>10} {'comm ms':>8} {'comm %':>7} {'MiB sent/rank':>13} {'balanced MiB':>12}",
    ]
    out = {"tokens": args.tokens, "world": world, "steps": args.steps, "torch": torch.__version__, "configs": {}}
    for name, per_variant in results.items():
        c = CONFIGS[name]
        out["configs"][name] = {"shape": c, "variants": {}}
        for variant, ranks in per_variant.items():
            step = max(r["total_s"] for r in ranks)  # the slowest rank sets the pace
            comm = statistics.mean(r["comm_s"] for r in ranks)
            sent = statistics.mean(r["bytes"] for r in ranks)
            expect = expected_bytes(c, args.tokens, world) if variant == "expert parallel" else sent
            lines.append(
                f"{name:8} {variant:16} {step * 1e3:8.1f} {(step - comm) * 1e3:10.1f} {comm * 1e3:8.1f} {100 * comm / step:6.1f}% {sent / 2**20:13.2f} {expect / 2**20:12.2f}"
            )
            out["configs"][name]["variants"][variant] = {
                "step_s": step,
                "comm_s": comm,
                "bytes_sent_per_rank": sent,
                "balanced_bytes": expect,
                "ranks": ranks,
            }
        if name in baseline:
            lines.append(
                f"{name:8} {'one process':16} {baseline[name] * 1e3:8.1f} {'':>10} {'':>8} {'':>7} {'':>13} {'':>12}   (2 threads, all {args.tokens} tokens)"
            )
            out["configs"][name]["one_process_2_threads_s"] = baseline[name]
        phases = statistics.mean(
            sum(r["phases"].get(p, 0.0) for p in r["phases"]) for r in per_variant["expert parallel"]
        )
        detail = per_variant["expert parallel"][0]["phases"]
        lines.append(
            f"{'':8} {'':16} all-to-all by phase on rank 0 (ms): "
            + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in detail.items())
            + f" (total {phases * 1e3:.1f})"
        )
    lines += [
        "",
        "CPU measurement (gloo over loopback on a shared machine): it shows the volume and the shape of the split, not GPU interconnect speed.",
    ]
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


def _spawned(rank: int, world: int, port: int, args: argparse.Namespace, baseline: dict[str, float]) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(minutes=10)
    )
    try:
        worker(rank, world, args, baseline)
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per step over all ranks")
    ap.add_argument("--configs", default="coarse,fine")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "expert_parallel.json"))
    args = ap.parse_args()
    if "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo", timeout=timedelta(minutes=10))
        try:
            worker(dist.get_rank(), dist.get_world_size(), args, {})
        finally:
            dist.destroy_process_group()
        return
    torch.set_num_threads(2)
    baseline = {
        name: one_process(CONFIGS[name], args.tokens, args.steps, args.warmup) for name in args.configs.split(",")
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.multiprocessing.spawn(_spawned, args=(2, port, args, baseline), nprocs=2, join=True)


if __name__ == "__main__":
    main()
