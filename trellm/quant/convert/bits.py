"""Bit allocation for fractional targets (QUANTIZER.md, "Bit allocation").

Every linear gets an integer K. Start all at floor(B); spend the remaining budget one linear
at a time in order of expected benefit: attention before MLP, the first and last layers
before the middle, smaller matrices first within a tier (more layers upgraded per bit spent).
"""

from __future__ import annotations

import heapq
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


# Mean squared error per weight of the trellis on a unit Gaussian source, by K (mul1, tail-biting, best
# global scale; K = 1..4 as QUANTIZER.md's reference, 5 and 6 measured with trellm's Viterbi, 7 and 8
# extrapolated at the same ~3.9× per bit). Only the ratios between bit widths matter to the allocation.
TRELLIS_MSE = {1: 0.28, 2: 0.069, 3: 0.0195, 4: 0.0052, 5: 0.0012, 6: 0.00031, 7: 0.00008, 8: 0.00002}


def bit_range(bpw: float) -> tuple[int, int]:
    """The bit widths a measured allocation may give a linear for target `bpw`: one below floor(bpw) (never
    below 2 unless the target is, K = 1 being far from the quadratic regime the sensitivities assume) to
    two above ceil(bpw)."""
    lo = max(1 if bpw < 2 else 2, math.floor(bpw) - 1)
    return lo, min(8, math.ceil(bpw) + 2)


def allocate_measured(slots: list[LinearSlot], bpw: float, sensitivity: dict[str, float]) -> dict[str, int]:
    """Integer bits per linear minimising the predicted output damage Σ sensitivity · TRELLIS_MSE[K] with the
    weighted average bits at most `bpw` (sensitivity.linear_sensitivities measures the first factor).

    Every linear starts at the lowest width of bit_range; single-bit upgrades are then bought in order of
    damage removed per bit·weight while the budget lasts. TRELLIS_MSE falls by a smaller factor with
    every bit, so a linear's upgrades come in order and this greedy is the Lagrangian optimum up to the
    last, partly filled step (where it keeps buying the best upgrades that still fit)."""
    if not 1.0 <= bpw <= 8.0:
        raise ConfigError(f"bits per weight must be between 1 and 8, got {bpw}")
    missing = [s.name for s in slots if s.name not in sensitivity]
    if missing:
        raise ConfigError(f"no measured sensitivity for {missing[0]} (and {len(missing) - 1} more)")
    lo, hi = bit_range(bpw)
    bits = {s.name: lo for s in slots}
    left = (bpw - lo) * sum(s.weights for s in slots)  # bit·weights to spend above the lowest width
    floor_s = max([sensitivity[s.name] for s in slots] + [0.0]) * 1e-9  # zero or noise-level: still ordered
    sens = {s.name: max(sensitivity[s.name], floor_s) for s in slots}

    def gain(s: LinearSlot) -> float:
        k = bits[s.name]
        return sens[s.name] * (TRELLIS_MSE[k] - TRELLIS_MSE[k + 1]) / s.weights

    heap = [(-gain(s), i) for i, s in enumerate(slots)]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        s = slots[i]
        if s.weights > left + 1e-9:  # this linear's next bit no longer fits (smaller ones may still)
            continue
        bits[s.name] += 1
        left -= s.weights
        if bits[s.name] < hi:
            heapq.heappush(heap, (-gain(s), i))
    return bits
