"""MoE layer speed and memory against a dense SwiGLU of the same FLOPs, in one process.

Configurations (DESIGN.md): coarse D=512 I=1024 E=8 k=2 and fine-grained D=512 I=256 E=64 k=8,
T=4096 tokens, fp32. The dense reference is a SwiGLU of hidden size k*I. Forward is timed in eval
mode (inference), forward+backward in train mode (with the router losses and statistics the trainer
pays for). Where Hugging Face transformers is installed, its Mixtral and OLMoE sparse blocks (eager
and grouped_mm experts) run in the same table. Timings are interleaved (every implementation once
per round) and the median of the rounds is reported as a ratio to the dense reference. Peak memory
is the growth of the resident set during one forward+backward (activations, gradients, dispatch
buffers), measured in a fresh subprocess per implementation.

The training section times whole optimizer steps (forward, backward, AdamW) of the default preset
(small-moe) and its dense twin (small-dense) on one batch of the preset's shape, interleaved, and
reports tokens/s, against small-dense (FFN hidden 512) and against the dense twin `moelab compare`
derives (hidden 533: the router's FLOPs matched), once per --train-threads count;
`small-moe (grouped_mm)` is the same model with the one-shot dispatch that the chunked CPU path
replaced. Before it, per thread count, one layer of the default preset at its training shape (T =
32 x 256 tokens, D = 128, train mode with autograd recording) taken apart: the router with its
dispatch plan, the routed experts, the shared expert, the whole layer (with the routing statistics
and losses) forward and forward+backward, against small-dense's FFN.

    python benchmarks/moe_layer.py [--rounds 7] [--tokens 4096] [--train-steps 5] [--train-threads 1,2]
                                   [--configs coarse,fine] [--out benchmarks/results/moe_layer.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moelab.config import MoEConfig, load_config  # noqa: E402
from moelab.model.mlp import SwiGLU  # noqa: E402
from moelab.model.moe import MoE  # noqa: E402
from moelab.model.transformer import Transformer  # noqa: E402
from moelab.train.schedule import build_optimizer  # noqa: E402

CONFIGS = {
    "coarse": dict(D=512, I=1024, E=8, k=2),
    "fine": dict(D=512, I=256, E=64, k=8),
}


def init_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return module


def build(name: str, c: dict) -> torch.nn.Module | None:
    """A module mapping [1, T, D] -> [1, T, D] (or a tuple whose first item is that)."""
    D, I, E, k = c["D"], c["I"], c["E"], c["k"]
    if name == "dense":
        return init_(SwiGLU(D, k * I), 0)
    if name == "moelab":
        return init_(MoE(D, MoEConfig(num_experts=E, top_k=k, expert_hidden=I)), 1)
    if name in ("moelab-padded", "moelab-grouped_mm"):  # the dispatch paths "auto" does not take on the CPU
        m = init_(MoE(D, MoEConfig(num_experts=E, top_k=k, expert_hidden=I)), 1)
        m.experts.matmul = name.split("-")[1]
        return m
    try:
        from transformers import MixtralConfig, OlmoeConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    except ImportError:
        return None
    family, impl = name.split(":")
    if family == "hf-mixtral":
        cfg = MixtralConfig(hidden_size=D, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k)
        cfg._experts_implementation = impl
        return init_(MixtralSparseMoeBlock(cfg), 2)
    cfg = OlmoeConfig(hidden_size=D, intermediate_size=I, num_experts=E, num_experts_per_tok=k, norm_topk_prob=False)
    cfg._experts_implementation = impl
    return init_(OlmoeSparseMoeBlock(cfg), 3)


IMPLS = [
    "dense",
    "moelab",
    "moelab-grouped_mm",
    "moelab-padded",
    "hf-mixtral:eager",
    "hf-mixtral:grouped_mm",
    "hf-olmoe:eager",
    "hf-olmoe:grouped_mm",
]


def first(out):
    return out[0] if isinstance(out, tuple) else out


def forward(module, x):
    module.eval()
    with torch.no_grad():
        first(module(x))


def forward_backward(module, x, grad):
    module.train()
    out = module(x)
    loss = (first(out) * grad).sum()
    if isinstance(out, tuple):
        loss = loss + out[1]  # moelab's router losses
    loss.backward()
    for p in module.parameters():
        p.grad = None


def time_round(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child_memory(impl: str, config: str, tokens: int) -> None:
    """Run in a subprocess: print the resident-set growth of one forward+backward, in bytes.

    NOTE: ru_maxrss cannot be reset, so the peak left behind by building the module (init
    temporaries) hid the forward+backward's own peak. Linux resets the peak (VmHWM) on a write of
    "5" to /proc/self/clear_refs; with malloc's mmap threshold lowered (set by the parent), freed
    buffers leave the resident set at once, so the resident set tracks live memory."""
    c = CONFIGS[config]
    module = build(impl, c)
    x = torch.randn(1, tokens, c["D"], generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    grad = torch.randn(1, tokens, c["D"])
    forward_backward(module, x, grad)  # warm-up: one-time allocations (thread pools, kernels)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    forward_backward(module, x, grad)
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_bytes": (peak - before) * 1024}))


def peak_memory(impl: str, config: str, tokens: int) -> int | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(
        [sys.executable, __file__, "--child", impl, config, "--tokens", str(tokens)],
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode != 0:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


# preset "@twin": the dense twin `moelab compare` derives from small-moe (FFN hidden 533, so that the
# router's FLOPs are matched too); small-dense is the preset with FFN hidden 512
TRAIN_ARMS = {
    "small-dense": ("small-dense", None),
    "compare's dense twin": ("@twin", None),
    "small-moe": ("small-moe", "auto"),
    "small-moe (grouped_mm)": ("small-moe", "grouped_mm"),
}


def preset_config(preset: str):
    """The preset's config; the tokenizer sets model.vocab_size when a run starts, here the data
    section's size stands in."""
    return load_config(preset=preset, overrides=[f"model.vocab_size={load_config(preset=preset).data.vocab_size}"])


def layer_breakdown(rounds: int) -> dict:
    """Milliseconds (median of interleaved rounds) of one small-moe layer's parts and of small-dense's
    FFN at the preset's training shape, in train mode with autograd recording, as a training step
    runs them."""
    layers = {}
    for preset in ("small-moe", "small-dense"):
        cfg = preset_config(preset)
        torch.manual_seed(0)
        layers[preset] = Transformer(cfg.model).blocks[0].ffn.train()
        T = cfg.train.batch_size * cfg.data.seq_len
    moe, dense = layers["small-moe"], layers["small-dense"]
    D = moe.router.weight.shape[1]
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(7), requires_grad=True)
    grad_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(8))
    plan = moe.router(x_TD).plan

    def whole(module) -> None:
        out = module(x_TD[None])
        (first(out)[0] * grad_TD).sum().add(out[1] if isinstance(out, tuple) else 0).backward()
        module.zero_grad(set_to_none=True)
        x_TD.grad = None

    parts = {
        "dense FFN forward": lambda: dense(x_TD[None]),
        "dense FFN forward+backward": lambda: whole(dense),
        "MoE router and plan": lambda: moe.router(x_TD),
        "MoE routed experts": lambda: moe.experts(x_TD, plan),
        "MoE shared expert": lambda: moe.shared(x_TD),
        "MoE layer forward": lambda: moe(x_TD[None]),
        "MoE layer forward+backward": lambda: whole(moe),
    }
    times = {name: [] for name in parts}
    for fn in parts.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in parts.items():
            times[name].append(time_round(fn))
    moe.reset_stats()
    return {name: sorted(v)[len(v) // 2] * 1e3 for name, v in times.items()}


def train_throughput(steps: int, rounds: int) -> dict:
    """Optimizer steps per arm on a fixed random batch of the preset's shape: tokens/s per arm (the
    median over interleaved rounds of `steps` steps each) and the ratio to the dense twin."""
    arms = {}
    for name, (preset, matmul) in TRAIN_ARMS.items():
        cfg = preset_config("small-moe" if preset == "@twin" else preset)
        if preset == "@twin":
            from moelab.analysis.compare import dense_twin

            cfg = dense_twin(cfg)
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        if matmul is not None:
            for moe in model.moe_layers():
                moe.experts.matmul = matmul
        model.train()
        optimizer = build_optimizer(model, cfg.train)
        B, T = cfg.train.batch_size, cfg.data.seq_len
        tokens = torch.randint(0, cfg.model.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(1))
        arms[name] = (model, optimizer, tokens[:, :-1], tokens[:, 1:])

    def step(model, optimizer, x, y):
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), y.reshape(-1))
        (loss + out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = {name: [] for name in arms}
    for arm in arms.values():  # warm-up
        step(*arm)
    for _ in range(rounds):
        for name, arm in arms.items():
            times[name].append(time_round(lambda: [step(*arm) for _ in range(steps)]))
    rows = {}
    for name, (_, _, x, _) in arms.items():
        seconds = sorted(times[name])[len(times[name]) // 2]
        rows[name] = {"tokens_per_s": x.numel() * steps / seconds, "step_s": seconds / steps}
    for row in rows.values():
        row["ratio_to_dense"] = row["tokens_per_s"] / rows["small-dense"]["tokens_per_s"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--configs", default="coarse,fine")
    ap.add_argument(
        "--train-steps", type=int, default=3, help="optimizer steps per round in the training section (0: skip it)"
    )
    ap.add_argument(
        "--train-threads",
        default=str(torch.get_num_threads()),
        help="comma-separated torch thread counts for the training section (default: torch's)",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_layer.json"))
    ap.add_argument("--child", nargs=2, metavar=("IMPL", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_memory(args.child[0], args.child[1], args.tokens)
        return
    try:
        train_threads = [int(t) for t in args.train_threads.split(",")]
    except ValueError:
        ap.error(f"--train-threads must be comma-separated integers, got {args.train_threads!r}")
    if any(t < 1 for t in train_threads):
        ap.error("--train-threads must be >= 1")
    results = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "tokens": args.tokens,
        "configs": {},
    }
    try:
        import transformers

        results["transformers"] = transformers.__version__
    except ImportError:
        results["transformers"] = None
    configs = [c for c in args.configs.split(",") if c]
    if unknown := [c for c in configs if c not in CONFIGS]:
        ap.error(f"--configs {args.configs!r}: unknown {unknown}; choose from {', '.join(CONFIGS)} (or '' for none)")
    for config in configs:
        c = CONFIGS[config]
        modules = {name: m for name in IMPLS if (m := build(name, c)) is not None}
        x = torch.randn(1, args.tokens, c["D"], generator=torch.Generator().manual_seed(4))
        grad = torch.randn(1, args.tokens, c["D"], generator=torch.Generator().manual_seed(6))
        fwd = {name: [] for name in modules}
        fb = {name: [] for name in modules}
        for name, m in modules.items():  # warm-up
            forward(m, x)
            forward_backward(m, x.clone().requires_grad_(True), grad)
        for _ in range(args.rounds):
            for name, m in modules.items():
                fwd[name].append(time_round(lambda: forward(m, x)))
                xg = x.clone().requires_grad_(True)
                fb[name].append(time_round(lambda: forward_backward(m, xg, grad)))
        median = lambda v: sorted(v)[len(v) // 2]
        rows = {}
        for name in modules:
            rows[name] = {
                "forward_s": median(fwd[name]),
                "forward_backward_s": median(fb[name]),
                "forward_ratio": median(fwd[name]) / median(fwd["dense"]),
                "forward_backward_ratio": median(fb[name]) / median(fb["dense"]),
                "peak_memory_bytes": peak_memory(name, config, args.tokens),
            }
        results["configs"][config] = {"shape": c, "rows": rows}
        print(
            f"\n{config}: D={c['D']} I={c['I']} E={c['E']} k={c['k']} T={args.tokens} fp32, {results['threads']} threads, dense reference = SwiGLU hidden {c['k'] * c['I']}"
        )
        print(f"{'implementation':24s} {'fwd ms':>8s} {'fwd x':>7s} {'f+b ms':>8s} {'f+b x':>7s} {'peak MiB':>9s}")
        for name, r in rows.items():
            mem = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.0f}"
            print(
                f"{name:24s} {r['forward_s'] * 1e3:8.1f} {r['forward_ratio']:7.2f} {r['forward_backward_s'] * 1e3:8.1f} {r['forward_backward_ratio']:7.2f} {mem:>9s}"
            )
    if args.train_steps > 0:
        results["train"] = {}
        for threads in train_threads:
            torch.set_num_threads(threads)
            parts = layer_breakdown(args.rounds)
            results.setdefault("layer_breakdown", {})[str(threads)] = parts
            print(f"\none layer of the default preset at its training shape, {threads} thread(s), median ms")
            dense_fwd, dense_fb = parts["dense FFN forward"], parts["dense FFN forward+backward"]
            for name, ms in parts.items():
                reference = dense_fb if name.endswith("backward") else dense_fwd
                print(f"{name:28s} {ms:8.1f} ms  {ms / reference:5.2f}x the dense FFN's")
            rows = train_throughput(args.train_steps, args.rounds)
            results["train"][str(threads)] = rows
            print(
                f"\ntraining, {threads} thread(s): optimizer steps of the default preset and its dense twins, "
                f"{args.train_steps} steps per round"
            )
            print(f"{'arm':24s} {'tokens/s':>9s} {'step ms':>8s} {'vs small-dense':>15s} {'vs twin':>8s}")
            twin = rows["compare's dense twin"]["tokens_per_s"]
            for name, r in rows.items():
                print(
                    f"{name:24s} {r['tokens_per_s']:9.0f} {r['step_s'] * 1e3:8.1f} {r['ratio_to_dense']:15.2f} "
                    f"{r['tokens_per_s'] / twin:8.2f}"
                )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
