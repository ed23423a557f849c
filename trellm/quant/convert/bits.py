"""Bit allocation for fractional targets (QUANTIZER.md, "Bit allocation").

Every linear gets an integer K. Start all at floor(B); spend the remaining budget one linear
at a time in order of expected benefit: attention before MLP, the first and last layers
before the middle, smaller matrices first within a tier (more layers upgraded per bit spent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trellm.errors import ConfigError


@dataclass(frozen=True, slots=True)
class LinearSlot:
    name: str  # e.g. "model.layers.3.self_attn.q_proj"
    layer: int
    weights: int  # k_pad × n_pad: what the trellis stores


def _priority(slot: LinearSlot, num_layers: int) -> tuple:
    edge = min(slot.layer, num_layers - 1 - slot.layer)  # 0 for the first and last layers
    attention = 0 if ".self_attn." in slot.name else 1
    return (min(edge, 2), attention, slot.weights, slot.layer, slot.name)


def allocate_bits(slots: list[LinearSlot], bpw: float, num_layers: int) -> dict[str, int]:
    """Integer bits per linear whose weighted average is as close to `bpw` as possible without exceeding it."""
    if not 1.0 <= bpw <= 8.0:
        raise ConfigError(f"bits per weight must be between 1 and 8, got {bpw}")
    base = int(math.floor(bpw))
    bits = {s.name: base for s in slots}
    if base == 8 or not slots:
        return bits
    total = sum(s.weights for s in slots)
    budget = bpw * total - base * total  # extra bit·weights to spend
    for slot in sorted(slots, key=lambda s: _priority(s, num_layers)):
        if slot.weights <= budget + 1e-9:
            bits[slot.name] += 1
            budget -= slot.weights
    return bits


def average_bits(slots: list[LinearSlot], bits: dict[str, int]) -> float:
    total = sum(s.weights for s in slots)
    return sum(bits[s.name] * s.weights for s in slots) / total if total else 0.0
