"""Viterbi trellis search on the GPU: many 256-weight tiles in parallel (issue 4).

Same search, same tie-breaking and same result as `viterbi_ref` (trellm/quant/convert/viterbi.py,
the torch reference, which explains the trellis). What makes it fit a GPU: between two steps only
the 2^(16-K) group minima have to be kept, not the 2^16 state costs. At step p the cost of state
s' = (hi << (16-K)) | g is best_p[s' >> K] + (x_p - value(s'))^2, and the next step needs only
best_{p+1}[g] = min over hi of that (and which hi won, the backpointer). So one program per tile
holds a minima vector of 2^(16-K) floats (16 KB at K = 4) in a double buffer, evaluates the 2^16
candidates of each step in chunks of GC groups (each thread looping over its groups' 2^K
predecessors), and writes K-bit backpointers
(one byte each) per group and step. A second kernel walks the backpointers back, vectorised
over tiles.

Layout of the scratch buffers (per tile): best [2, G] fp32, back [L + 1, G] uint8 where back[p][g]
is the hi bits of the state at step p - 1 on the best path into group g at step p (back[L] serves
the free end). Floats add in the reference's order (err + best), so interpreted runs match it
exactly; a GPU build may contract (x - v)^2 + best into an FMA, so near-ties can pick another
path of (almost) the same cost.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


NUM_STATES = 1 << 16
# Backpointer memory per launch (larger batches of tiles run in several launches): a quarter of the free
# device memory within these bounds. A fixed 1 GiB held K = 2 launches to 256 tiles (4 MB each), a
# quarter of the programs an H200 runs at once.
BACK_BYTES_MIN, BACK_BYTES_MAX = 1 << 28, 1 << 34


@triton.jit
def _relax(x, lut_ptr, src, g, h, m, arg, K: tl.constexpr):
    """Offer the predecessor with high bits h to groups g: state s = h·2^(16-K) + g, cost = error + best."""
    # Sums, not ORs, of the disjoint bit fields, and g >> K rather than s >> K: Triton's address
    # analysis then sees runs of contiguous (code table) and equal (minima) addresses and vectorises
    # the loads (with ORs every candidate had its own 64-bit address and load: ~2x the instructions).
    d = x - tl.load(lut_ptr + ((h << (16 - K)) + g)).to(tl.float32)
    c = d * d + tl.load(src + ((h << (16 - 2 * K)) + (g >> K)))
    better = c < m
    return tl.where(better, c, m), tl.where(better, h, arg)


@triton.jit
def _viterbi_forward_kernel(x_ptr, lut_ptr, start_ptr, best_ptr, back_ptr, end_ptr, L,
                            K: tl.constexpr, GC: tl.constexpr, FORCED: tl.constexpr):
    """Group minima through all L steps of one tile; stores backpointers and the path's last state."""
    G: tl.constexpr = 1 << (16 - K)
    HI: tl.constexpr = 1 << K
    tile = tl.program_id(0).to(tl.int64)
    best = best_ptr + tile * 2 * G
    back = back_ptr + tile * (L + 1) * G
    # Before step 0: every state free (all minima 0, hi 0 like argmin of a zero vector), or only the
    # forced start state (its group's minimum 0 with the start's hi bits, every other group +inf).
    start = tl.load(start_ptr + tile)  # (unused unless FORCED)
    for g0 in range(0, G, GC):
        g = g0 + tl.arange(0, GC)
        if FORCED:
            tl.store(best + g, tl.where(g == (start & (G - 1)), 0.0, float("inf")))
            tl.store(back + g, tl.where(g == (start & (G - 1)), start >> (16 - K), 0).to(tl.uint8))
        else:
            tl.store(best + g, tl.zeros([GC], tl.float32))
            tl.store(back + g, tl.zeros([GC], tl.uint8))
    tl.debug_barrier()
    for p in range(L):
        x = tl.load(x_ptr + tile * L + p)
        src = best + (p % 2) * G
        dst = best + ((p + 1) % 2) * G
        for g0 in range(0, G, GC):
            # One candidate per group and thread at a time, the 2^K predecessors in a loop: the minimum
            # stays in the thread's registers (no reduction across threads: 3-20x faster than reducing a
            # [2^K, GC] block, H200), and ascending hi with a strict < keeps the first minimum like the
            # reference's argmin.
            g = g0 + tl.arange(0, GC)
            m = tl.full([GC], float("inf"), tl.float32)
            arg = tl.zeros([GC], tl.int32)
            if HI <= 16:
                for h in tl.static_range(HI):
                    m, arg = _relax(x, lut_ptr, src, g, h, m, arg, K)
            else:
                for h in range(HI):
                    m, arg = _relax(x, lut_ptr, src, g, h, m, arg, K)
            tl.store(dst + g0 + tl.arange(0, GC), m)
            tl.store(back + (p + 1) * G + g0 + tl.arange(0, GC), arg.to(tl.uint8))
        tl.debug_barrier()
    # The last state: the start again for a ring, else the cheapest (first on ties).
    if FORCED:
        tl.store(end_ptr + tile, start)
    else:
        fin = best + (L % 2) * G
        best_v = tl.full([], float("inf"), tl.float32)
        best_g = tl.zeros([], tl.int32)
        for g0 in range(0, G, GC):
            v = tl.load(fin + g0 + tl.arange(0, GC))
            m, arg = tl.min(v, axis=0, return_indices=True, return_indices_tie_break_left=True)
            better = m < best_v
            best_g = tl.where(better, g0 + arg, best_g)
            best_v = tl.where(better, m, best_v)
        h = tl.load(back + L * G + best_g).to(tl.int32)
        tl.store(end_ptr + tile, (h << (16 - K)) | best_g)


@triton.jit
def _viterbi_traceback_kernel(back_ptr, end_ptr, states_ptr, T, L, K: tl.constexpr, BT: tl.constexpr):
    """States of BT tiles, from the last step back to the first."""
    G: tl.constexpr = 1 << (16 - K)
    tiles = tl.program_id(0) * BT + tl.arange(0, BT)
    ok = tiles < T
    s = tl.load(end_ptr + tiles, mask=ok, other=0)
    base = tiles.to(tl.int64) * (L + 1) * G
    for i in range(L):
        p = L - 1 - i
        tl.store(states_ptr + tiles.to(tl.int64) * L + p, s, mask=ok)
        h = tl.load(back_ptr + base + p * G + (s >> K), mask=ok, other=0).to(tl.int32)
        s = (h << (16 - K)) | (s >> K)


# (groups per chunk, warps) by K: the fastest of benchmarks/bench_viterbi.py --variants on an H200 with
# 2688-tile launches (an 8B layer's LDLQ step) and, for K = 4 and 6, 256-tile launches (down_proj's
# strips alone); K = 1 and 7 take their neighbours' settings (unmeasured).
CONFIGS = {1: (2048, 16), 2: (2048, 16), 3: (2048, 8), 4: (1024, 8), 5: (1024, 8), 6: (1024, 8), 7: (1024, 8),
           8: (1024, 4)}


def _search(targets: torch.Tensor, lut: torch.Tensor, bits: int, start: torch.Tensor | None) -> torch.Tensor:
    t, length = targets.shape
    groups = NUM_STATES >> bits
    out = torch.empty(t, length, dtype=torch.int32, device=targets.device)
    budget = BACK_BYTES_MIN
    if targets.is_cuda:
        budget = min(BACK_BYTES_MAX, max(BACK_BYTES_MIN, torch.cuda.mem_get_info(targets.device)[0] // 4))
    batch = max(1, budget // ((length + 1) * groups))
    gc, warps = CONFIGS[bits]
    gc = min(groups, gc)
    for t0 in range(0, t, batch):
        t1 = min(t, t0 + batch)
        n = t1 - t0
        best = torch.empty(n, 2, groups, device=targets.device, dtype=torch.float32)
        back = torch.empty(n, length + 1, groups, device=targets.device, dtype=torch.uint8)
        end = torch.empty(n, device=targets.device, dtype=torch.int32)
        st = start[t0:t1].to(torch.int32).contiguous() if start is not None else torch.zeros_like(end)
        _viterbi_forward_kernel[(n,)](targets[t0:t1].contiguous(), lut, st, best, back, end, length,
                                      K=bits, GC=gc, FORCED=start is not None, num_warps=warps)
        bt = 128
        _viterbi_traceback_kernel[(triton.cdiv(n, bt),)](back, end, out[t0:t1], n, length, K=bits, BT=bt)
    return out


def viterbi(targets: torch.Tensor, bits: int, codebook: str, *, tail_biting: bool = True) -> torch.Tensor:
    """The Triton counterpart of viterbi_ref: states [T, 256] (int64) of targets [T, 256]."""
    from trellm.quant.convert.viterbi import tail_biting_search

    return tail_biting_search(targets, bits, codebook, _search, tail_biting=tail_biting)
