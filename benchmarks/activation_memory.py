"""Activation memory with and without activation checkpointing; compiled against eager step time;
the graph breaks of the MoE path under torch.compile.

1. Memory, two ways, for a training forward+backward of one model (train.activation_checkpointing
   off / on):
   * held for the backward: bytes of the distinct tensors autograd keeps between the forward and the
     backward (torch.autograd.graph.saved_tensors_hooks around the forward, parameters excluded),
     plus, with checkpointing, each block's input, which the checkpoint keeps instead;
   * process peak: in a fresh child process per setting (glibc's mmap threshold fixed, so freed
     tensors leave the resident set), the peak resident memory (VmHWM, reset after a first
     step) during a second forward+backward minus the resident memory just before it (on CUDA:
     torch.cuda.max_memory_allocated minus the memory allocated before). Gradients count in both
     settings alike.
2. Step time (forward, backward, AdamW), eager blocks against `Transformer.compile_blocks`, both
   with and without checkpointing, built alike and timed side by side in one process, steps
   interleaved; the fastest and the median step (on a shared machine the fastest is the least
   disturbed); the first compiled step (the compile) is reported apart.
3. torch._dynamo.explain of one block per MoE variant: graphs and graph breaks, with reasons.

    python benchmarks/activation_memory.py [--device cpu] [--steps 5] [--out docs/results/activation-memory-bench.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from moelab.config import ModelConfig, MoEConfig
from moelab.model import Transformer
from moelab.model.compiling import compile_problem, graph_breaks

# Big enough that activations dominate: 6 blocks, D = 256, 8 experts of I = 512 (k = 2), 4 x 256 tokens.
MODEL = ModelConfig(
    vocab_size=512,
    d_model=256,
    n_layers=6,
    n_heads=8,
    n_kv_heads=4,
    ffn_hidden=1024,
    max_seq_len=256,
    moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=512),
)
BATCH, SEQ = 4, 256
MiB = 2**20


def build(device: torch.device, checkpointing: bool, compiled: bool = False) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(MODEL).to(device)
    model.train()
    model.activation_checkpointing = checkpointing
    if compiled:
        model.compile_blocks()
    return model


def batch(device: torch.device, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, MODEL.vocab_size, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def loss_of(model: Transformer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return F.cross_entropy(out.logits.reshape(-1, MODEL.vocab_size), y.reshape(-1)) + out.aux_loss


def held_for_backward(device: torch.device, checkpointing: bool) -> int:
    """Bytes of the distinct tensor storages autograd keeps for the backward (parameters excluded),
    plus the block inputs a checkpoint keeps."""
    model = build(device, checkpointing)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    buffers = {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in buffers:
            seen[ptr] = storage.nbytes()
        return t

    x, y = batch(device)
    block_inputs = 0
    if checkpointing:
        # NOTE: inside a checkpointed region the checkpoint's own hooks take over (they save nothing
        # but the region's inputs); count those inputs: the residual stream entering each block.
        block_inputs = MODEL.n_layers * BATCH * SEQ * MODEL.d_model * 4
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model, x, y)
    loss.backward()
    return sum(seen.values()) + block_inputs


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_child(device_name: str, checkpointing: bool, queue) -> None:
    device = torch.device(device_name)
    model = build(device, checkpointing)
    x, y = batch(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss_of(model, x, y).backward()
        torch.cuda.synchronize()
        queue.put(torch.cuda.max_memory_allocated() - before)
        return
    # NOTE: a first step pages in the kernels' code and the libraries' work buffers (tens of MiB
    # of resident memory that are not activations); then the peak is reset (clear_refs 5 resets
    # VmHWM) and the second step is measured.
    loss_of(model, x, y).backward()
    model.zero_grad(set_to_none=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _current_rss()
    loss_of(model, x, y).backward()
    queue.put(_peak_rss() - before)


def process_peak(device: torch.device, checkpointing: bool) -> int:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_peak_child, args=(device.type, checkpointing, queue))
    # NOTE: glibc raises its mmap threshold after large frees, and memory then freed stays resident,
    # so the resident peak would count reuse patterns, not live tensors: a fixed threshold returns
    # every large tensor's pages when it is freed (the child only; timings run with the defaults).
    old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    try:
        child.start()
    finally:
        if old is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = old
    value = queue.get(timeout=600)
    child.join()
    return value


def step_times(device: torch.device, steps: int) -> dict[str, dict[str, float]]:
    """Median seconds per training step of each variant, interleaved; compile seconds apart."""
    variants = {
        "eager": (False, False),
        "eager + checkpointing": (False, True),
        "compiled": (True, False),
        "compiled + checkpointing": (True, True),
    }
    runs = {}
    for name, (compiled, checkpointing) in variants.items():
        model = build(device, checkpointing, compiled)
        runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    x, y = batch(device)

    def one_step(model, opt) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss_of(model, x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    first = {name: one_step(*run) for name, run in runs.items()}  # compiles; warms the eager ones up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(steps):
        for name, run in runs.items():
            times[name].append(one_step(*run))
    return {
        name: {"min_s": min(t), "median_s": statistics.median(t), "first_step_s": first[name]}
        for name, t in times.items()
    }


def audit(device: torch.device) -> dict[str, dict]:
    variants = {
        "moe dropless (grouped_mm)": {},
        "moe dropless (padded bmm)": {"matmul": "padded"},
        "moe capacity 1.25": {"capacity_factor": 1.25},
        "moe expert choice": {"routing": "expert_choice"},
        "dense block": None,
    }
    out = {}
    for name, change in variants.items():
        torch.manual_seed(0)
        matmul = (change or {}).pop("matmul", None) if change is not None else None
        moe = None if change is None else replace(MODEL.moe, **change)
        cfg = replace(MODEL, n_layers=1, moe=moe)
        model = Transformer(cfg).to(device)
        model.train()
        block = model.blocks[0]
        if matmul is not None:
            block.ffn.experts.matmul = matmul
        x = torch.randn(BATCH, SEQ, cfg.d_model, device=device)
        cos, sin = model.rope_cos[:SEQ][None], model.rope_sin[:SEQ][None]
        out[name] = graph_breaks(block, x, cos, sin, None, None, 0, None).to_dict()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per variant (after one untimed)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--memory-only", action="store_true", help="skip the step times and the graph-break audit")
    args = parser.parse_args()
    device = torch.device(args.device)
    problem = compile_problem(device)
    result: dict = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "model": {
            "d_model": MODEL.d_model,
            "n_layers": MODEL.n_layers,
            "experts": 8,
            "top_k": 2,
            "expert_hidden": 512,
            "batch": BATCH,
            "seq_len": SEQ,
        },  # fmt: skip
        "compile_problem": problem,
    }
    memory = {}
    for checkpointing in (False, True):
        memory["on" if checkpointing else "off"] = {
            "held_for_backward_bytes": held_for_backward(device, checkpointing),
            "process_peak_bytes": process_peak(device, checkpointing),
        }
    result["memory"] = memory
    print(
        f"Activation memory: {MODEL.n_layers} blocks, D={MODEL.d_model}, E=8 k=2 I=512, {BATCH}x{SEQ} tokens, fp32, {device}"
    )
    print(f"{'checkpointing':<15}{'held for backward MiB':>24}{'process peak MiB':>20}")
    for key, m in memory.items():
        print(f"{key:<15}{m['held_for_backward_bytes'] / MiB:>24.1f}{m['process_peak_bytes'] / MiB:>20.1f}")
    off, on = memory["off"], memory["on"]
    print(
        f"{'on / off':<15}{on['held_for_backward_bytes'] / off['held_for_backward_bytes']:>24.3f}"
        f"{on['process_peak_bytes'] / off['process_peak_bytes']:>20.3f}"
    )
    if args.memory_only:
        pass
    elif problem is None:
        times = step_times(device, args.steps)
        result["step_times"] = times
        base = times["eager"]
        print(f"\nTraining step (forward, backward, AdamW), {args.steps} steps each, variants interleaved")
        print(f"{'variant':<26}{'min ms':>9}{'eager/this':>11}{'median ms':>11}{'eager/this':>11}{'first step s':>14}")
        for name, t in times.items():
            print(
                f"{name:<26}{t['min_s'] * 1e3:>9.1f}{base['min_s'] / t['min_s']:>11.3f}"
                f"{t['median_s'] * 1e3:>11.1f}{base['median_s'] / t['median_s']:>11.3f}{t['first_step_s']:>14.2f}"
            )
        result["graph_breaks"] = audit(device)
        print("\nGraph breaks of one block under torch.compile (torch._dynamo.explain)")
        for name, report in result["graph_breaks"].items():
            print(f"{name:<28} graphs {report['graphs']}, breaks {report['breaks']}")
            for reason, count in report["reasons"].items():
                print(f"    {count} x {reason}")
    else:
        print(f"\ntorch.compile cannot run here: {problem}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
