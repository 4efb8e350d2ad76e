"""Per-process training state under DDP and FSDP2 (`parallel.data_parallel`), at 1, 2 and 4 processes,
each also with expert parallelism over groups of 2 processes (`parallel.expert = 2`: "ddp+ep", "fsdp+ep").

For each setting, spawned gloo processes on this CPU build the same MoE transformer, set it up with
moelab's Distributed runtime (expert sharding; DDP, or fully_shard per block then the root, the
experts over their replicas under fsdp+ep), and take a few AdamW steps (forward + backward +
expert-gradient reduction + clip + step) on random tokens. Each process then counts the bytes it
holds of

    parameters   the local tensors (for FSDP's DTensors the shard, `.to_local()`)
    gradients    `.grad` of each parameter, local shards likewise (DDP's reducer buckets not counted)
    optimizer    AdamW's moments and step counters, local shards likewise

its peak memory (resident set high-water mark minus the resident set before the model was built:
weights, gradients, optimizer state, activations and communication buffers together, plus allocator
slack) and the step time (median of the timed steps, slowest rank). "/ DDP" is the process's
parameters + gradients + optimizer state over the same under DDP at the same world size. Step
times on a shared 2-core CPU with W processes of one thread each over loopback TCP show the shape of
the cost, not what NCCL on GPUs gives.

    python benchmarks/distributed_memory.py [--worlds 1,2,4] [--modes ddp,fsdp,ddp+ep,fsdp+ep] [--steps 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moelab.config import DataConfig, ModelConfig, MoEConfig, ParallelConfig, RunConfig, TrainConfig  # noqa: E402
from moelab.distributed import fsdp  # noqa: E402
from moelab.distributed.layout import make_layout  # noqa: E402
from moelab.distributed.runtime import Distributed  # noqa: E402
from moelab.model import Transformer  # noqa: E402
from moelab.train.schedule import build_optimizer  # noqa: E402

MODEL = dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, ffn_hidden=1024, max_seq_len=128)
MOE = dict(num_experts=8, top_k=2, expert_hidden=512)
BATCH, SEQ = 8, 64  # global batch, split over the processes
EXPERT = 2  # expert-parallel group size of the "+ep" modes


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _bytes(tensors) -> int:
    return sum(fsdp.local_tensor(t).numel() * t.element_size() for t in tensors if t is not None)


def _worker(rank: int, world: int, port: int, mode: str, steps: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=600)
    )
    try:
        data_parallel, _, ep = mode.partition("+")
        cfg = RunConfig(
            model=ModelConfig(**MODEL, moe=MoEConfig(**MOE)),
            data=DataConfig(seq_len=SEQ),
            train=TrainConfig(batch_size=BATCH, device="cpu"),
            parallel=ParallelConfig(expert=EXPERT if ep else 1, data_parallel=data_parallel),
        ).validate()
        runtime = Distributed(make_layout(cfg, world, rank, rank), torch.device("cpu"), data_parallel)
        rss0 = _rss_bytes()
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        runtime.shard(model)
        train_model = runtime.wrap(model)
        optimizer = build_optimizer(model, cfg.train)
        g = torch.Generator().manual_seed(1 + rank)
        times = []
        for i in range(steps + 1):  # the first step (state allocation) is not timed
            x = torch.randint(0, MODEL["vocab_size"], (BATCH // world, SEQ), generator=g)
            dist.barrier()
            t0 = time.perf_counter()
            out = train_model(x)
            loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), x.roll(-1, 1).flatten()) + out.aux_loss
            loss.backward()
            runtime.finish_backward(model)
            runtime.clip_grad_norm(model, 1.0)
            optimizer.step()
            dt = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if i:
                times.append(float(dt))
            if i < steps:
                optimizer.zero_grad(set_to_none=True)
        params = list(model.parameters())
        state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        results.put(
            (
                rank,
                {
                    "params_bytes": _bytes(params),
                    "grads_bytes": _bytes(p.grad for p in params),
                    "optim_bytes": _bytes(state),
                    "peak_bytes": _peak_rss_bytes() - rss0,
                    "step_ms": 1e3 * statistics.median(times),
                    "total_params": sum(p.numel() for p in params) if mode == "ddp" else None,
                },
            )
        )
    finally:
        dist.destroy_process_group()


def run(mode: str, world: int, steps: int) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, world, port, mode, steps, results)) for r in range(world)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=900) for _ in procs)
    for p in procs:
        p.join()
    worst = max(got.values(), key=lambda r: r["params_bytes"] + r["grads_bytes"] + r["optim_bytes"])
    return {"mode": mode, "world": world, **worst, "total_params": got[0]["total_params"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--modes", default="ddp,fsdp,ddp+ep,fsdp+ep")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    modes = args.modes.split(",")
    if "ddp" not in modes:
        ap.error("--modes must include ddp (the reference of the '/ DDP' column)")
    rows = [
        run(mode, w, args.steps)
        for w in map(int, args.worlds.split(","))
        for mode in modes
        if not (mode.endswith("+ep") and w % EXPERT)  # expert parallelism needs whole groups
    ]
    ddp = {r["world"]: r for r in rows if r["mode"] == "ddp"}
    total = lambda r: r["params_bytes"] + r["grads_bytes"] + r["optim_bytes"]  # noqa: E731
    mib = 2**20
    print(
        f"MoE transformer {MODEL} moe {MOE}: {ddp[min(ddp)]['total_params'] / 1e6:.2f}M parameters, fp32 AdamW; "
        f"global batch {BATCH} x {SEQ} tokens; +ep: parallel.expert = {EXPERT}; gloo on CPU, 1 thread per process; "
        "largest rank shown"
    )
    print(
        f"{'mode':<9}{'W':>3}{'params MiB':>12}{'grads MiB':>11}{'optim MiB':>11}{'total MiB':>11}{'/ DDP':>8}"
        f"{'peak MiB':>10}{'step ms':>10}"
    )
    for r in rows:
        r["sharded_over_ddp"] = total(r) / total(ddp[r["world"]])
        print(
            f"{r['mode']:<9}{r['world']:>3}{r['params_bytes'] / mib:>12.2f}{r['grads_bytes'] / mib:>11.2f}"
            f"{r['optim_bytes'] / mib:>11.2f}{total(r) / mib:>11.2f}{r['sharded_over_ddp']:>8.3f}"
            f"{r['peak_bytes'] / mib:>10.1f}{r['step_ms']:>10.1f}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"model": MODEL, "moe": MOE, "batch": BATCH, "seq": SEQ, "steps": args.steps, "expert": EXPERT}
        meta |= {"torch": torch.__version__, "machine": platform.machine(), "cpus": __import__("os").cpu_count()}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
