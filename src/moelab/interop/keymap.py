"""Key maps between moelab and Hugging Face state dicts: one table per architecture, read both ways.

A key map is a list of (Hugging Face name, moelab name, part) templates, where {L} stands for a layer
and {E} for an expert. moelab stacks the experts of a layer into one tensor ([E, 2I, D] and [E, D, I])
and fuses each SwiGLU's gate and up projections into one [2H, D] weight (gate rows first); Hugging
Face checkpoints store one tensor per expert and per projection. So one Hugging Face tensor is one
*slice* of a moelab tensor: expert {E} (dim 0) when the template has {E}, and the "gate" or "up" half
(rows) of a fused projection, or "all" of it.

Export reads every slot from moelab to Hugging Face, import writes it back; the same table serves
both, so a key swapped or a half mislabelled breaks both directions (and the parity tests).
Which templates apply is decided by the moelab model itself: a slot exists when its moelab tensor
exists (dense or MoE layer, biases, q/k norms, shared experts, untied LM head).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

ALL, GATE, UP = "all", "gate", "up"

KeyMap = tuple[tuple[str, str, str], ...]


@dataclass(frozen=True)
class Slot:
    """One Hugging Face tensor and the piece of one moelab tensor it holds."""

    hf: str  # Hugging Face tensor name
    ours: str  # moelab state-dict name
    expert: int | None  # index into dim 0 of a stacked expert tensor; None: the whole tensor
    part: str  # ALL, or the GATE / UP half (rows) of a fused gate_up projection


def expand(keymap: KeyMap, ours: Iterable[str], n_layers: int, n_experts: int) -> list[Slot]:
    """Every slot of `keymap` whose moelab tensor is among `ours`, in table order."""
    names = set(ours)
    slots = []
    for hf_t, ours_t, part in keymap:
        layers = range(n_layers) if "{L}" in ours_t else [0]
        experts = range(n_experts) if "{E}" in hf_t else [None]
        for layer in layers:
            for expert in experts:
                name = ours_t.format(L=layer)
                if name in names:
                    slots.append(Slot(hf_t.format(L=layer, E=expert), name, expert, part))
    return slots


def uncovered(slots: Iterable[Slot], ours: Iterable[str]) -> list[str]:
    """moelab tensors that no slot holds (the architecture has no place for them)."""
    covered = {s.ours for s in slots}
    return [n for n in ours if n not in covered]


def take(tensor: torch.Tensor, slot: Slot) -> torch.Tensor:
    """The piece of a moelab tensor that `slot` names (export)."""
    if slot.expert is not None:
        tensor = tensor[slot.expert]
    if slot.part != ALL:
        half = tensor.shape[-2] // 2
        tensor = tensor[..., :half, :] if slot.part == GATE else tensor[..., half:, :]
    return tensor


def slot_shape(ours_shape: torch.Size | tuple[int, ...], slot: Slot) -> tuple[int, ...]:
    """The shape of the Hugging Face tensor `slot` holds, given its moelab tensor's shape."""
    shape = list(ours_shape)
    if slot.expert is not None:
        shape = shape[1:]
    if slot.part != ALL:
        shape[-2] //= 2
    return tuple(shape)


def to_hf(state: Mapping[str, torch.Tensor], slots: Iterable[Slot]) -> dict[str, torch.Tensor]:
    """Hugging Face tensors (contiguous copies) from a moelab state dict."""
    return {s.hf: take(state[s.ours], s).contiguous().clone() for s in slots}


def put(target: torch.Tensor, slot: Slot, value: torch.Tensor) -> None:
    """Write a Hugging Face tensor into its piece of a moelab tensor (import)."""
    with torch.no_grad():
        take(target, slot).copy_(value)
