"""The chunked CPU experts path at several chunk sizes, against the one-shot grouped path and the
dense SwiGLU of the same FLOPs, in one process with interleaved rounds.

Shapes: benchmarks/moe_layer.py's coarse (D=512, I=1024, E=8, k=2) and fine (D=512, I=256, E=64,
k=8) at T=4096, and the default preset's layer (D=128, I=64, E=64, k=6, T=8192 = one batch of
32 x 256) without its shared expert. Forward in eval mode, forward+backward in train mode (with the
router losses); each cell is the median over rounds divided by the dense reference's median.
`moelab.model.chunked_experts.CHUNK_BYTES` is what the chunk sizes set.

Also printed, the cost the chunks avoid: gathering the fine shape's 32768 token-slots of width 512
(64 MB) into a fresh tensor against into one allocated before the timing, and zero-filling a fresh
64 MB tensor (a fresh allocation this large is a new mapping whose pages fault on first write).

    python benchmarks/chunk_size.py [--rounds 9] [--shapes coarse,fine,preset] [--out benchmarks/results/chunk_size.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import moelab.model.chunked_experts as chunked  # noqa: E402
from moelab.config import MoEConfig  # noqa: E402
from moelab.model.mlp import SwiGLU  # noqa: E402
from moelab.model.moe import MoE  # noqa: E402

SHAPES = {
    "coarse": dict(D=512, I=1024, E=8, k=2, T=4096),
    "fine": dict(D=512, I=256, E=64, k=8, T=4096),
    "preset": dict(D=128, I=64, E=64, k=6, T=8192),
}
# name -> (Experts.matmul, chunk bytes)
VARIANTS = {
    "dense": None,
    "one-shot grouped_mm": ("grouped_mm", None),
    "chunked 1 MiB": ("chunked", 1 << 20),
    "chunked 4 MiB": ("chunked", 4 << 20),
    "chunked 16 MiB": ("chunked", 16 << 20),
}


def run(shape: dict, rounds: int) -> dict:
    D, I, E, k, T = (shape[n] for n in ("D", "I", "E", "k", "T"))
    torch.manual_seed(0)
    moe = MoE(D, MoEConfig(num_experts=E, top_k=k, expert_hidden=I))
    dense = SwiGLU(D, k * I)
    with torch.no_grad():
        for p in [*moe.parameters(), *dense.parameters()]:
            p.normal_(0.0, p.shape[-1] ** -0.5)
    x = torch.randn(1, T, D)
    upstream = torch.randn(1, T, D)
    default_bytes = chunked.CHUNK_BYTES

    def call(name: str, train: bool) -> None:
        variant = VARIANTS[name]
        module = dense if variant is None else moe
        if variant is not None:
            moe.experts.matmul = variant[0]
            chunked.CHUNK_BYTES = variant[1] or default_bytes
        if not train:
            module.eval()
            with torch.no_grad():
                module(x)
            return
        module.train()
        out = module(x.clone().requires_grad_(True))
        loss = (out[0] * upstream).sum() + out[1] if isinstance(out, tuple) else (out * upstream).sum()
        loss.backward()
        for p in module.parameters():
            p.grad = None

    times = {(name, train): [] for name in VARIANTS for train in (False, True)}
    try:
        for name in VARIANTS:  # warm-up
            call(name, False)
            call(name, True)
        for _ in range(rounds):
            for name in VARIANTS:
                for train in (False, True):
                    start = time.perf_counter()
                    call(name, train)
                    times[(name, train)].append(time.perf_counter() - start)
    finally:
        chunked.CHUNK_BYTES = default_bytes
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {
        name: {
            "forward_ratio": median(times[(name, False)]) / median(times[("dense", False)]),
            "forward_backward_ratio": median(times[(name, True)]) / median(times[("dense", True)]),
            "forward_s": median(times[(name, False)]),
            "forward_backward_s": median(times[(name, True)]),
        }
        for name in VARIANTS
    }


def allocation_cost(rounds: int) -> dict:
    """Milliseconds (median) of the fine shape's gather into a fresh / a reused [32768, 512] fp32
    tensor, and of torch.zeros of that size."""
    gen = torch.Generator().manual_seed(0)
    x_TD = torch.randn(4096, 512, generator=gen)
    token_index_S = torch.randint(0, 4096, (32768,), generator=gen)
    reused_SD = torch.empty(32768, 512)
    cases = {
        "gather into a fresh tensor": lambda: x_TD.index_select(0, token_index_S),
        "gather into a reused tensor": lambda: torch.index_select(x_TD, 0, token_index_S, out=reused_SD),
        "zeros, fresh": lambda: torch.zeros(32768, 512),
    }
    times = {name: [] for name in cases}
    for _ in range(rounds + 1):  # the first round is a warm-up
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(v[1:])[len(v[1:]) // 2] * 1e3 for name, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--shapes", default="coarse,fine,preset")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "chunk_size.json"))
    args = ap.parse_args()
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": args.rounds, "shapes": {}}
    names = [s for s in args.shapes.split(",") if s]
    unknown = [n for n in names if n not in SHAPES]
    if unknown or not names:
        ap.error(f"--shapes {args.shapes!r}: unknown {unknown}; choose from {', '.join(SHAPES)}")
    for name in names:
        shape = SHAPES[name]
        rows = run(shape, args.rounds)
        results["shapes"][name] = {"shape": shape, "rows": rows}
        print(f"\n{name}: " + " ".join(f"{k}={v}" for k, v in shape.items()) + f", fp32, {results['threads']} threads")
        print(f"{'variant':22s} {'fwd x':>7s} {'f+b x':>7s}")
        for variant, r in rows.items():
            print(f"{variant:22s} {r['forward_ratio']:7.2f} {r['forward_backward_ratio']:7.2f}")
    results["allocation_ms"] = allocation_cost(args.rounds)
    print(
        "\nfine shape's 64 MB slot tensor: " + ", ".join(f"{k} {v:.1f} ms" for k, v in results["allocation_ms"].items())
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
