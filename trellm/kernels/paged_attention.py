"""Paged attention over a flat varlen batch: decode tokens and prefill chunks of many sequences at once.

A forward pass of the generator is one flat batch of T query rows: sequence i owns rows
q_offsets[i] .. q_offsets[i+1]-1, at positions q_start[i], q_start[i]+1, ...; its keys and values
(positions 0 .. q_start[i] + q_len - 1, this pass's included) live in the pages listed in row i of
`block_table`, `page_size` tokens per page, in the cache tensors [num_pages, page_size, Hkv, D].
Query row at position p sees key j when j <= p and (with a sliding window W) j > p - W; scores are
scaled, optionally soft-capped (Gemma 2: c·tanh(s/c)), and soft-maxed in fp32.

The Triton kernel runs one program per (sequence, block of query tokens, KV head[, split]). The
query heads that share a KV head are stacked as rows of one tile (GQA: each key block is loaded once
for the whole group), so a decode token of an 8-KV-head model is 8 programs of G rows each. Long
contexts with few such programs split the key range (flash-decoding): each split writes an
unnormalised partial (sum, max, denominator) and a second small kernel combines them. The split
count is a launch constant while the range each split covers is computed from the lengths on the
device, so one captured CUDA graph serves every context length.

`paged_attention_ref` is the torch reference with identical semantics (any device).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from trellm.cache.paged import Segment, segment_attention
from trellm.kernels import grid_release, pdl_on, sm_count
from trellm.kernels.hadamard import rotate_store, rotation_outputs
from trellm.layers.attention import AttentionParams


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                        q_start: torch.Tensor, q_offsets: torch.Tensor, params: AttentionParams) -> torch.Tensor:
    """q [T, H, D], caches [P, page_size, Hkv, D], block_table [N, W] int, q_start [N], q_offsets [N+1]
    -> [T, H, D]: cache/paged.py's segment_attention on the same batch. Reads the index tensors on the
    host (one sync): a reference, not a fast path."""
    starts, offsets, table = q_start.tolist(), q_offsets.tolist(), block_table.tolist()
    segments = [Segment(offsets[i], start, offsets[i + 1] - offsets[i], table[i]) for i, start in enumerate(starts)
                if offsets[i + 1] > offsets[i]]
    return segment_attention(q[None], k_cache, v_cache, segments, params)[0]


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_ptr, stats_ptr, table_ptr, start_ptr, offsets_ptr,
    stride_qt, stride_qh, stride_kp, stride_ks, stride_kh, stride_ot, stride_oh, stride_bt,
    T, H, scale, softcap, window,
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr, PAGE: tl.constexpr, SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
):
    seq, tblock, combo = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kvh, split = combo // SPLITS, combo % SPLITS
    r0 = tl.load(offsets_ptr + seq)
    q_len = tl.load(offsets_ptr + seq + 1) - r0
    t0 = tblock * BLOCK_T
    if t0 >= q_len:
        return
    start = tl.load(start_ptr + seq)
    M: tl.constexpr = BLOCK_T * G_PAD
    rows = tl.arange(0, M)
    t = t0 + rows // G_PAD  # token of each tile row
    g = rows % G_PAD  # query head within the KV head's group
    row_ok = (t < q_len) & (g < G)
    pos = start + t  # query positions [M]
    head = kvh * G + g
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + (r0 + t)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [M, BLOCK_D]

    # Keys this block of queries can see: up to its last query; from its first query's window start.
    hi = start + tl.minimum(q_len, t0 + BLOCK_T)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(start + t0 - window + 1, 0) // BLOCK_N * BLOCK_N
    per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), SPLITS) * BLOCK_N
    k_lo = lo + split * per_split
    k_hi = tl.minimum(hi, k_lo + per_split)

    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, BLOCK_D], tl.float32)
    n_off = tl.arange(0, BLOCK_N)
    for n0 in range(k_lo, k_hi, BLOCK_N):
        kpos = n0 + n_off  # [BLOCK_N]
        k_ok = kpos < k_hi
        page = tl.load(table_ptr + seq * stride_bt + kpos // PAGE, mask=k_ok, other=0)
        slot = page.to(tl.int64) * stride_kp + (kpos % PAGE) * stride_ks + kvh * stride_kh
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + slot[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_ptr + slot[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale  # [M, BLOCK_N] fp32
        if HAS_SOFTCAP:
            # c·tanh(s/c) through exp (no tanh in every Triton backend); exact at both ends.
            e = tl.exp(-2.0 * tl.abs(s) / softcap)
            s = tl.where(s >= 0, 1.0, -1.0) * softcap * (1.0 - e) / (1.0 + e)
        seen = (kpos[None, :] <= pos[:, None]) & k_ok[None, :]
        if HAS_WINDOW:
            seen &= kpos[None, :] > pos[:, None] - window
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
        p = tl.exp(s - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    row = r0 + t
    if SPLITS == 1:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + row[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        # Partials [SPLITS, T, H, BLOCK_D] and (max, denominator) [SPLITS, T, H, 2], combined below.
        base = (split * T + row) * H + head  # [M]
        tl.store(part_ptr + base[:, None].to(tl.int64) * BLOCK_D + d[None, :], acc, mask=row_ok[:, None])
        tl.store(stats_ptr + base * 2, m_i, mask=row_ok)
        tl.store(stats_ptr + base * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _combine_kernel(part_ptr, stats_ptr, out_ptr, suh_ptr, xh_ptr, xs_ptr, T, H, stride_ot, stride_oh,
                    SPLITS: tl.constexpr, S_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                    ROTATE: tl.constexpr = 0, RELEASE: tl.constexpr = False):
    """One (row, head): the splits' partial outputs weighed by their softmax statistics. ROTATE (G > 0,
    D = 128): also the consuming linears' input transform of the head's 128 columns (rotate_store), so
    o_proj needs no had_in launch; RELEASE lets that dependent GEMV launch at once (kernels.PDL)."""
    if RELEASE:
        grid_release()
    row, head = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, S_PAD)
    s_ok = s < SPLITS
    base = (s * T + row) * H + head  # [S_PAD]
    m = tl.load(stats_ptr + base * 2, mask=s_ok, other=float("-inf"))
    den = tl.load(stats_ptr + base * 2 + 1, mask=s_ok, other=0.0)
    m_all = tl.max(m, axis=0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.where(s_ok & (m > float("-inf")), tl.exp(m - m_all), 0.0)  # splits that saw no key weigh 0
    d = tl.arange(0, BLOCK_D)
    part = tl.load(part_ptr + base[:, None].to(tl.int64) * BLOCK_D + d[None, :], mask=s_ok[:, None], other=0.0)
    total = tl.sum(w * den, axis=0)
    o = (tl.sum(part * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_ot + head * stride_oh + d, o, mask=d < D)
    if ROTATE > 0:
        rotate_store(o.to(tl.float32), head * D, row, suh_ptr, xh_ptr, xs_ptr, T, H * D, ROTATE, BLOCK_D)


def decode_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Key-range splits for a decode batch: enough programs for two per SM, at most 16."""
    return max(1, min(16, (2 * sm_count(device)) // max(1, num_seqs * num_kv_heads)))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    q_start: torch.Tensor, q_offsets: torch.Tensor, params: AttentionParams, *, max_q_len: int,
                    splits: int = 1, out: torch.Tensor | None = None, tile: tuple[int, int, int] | None = None,
                    rotate: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, tuple]:
    """The Triton kernel behind paged_attention_ref (same arguments; see the module docstring).
    max_q_len (host int) bounds the query rows of any sequence; splits > 1 splits each key range;
    tile = (query rows, keys, warps) per program overrides the default (benchmarks sweep it).
    rotate (the consuming linears' suh [G, H·D]; needs can_rotate): returns (out, had_in(out, rotate)'s
    (x', block sums)), the transform done by the kernel that combines the splits.
    No host sync: usable inside a CUDA graph."""
    T, H, D = q.shape
    _, page, hkv, dk = k_cache.shape
    if dk != D or H % hkv or k_cache.shape != v_cache.shape:
        raise ValueError(f"paged_attention: q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}")
    if k_cache.stride(3) != 1 or q.stride(2) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("paged_attention: q and the caches need a unit stride in the head dimension")
    if page % 16:
        raise ValueError(f"paged_attention: pages of {page} tokens; the kernel needs a multiple of 16")
    n = q_start.shape[0]
    G = H // hkv
    G_PAD = triton.next_power_of_2(G)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    rows = 16 if max_q_len == 1 else (64 if BLOCK_D <= 128 else 32)
    BLOCK_N = 64 if BLOCK_D <= 128 else 32
    warps = None
    if tile is not None:
        rows, BLOCK_N, warps = tile
    BLOCK_T = max(1, rows // G_PAD)
    if page % BLOCK_N:
        BLOCK_N = math.gcd(page, BLOCK_N)
    if out is None:
        out = torch.empty_like(q)
    part = stats = out  # unused when splits == 1
    if splits > 1:
        part = torch.empty(splits, T, H, BLOCK_D, device=q.device, dtype=torch.float32)
        stats = torch.empty(splits, T, H, 2, device=q.device, dtype=torch.float32)
    grid = (n, triton.cdiv(max_q_len, BLOCK_T), hkv * splits)
    window = params.window
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, part, stats, block_table, q_start, q_offsets,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), block_table.stride(0),
        T, H, params.scale, params.softcap or 1.0, window or 0,
        G=G, G_PAD=G_PAD, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, D=D, BLOCK_D=BLOCK_D, PAGE=page, SPLITS=splits,
        HAS_WINDOW=window is not None, HAS_SOFTCAP=params.softcap is not None, IEEE=q.dtype == torch.float32,
        num_warps=warps or (4 if BLOCK_T * G_PAD <= 64 else 8),
    )
    if rotate is None:
        suh, rotated, groups = out, (out, out), 0  # (unused pointers)
    elif can_rotate(H, D, splits, rotate):
        suh, rotated, groups = rotate, rotation_outputs(rotate, T), rotate.shape[0]
    else:
        raise ValueError(f"paged_attention: no input transform for {H} heads of {D} with {splits} splits and "
                         f"suh {tuple(rotate.shape)} (see can_rotate)")
    if splits > 1:
        _combine_kernel[(T, H)](part, stats, out, suh, *rotated, T, H, out.stride(0), out.stride(1), SPLITS=splits,
                                S_PAD=triton.next_power_of_2(splits), D=D, BLOCK_D=BLOCK_D, ROTATE=groups,
                                RELEASE=groups > 0 and pdl_on(q.device))
    return (out, rotated) if groups else out


def can_rotate(heads: int, head_dim: int, splits: int, rotate: torch.Tensor) -> bool:
    """Whether paged_attention can apply the consuming linears' input transform (suh `rotate` [G, k_pad]):
    in its combine kernel (splits > 1), one 128-column block per head (head_dim 128), no padding."""
    return splits > 1 and head_dim == 128 and rotate.dim() == 2 and rotate.shape[1] == heads * head_dim
