"""Dependencies run one way (docs/architecture.md): every import of a moelab module, at the top of a
file or inside a function, goes to a lower layer or stays inside its own subsystem.

Run `python tests/test_architecture.py` to print the import graph between subsystems.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "moelab"

# Lowest first. Subsystems in one layer may not import each other (train and infer side by side).
LAYERS: list[set[str]] = [
    {"moelab", "errors"},  # the package's version; user errors
    {"files", "device", "extras"},  # atomic files and JSON Lines; device choice and memory; optional packages
    {"config"},
    {"kernels"},
    {"model"},
    {"data"},
    {"checkpoint"},
    {"rundir"},
    {"distributed"},
    {"train", "infer"},
    {"analysis", "interop"},
    {"cli"},
    {"__main__"},
]
LAYER = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def unit_of(module: str) -> str:
    """moelab.train.trainer -> train; moelab.files -> files; moelab -> moelab."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "moelab"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports() -> list[tuple[str, str, str]]:
    """(importing module, imported module, file:line) for every moelab import in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = module_name(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module]
                if node.module == "moelab":  # `from moelab import files` names submodules
                    targets = [
                        f"moelab.{a.name}"
                        if (PACKAGE / a.name).exists() or (PACKAGE / f"{a.name}.py").exists()
                        else "moelab"
                        for a in node.names
                    ]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                if target == "moelab" or target.startswith("moelab."):
                    found.append((here, target, f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"))
    return found


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for src, dst, _ in imports():
        if unit_of(src) != unit_of(dst):
            edges[unit_of(src)].add(unit_of(dst))
    return edges


def test_every_subsystem_has_a_layer() -> None:
    units = {unit_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert units <= set(LAYER), f"add {sorted(units - set(LAYER))} to LAYERS"


def test_imports_only_go_down() -> None:
    wrong = [
        f"{where}: {src} imports {dst} ({unit_of(src)} is layer {LAYER[unit_of(src)]}, {unit_of(dst)} layer {LAYER[unit_of(dst)]})"
        for src, dst, where in imports()
        if unit_of(src) != unit_of(dst) and LAYER[unit_of(dst)] >= LAYER[unit_of(src)]
    ]
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_cycle_between_subsystems() -> None:
    """Implied by the layering; checked on its own so a change to LAYERS cannot hide a cycle."""
    edges = graph()
    state: dict[str, int] = {}

    def visit(unit: str, path: list[str]) -> None:
        state[unit] = 1
        for nxt in sorted(edges.get(unit, ())):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path + [unit, nxt])
            if nxt not in state:
                visit(nxt, path + [unit])
        state[unit] = 2

    for unit in sorted(edges):
        if unit not in state:
            visit(unit, [])


if __name__ == "__main__":
    for unit, deps in sorted(graph().items(), key=lambda kv: LAYER.get(kv[0], -1)):
        print(f"{unit:12s} (layer {LAYER.get(unit, '?')}) -> {', '.join(sorted(deps, key=lambda d: LAYER.get(d, -1)))}")
    sys.exit(0)
