"""The moe_decode kernel of two C sources, interleaved in one process: did a change move it?

Both sources are compiled with the kernel's own flags (moelab.kernels.build.CFLAGS) and bound to
the same random weights of each shape (the small-moe preset's layer, and its coarse variant); for
each token count T every round times both once, alternating which goes first, with one thread
(as `moelab serve` runs). Outputs must be bitwise equal (the change is a speed change) or the
script stops. Reported: per T, the median time of each and the median of the per-round ratios
new / baseline, per layer, for each --layers count L: L layers of distinct weights called in turn,
as a model's forward calls them. L = 1 keeps one layer's weights hot in the caches; at L = 4 (the
preset's depth) the small-moe layers' 25 MB of experts exceed what the caches keep, so each call
reads its weights from memory, as a prefill inside the model does.

    git show HEAD~1:src/moelab/kernels/moe_decode.c > /tmp/base.c
    python benchmarks/moe_decode_ab.py /tmp/base.c [--new src/moelab/kernels/moe_decode.c]
        [--tokens 1,4,8,16,32,64,128] [--layers 1,4] [--rounds 7] [--out benchmarks/results/moe_decode_ab.json]
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moelab.kernels import build, moe_decode  # noqa: E402

# name: (D, E, k, I, shared hidden), route_scale = k
SHAPES = {"small-moe": (128, 64, 6, 64, 128), "small-moe-coarse": (128, 8, 2, 256, 0)}


def compile_kernel(source: Path, directory: Path):
    cc = build.compiler()
    if cc is None:
        raise SystemExit("moe_decode_ab.py: error: no C compiler (set CC, or install cc / gcc / clang)")
    library = directory / f"{source.stem}-{abs(hash(str(source.resolve())))}.so"
    done = subprocess.run([cc, *build.CFLAGS, "-o", str(library), str(source), "-lm"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"moe_decode_ab.py: error: compiling {source} failed: {done.stderr.strip()[-1000:]}")
    fn = ctypes.CDLL(str(library)).moelab_moe_decode_f32
    fn.argtypes = [ctypes.POINTER(moe_decode.LayerArgs), ctypes.c_int64] + [ctypes.c_void_p] * 4
    fn.restype = ctypes.c_int
    return fn


def layer_weights(D: int, E: int, k: int, I: int, Hs: int, gen: torch.Generator):
    def rnd(*shape, scale=0.05):
        return torch.randn(*shape, generator=gen) * scale

    shared = (rnd(2 * Hs, D), rnd(D, Hs)) if Hs else (None, None)
    return (rnd(E, D, scale=0.1), None, rnd(E, 2 * I, D), rnd(E, D, I), *shared, None)


def median_us(layers: list, x: torch.Tensor, calls: int) -> float:
    """Median microseconds per layer of one pass over `layers` (kernels bound to distinct weights)."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        for kernel in layers:
            kernel(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6 / len(layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("baseline", type=Path, help="the baseline moe_decode.c")
    ap.add_argument("--new", type=Path, default=Path(build.SOURCE_DIR) / "moe_decode.c")
    ap.add_argument("--tokens", default="1,4,8,16,32,64,128")
    ap.add_argument("--layers", default="1,4", help="comma-separated layer counts (distinct weights, called in turn)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=100, help="calls per timing (median kept)")
    ap.add_argument("--out", default="benchmarks/results/moe_decode_ab.json")
    args = ap.parse_args()
    for path in (args.baseline, args.new):
        if not path.is_file():
            ap.error(f"{path} is not a file")
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
        layer_counts = [int(n) for n in args.layers.split(",")]
    except ValueError:
        ap.error(f"--tokens and --layers must be comma-separated integers, got {args.tokens!r} and {args.layers!r}")
    if any(t < 1 for t in tokens + layer_counts) or args.rounds < 1 or args.calls < 1:
        ap.error("--tokens, --layers, --rounds and --calls must be >= 1")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        fns = {"baseline": compile_kernel(args.baseline, Path(tmp)), "new": compile_kernel(args.new, Path(tmp))}
        rows = []
        for (shape, (D, E, k, I, Hs)), L in itertools.product(SHAPES.items(), layer_counts):
            weights = [layer_weights(D, E, k, I, Hs, torch.Generator().manual_seed(layer)) for layer in range(L)]
            kernels = {
                n: [moe_decode.MoEDecodeKernel(fn, w, k, "softmax", True, float(k)) for w in weights]
                for n, fn in fns.items()
            }
            for T in tokens:
                x = torch.randn(T, D, generator=torch.Generator().manual_seed(T))
                if not all(torch.equal(b(x), n(x)) for b, n in zip(kernels["baseline"], kernels["new"])):
                    raise SystemExit(f"moe_decode_ab.py: error: outputs differ at {shape}, T={T}")
                times = {"baseline": [], "new": []}
                for r in range(args.rounds):
                    for name in ("baseline", "new") if r % 2 == 0 else ("new", "baseline"):
                        times[name].append(median_us(kernels[name], x, args.calls))
                ratios = [n / b for n, b in zip(times["new"], times["baseline"])]
                row = {
                    "shape": shape,
                    "layers": L,
                    "tokens": T,
                    "baseline_us": statistics.median(times["baseline"]),
                    "new_us": statistics.median(times["new"]),
                    "new_over_baseline": statistics.median(ratios),
                    "ratios": ratios,
                }
                rows.append(row)
                print(
                    f"{shape:17s} L={L} T={T:4d}  baseline {row['baseline_us']:9.1f} us  new {row['new_us']:9.1f} us  "
                    f"new/baseline {row['new_over_baseline']:.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f})"
                )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"baseline": str(args.baseline), "new": str(args.new), "threads": 1, "rounds": args.rounds}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
