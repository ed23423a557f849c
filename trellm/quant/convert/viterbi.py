"""Trellis quantization of 256-weight tiles by Viterbi search (QUANTIZER.md, "Quantizing one linear" §5).

States are 16-bit; state s' can follow s when s' = ((s << K) | new) & 0xFFFF, i.e. the top
16 - K bits of s' are the low 16 - K bits of s. Every state has 2^K predecessors, and all
states whose top bits agree share them, so one step is: for each of the 2^(16-K) groups take
the cheapest of its 2^K predecessors, then add each state's own error (target - value)^2.

Tail-biting (the stream is a ring, EXL3_FORMAT.md §3): pass 1 runs across the wrap point (the
end of the sequence followed by its start, as the ring rotated so the wrap sits mid-way) and
picks a good state there; pass 2 runs on the original order starting from that state and must
end in it, which closes the ring.

`viterbi_ref` is the torch reference, vectorised over tiles (CPU for tiny models); `trellis_search`
runs the Triton kernel of kernels/viterbi.py instead on CUDA tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trellm.quant import exl3_format as fmt

NUM_STATES = 1 << 16
WRAP_CONTEXT = 48  # steps of context on each side of the wrap point for pass 1


def _search(targets: torch.Tensor, values: torch.Tensor, bits: int, start: torch.Tensor | None) -> torch.Tensor:
    """Best state sequence [T, L] for targets [T, L]; `start` [T] forces the state before step 0
    (and the path must then end in it), None leaves both ends free."""
    t, length = targets.shape
    values = values.float()
    groups = NUM_STATES >> bits  # states sharing their predecessors: indexed by s' >> K
    dev = targets.device
    arange = torch.arange(NUM_STATES, device=dev)
    back = torch.empty(length, t, groups, dtype=torch.uint8, device=dev)  # chosen high bits of the predecessor
    if start is None:
        cost = torch.zeros(t, NUM_STATES, device=dev)
    else:
        cost = torch.full((t, NUM_STATES), float("inf"), device=dev)
        cost[torch.arange(t, device=dev), start] = 0.0
    for p in range(length):
        # Predecessor s of s' = (s << K | new): s = (hi << (16-K)) | (s' >> K), hi in [0, 2^K).
        best, hi = cost.view(t, 1 << bits, groups).min(dim=1)  # [T, groups]
        back[p] = hi.to(torch.uint8)
        cost = torch.sub(targets[:, p, None], values[None, :]).square_()  # [T, 65536] this step's errors
        cost.view(t, groups, 1 << bits).add_(best[:, :, None])  # state s' = group·2^K + new bits
    end = start if start is not None else cost.argmin(dim=1)  # [T]
    states = torch.empty(t, length, dtype=torch.int64, device=dev)
    s = end.clone()
    rows = torch.arange(t, device=dev)
    for p in range(length - 1, -1, -1):
        states[:, p] = s
        hi = back[p][rows, s >> bits].to(torch.int64)
        s = (hi << (16 - bits)) | (s >> bits)
    return states


Search = Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor | None], torch.Tensor]


def tail_biting_search(targets: torch.Tensor, bits: int, codebook: str, search: Search, *,
                       tail_biting: bool = True) -> torch.Tensor:
    """States [T, L] (int64) of the closest trellis path to each row of targets [T, L], found by `search`
    (targets fp32, the codebook's fp16 value table, K, forced start state or None -> states): the torch
    `_search` here or the Triton kernel's. With tail_biting the path is a ring (the last state precedes
    the first), as the format stores it."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    targets = targets.float().contiguous()
    values = fmt.codebook_lut(codebook, targets.device)  # fp16 [65536], exact in fp32
    if not tail_biting:
        return search(targets, values, bits, None).long()
    # Pass 1 only has to choose the state at the wrap point, and a state depends on little beyond
    # its 16/K predecessors: WRAP_CONTEXT steps on each side of the wrap suffice.
    length = targets.shape[1]
    ctx = min(WRAP_CONTEXT, length // 2)
    around = torch.cat([targets[:, length - ctx :], targets[:, :ctx]], dim=1)  # p = L-ctx .. L-1, 0 .. ctx-1
    wrap = search(around, values, bits, None)[:, ctx - 1]  # the state at original p = L - 1
    return search(targets, values, bits, wrap).long()


def viterbi_ref(targets: torch.Tensor, bits: int, codebook: str, *, tail_biting: bool = True) -> torch.Tensor:
    """The torch reference of tail_biting_search, vectorised over tiles."""
    return tail_biting_search(targets, bits, codebook, _search, tail_biting=tail_biting)


def trellis_search(targets: torch.Tensor, bits: int, codebook: str, *, tail_biting: bool = True) -> torch.Tensor:
    """viterbi_ref's result, from the Triton kernel (kernels/viterbi.py) on CUDA tensors."""
    if targets.is_cuda:
        from trellm.kernels.viterbi import viterbi

        return viterbi(targets, bits, codebook, tail_biting=tail_biting)
    return viterbi_ref(targets, bits, codebook, tail_biting=tail_biting)


def decode_states(states: torch.Tensor, codebook: str) -> torch.Tensor:
    return fmt.codebook_lut(codebook, states.device).float()[states]
