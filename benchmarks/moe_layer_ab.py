"""The MoE layer's speed in two checkouts of moelab, interleaved: did a change move it?

Each round runs every checkout once, in a fresh subprocess (the two versions cannot share a process),
and each subprocess times the MoE layer against the dense SwiGLU of the same active FLOPs in that
process (benchmarks/moe_layer.py's coarse and fine shapes, T=4096, fp32): forward in eval mode and
forward+backward in train mode, medians of a few calls. Ratios to dense are compared, not times.

    git worktree add /tmp/before <commit>
    python benchmarks/moe_layer_ab.py /tmp/before . [--rounds 3] [--out benchmarks/results/moe_layer_ab.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

SHAPES = {"coarse": (8, 2, 1024), "fine": (64, 8, 256)}  # E, k, I at D = 512


def measure(checkout: str) -> dict:
    """In this process: the layer of `checkout` against the dense SwiGLU, both shapes."""
    sys.path.insert(0, str(Path(checkout).resolve() / "src"))
    import time

    import torch

    from moelab.config import MoEConfig
    from moelab.model.mlp import SwiGLU
    from moelab.model.moe import MoE

    torch.manual_seed(0)
    out = {}
    for name, (E, k, hidden) in SHAPES.items():
        modules = {
            "moe": MoE(512, MoEConfig(num_experts=E, top_k=k, expert_hidden=hidden)),
            "dense": SwiGLU(512, k * hidden),
        }
        x = torch.randn(1, 4096, 512)
        times = {}
        for label, module in modules.items():
            with torch.no_grad():
                for p in module.parameters():
                    p.normal_(0, 512**-0.5)
            module.eval()
            with torch.no_grad():
                module(x)
                fwd = []
                for _ in range(7):
                    start = time.perf_counter()
                    module(x)
                    fwd.append(time.perf_counter() - start)
            module.train()
            x_grad = x.clone().requires_grad_(True)
            both = []
            for _ in range(5):
                start = time.perf_counter()
                y = module(x_grad)
                (y[0] if isinstance(y, tuple) else y).sum().backward()
                both.append(time.perf_counter() - start)
            times[label] = (statistics.median(fwd), statistics.median(both))
        out[name] = {
            "fwd_ratio": times["moe"][0] / times["dense"][0],
            "fwd_bwd_ratio": times["moe"][1] / times["dense"][1],
            "moe_fwd_ms": times["moe"][0] * 1e3,
            "moe_fwd_bwd_ms": times["moe"][1] * 1e3,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkouts", nargs="*", help="two or more repository roots")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_layer_ab.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    if len(args.checkouts) < 2:
        ap.error("give two or more checkouts to compare")
    rows = []
    for r in range(args.rounds):
        for checkout in args.checkouts:
            done = subprocess.run(
                [sys.executable, __file__, "--child", checkout], capture_output=True, text=True, check=True
            )
            rows.append({"round": r, "checkout": checkout, **json.loads(done.stdout)})
    print("| checkout | shape | fwd x dense (rounds) | fwd+bwd x dense (rounds) |")
    print("| --- | --- | --- | --- |")
    for checkout in args.checkouts:
        for shape in SHAPES:
            mine = [row[shape] for row in rows if row["checkout"] == checkout]
            fwd = ", ".join(f"{m['fwd_ratio']:.2f}" for m in mine)
            both = ", ".join(f"{m['fwd_bwd_ratio']:.2f}" for m in mine)
            print(f"| {checkout} | {shape} | {fwd} | {both} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
