"""Whether torch.compile can run on a device here, and where it breaks a module's graph.

`Transformer.compile_blocks` compiles; this module answers the two questions around it: before
training (train.compile), can the toolchain compile at all (on the CPU, Inductor builds C++ with
the system compiler; on CUDA it needs Triton), and, for the audit in benchmarks and tests, how
many graph breaks a forward has and why.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch


def compile_problem(device: torch.device) -> str | None:
    """Why torch.compile cannot run on `device` here, in one line; None when a trial compile of a
    small function works (a few seconds the first time, then cached)."""
    if device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as e:  # noqa: BLE001 - any failure to find one means the same to the user
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            return f"no C++ compiler for Inductor on the CPU ({reason}); install g++ or set CXX"
    try:
        probe = torch.compile(lambda x: torch.nn.functional.silu(x) * 2.0 + 1.0, dynamic=False)
        probe(torch.randn(8, device=device))
    except Exception as e:  # noqa: BLE001
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0] if text else ''}".strip()
    return None


@dataclass
class GraphBreaks:
    """torch._dynamo.explain of one call: graphs, breaks, and the reasons with their counts."""

    graphs: int
    breaks: int
    reasons: dict[str, int]  # "reason (file:line)" -> how many times

    def to_dict(self) -> dict[str, object]:
        return {"graphs": self.graphs, "breaks": self.breaks, "reasons": self.reasons}


def graph_breaks(fn, *args) -> GraphBreaks:
    """Trace `fn(*args)` with torch._dynamo.explain (it runs once, uncompiled numbers)."""
    explained = torch._dynamo.explain(fn)(*args)
    reasons: Counter[str] = Counter()
    for r in explained.break_reasons:
        where = ""
        if r.user_stack:
            frame = r.user_stack[-1]
            where = f" ({frame.filename.split('/moelab/')[-1]}:{frame.lineno} {(frame.line or '').strip()})"
        reasons[r.reason.strip().splitlines()[0] + where] += 1
    return GraphBreaks(explained.graph_count, explained.graph_break_count, dict(reasons))
