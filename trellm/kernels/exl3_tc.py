"""Tensor-core EXL3 matmul for small batches (m = 1..64), written in Gluon (Triton's explicit-layout dialect).

    y = had128( had128(x ⊙ suh) · Q ) ⊙ svh + bias          (x' = had128(x ⊙ suh) comes from had_in)

Why a second small-m kernel: the trellis' tile order (EXL3_FORMAT.md §3: weight p = 8t + j of a 16×16
tile sits at row 2(t mod 4) + j0 + 8·j1, column t div 4 + 8·j2) is exactly the register layout of
one operand of the mma.sync m16n8k16 instruction, lane t holding weights 8t .. 8t + 7. So if a warp
decodes a tile with lane t taking its own eight weights, the decoded halves are already the
instruction's A operand (the tile transposed: output columns are A's rows, input rows its k): no
shared memory, no shuffles, no layout conversion, and one HMMA multiplies all 256 weights of the tile
by up to 8 batch rows. Plain Triton cannot promise that register placement; Gluon states it
(`convert_layout(..., assert_trivial=True)` fails the compile if it is not a pure renaming).

Compared with exl3_gemv's FMA body (m = 1: decode, 2^23 subtraction and FFMA per weight) this drops
the FADD and FFMA per weight for half a PRMT (packing two halves) and an eighth of an HMMA; compared
with its m = 2..16 tensor-core body it drops the shared-memory round trip of every decoded weight.
Counted in Triton 3.6's sm_90 code (benchmarks/sass_report.py --kind tc): K = 4 → 4.83 instructions
per weight in the K-loop at m = 1 against 5.79 (5.30 with the default register prefetch, whose
loop-carried copies cost moves). Timed on an H100 (4096→14336, K = 4; benchmarks/RESULTS.md): m = 4
23.7 µs (exl3_gemv 61.1), m = 16 27.7-29.3 µs (61.5); at m = 1 within ±5 % of exl3_gemv, which the
dispatch keeps there. Nsight Compute finds both kernels latency-bound (4 warps per scheduler waiting
on their loads; no pipe above 55 %), hence the load variants below.

Work is scheduled stream-K exactly as in exl3_gemv (same units, owners, workspace and deterministic
slot-order reduction); the epilogue (mul1 affine, output Hadamard as butterflies in registers, svh,
bias) runs once per 128-column block. Gluon kernels do not run in the Triton interpreter: the CPU
tests compile this kernel for sm_90 for every K and codebook (which also checks the trivial layout
conversion), and the GPU tests compare it with exl3_gemv_ref.
"""

from __future__ import annotations

import os

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from trellm.kernels import PDL_EARLY, PDL_PREFETCH, grid_wait, pdl_on, prefetch_tiles_l2
from trellm.kernels.exl3_decode import CODEBOOK_IDS, MUL1_C1, MUL1_C2, _codebook, _window
from trellm.kernels.exl3_gemv import _workspace, stream_k_plan

NUM_WARPS = 4  # the lane layout below gives each of 4 warps one pair of tile columns
# From this many batch rows on, x is loaded by 16-byte loads once per program and moved into the mma operand
# through shared memory (_tc_span's XCOAL) instead of by every warp in the operand layout. H100, K = 4, the two
# 4096x14336 shapes (RESULTS.md, 2026-12-07 sixth session): 16 rows 27.3 -> 24.3 and 31.9 -> 27.4 us, 32 rows
# 53.9 -> 35.5 and 60.3 -> 43.6, 64 rows 95.0 -> 51.2 and 100.2 -> 53.5; 8 rows 23.8 -> 21.8 and 25.8 -> 23.6;
# 4 rows 22.6 / 26.0 -> 22.7 / 24.7; 1 row the same within 0.5 %. TRELLM_TC_XCOAL_M is for A/B timing (65: never).
XCOAL_M = int(os.environ.get("TRELLM_TC_XCOAL_M", "2"))
# The decoded values' dimensions (a, r, w, t1, t0, j0, j1, j2) -> (A's rows: r, w, j2, t1 | its k: a, j1, t0, j0).
A_PERM = gl.constexpr((1, 2, 7, 3, 0, 6, 4, 5))


@gluon.jit
def _state(s0, s1, s2, O: gl.constexpr):
    """The 16-bit window starting O bits into the lane's stream s0 s1 s2 (O + 16 <= 96): word O // 32
    and the one after it (a window within one word ignores the second)."""
    s = (s0, s1, s2, s2)
    return _window(s[O // 32], s[O // 32 + 1], O % 32, True)


@gluon.jit
def _tc_span(x_ptr, tr_ptr, stride_xm, M, row0, n_iter, col_tile, NT: gl.constexpr, K: gl.constexpr,
             TA: gl.constexpr, BN: gl.constexpr, CODEBOOK: gl.constexpr, PREFETCH: gl.constexpr,
             PINGPONG: gl.constexpr, XCOAL: gl.constexpr, EARLY: gl.constexpr):
    """Σ x'·q over tile rows [row0, row0 + n_iter·TA) of the 8 tile columns from col_tile: [128 output
    columns, BN batch rows] fp32 in the mma layout (mul1: Σ x'·(1024 + b)).

    Words reach the lanes one of two ways: loaded at the top of their iteration, or (PREFETCH) loaded one
    iteration ahead into registers (PINGPONG: in two alternating register sets). (Staging them 1-3 iterations
    ahead through shared memory by cp.async, which freed registers for more programs per SM, timed 13-29 %
    slower at m = 1 on an H100: RESULTS.md, 2026-12-07 sixth session.)

    x rows reach the mma either loaded straight in its B-operand layout (every warp loads the whole
    [16·TA, BN] tile, 32 bits per load) or, XCOAL, loaded once per program with 16-byte loads along k and
    moved into the operand layout through shared memory (the default from XCOAL_M rows).

    EARLY (a dependent launch): the wait for the kernel that wrote x' (grid_wait) sits between
    the first iteration's word loads and its x loads, so the words are in flight while that kernel ends."""
    W: gl.constexpr = 8 * K  # 32-bit words per tile
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[4, 1], instr_shape=[16, 8])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    # One value per (tile row a, column pair r, warp w, lane t): tile column w + 4r, all in registers but w, t.
    lanes: gl.constexpr = gl.BlockedLayout([TA, 2, 1, 1], [1, 1, 1, 32], [1, 1, 4, 1], [3, 2, 1, 0])
    a_i = gl.arange(0, TA, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, lanes))))
    r_i = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, lanes))))
    w_i = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, lanes))))
    t_i = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, lanes))))
    t4 = t_i[None, None, None, :]
    # Lane t decodes weights 8t .. 8t+7, whose windows cover stream bits [8tK + K - 16, 8tK + 8K): it
    # reads the (up to) three words from d0 on, wrapping around the tile (tail-biting).
    first = 8 * K * t4 + K - 16
    d0 = (first + 32 * W) // 32 - W
    off = (first - 32 * d0).to(gl.uint32)
    tile = (a_i[:, None, None, None] * NT + w_i[None, None, :, None] + 4 * r_i[None, :, None, None]) * W
    p0 = tr_ptr + (row0 * NT + col_tile) * W + tile + (d0 + W) % W
    p1 = tr_ptr + (row0 * NT + col_tile) * W + tile + (d0 + 1 + W) % W
    p2 = tr_ptr + (row0 * NT + col_tile) * W + tile + (d0 + 2 + W) % W
    if XCOAL:  # 8 consecutive k of one batch row per thread: one 16-byte load
        x_layout: gl.constexpr = gl.BlockedLayout([8, 1], [2 * TA, 32 // (2 * TA)], [1, 4], [0, 1])
    else:
        x_layout: gl.constexpr = b_layout
    bk = gl.arange(0, 16 * TA, layout=gl.SliceLayout(1, x_layout))
    bm = gl.arange(0, BN, layout=gl.SliceLayout(0, x_layout))
    # Batch rows past M load as zeros. (Loading the one row into every column for m = 1 instead, without
    # the mask, ran 1.7× slower on an H100: 37.9 against 22.6 µs at K = 4 on 4096→14336.)
    xp = x_ptr + row0 * 16 + bk[:, None] + bm[None, :] * stride_xm
    acc = gl.zeros([128, BN], gl.float32, layout=mma)
    src = (p0, p1, p2, xp, bm, M, TA * NT * W, 16 * TA)  # what _tc_loads reads iteration i from
    # Loads past the span would leave the trellis: the prefetching forms' last loads repeat the final rows.
    if PREFETCH and PINGPONG:
        # Iteration i decodes words loaded during iteration i - 1, two iterations per trip alternating
        # two register sets, so that no loaded word is copied (a single set carried across trips costs
        # ~60 moves per iteration at K = 4: 5.30 against 4.93 instructions per weight; 166 against 159
        # registers, 180 at K = 8).
        wa0, wa1, wa2, xba = _tc_loads(src, 0, K, EARLY)
        for i in range(0, n_iter - 1, 2):
            wb0, wb1, wb2, xbb = _tc_loads(src, i + 1, K)
            acc = _tc_mma(wa0, wa1, wa2, xba, acc, off, K, TA, CODEBOOK, a_layout, b_layout)
            wa0, wa1, wa2, xba = _tc_loads(src, gl.minimum(i + 2, n_iter - 1), K)
            acc = _tc_mma(wb0, wb1, wb2, xbb, acc, off, K, TA, CODEBOOK, a_layout, b_layout)
        if n_iter % 2 == 1:
            acc = _tc_mma(wa0, wa1, wa2, xba, acc, off, K, TA, CODEBOOK, a_layout, b_layout)
    elif PREFETCH:  # iteration i decodes words loaded during iteration i - 1 (twice the word registers)
        w0n, w1n, w2n, xbn = _tc_loads(src, 0, K, EARLY)
        for i in range(n_iter):
            w0, w1, w2, xb = w0n, w1n, w2n, xbn
            w0n, w1n, w2n, xbn = _tc_loads(src, gl.minimum(i + 1, n_iter - 1), K)
            acc = _tc_mma(w0, w1, w2, xb, acc, off, K, TA, CODEBOOK, a_layout, b_layout)
    else:
        for i in range(n_iter):
            w0, w1, w2, xb = _tc_loads(src, i, K, EARLY, i == 0)
            acc = _tc_mma(w0, w1, w2, xb, acc, off, K, TA, CODEBOOK, a_layout, b_layout)
    return acc


@gluon.jit
def _tc_mma(w0, w1, w2, xb, acc, off, K: gl.constexpr, TA: gl.constexpr, CODEBOOK: gl.constexpr,
            a_layout: gl.constexpr, b_layout: gl.constexpr):
    """One iteration: decode the lane's words w0 w1 w2 (its stream from bit `off` of w0) into the A
    operand and multiply by the x rows xb (in b_layout, or moved there: XCOAL) into acc."""
    if K % 4 == 0:  # every lane's stream starts at the same bit of its first word
        OFF0: gl.constexpr = (K + 16) % 32
        s0 = w0
        s1 = w1
        s2 = w2
    else:  # shift the lane's stream to bit 0 so that every window's offset is a constant
        OFF0: gl.constexpr = 0
        s0 = gl.inline_asm_elementwise("shf.l.wrap.b32 $0, $2, $1, $3;", "=r,r,r,r", [w0, w1, off],
                                       dtype=gl.uint32, is_pure=True, pack=1)
        s1 = gl.inline_asm_elementwise("shf.l.wrap.b32 $0, $2, $1, $3;", "=r,r,r,r", [w1, w2, off],
                                       dtype=gl.uint32, is_pure=True, pack=1)
        s2 = w2 << off
    vals = ()
    for j in gl.static_range(8):
        vals = vals + (_codebook(_state(s0, s1, s2, OFF0 + j * K), CODEBOOK, True, True),)
    # Registers j = j0 + 2·j1 + 4·j2 become new minor dimensions; join appends its new dimension
    # last, so they come out as (j0, j1, j2).
    q = (gl.join(vals[0], vals[1]), gl.join(vals[2], vals[3]), gl.join(vals[4], vals[5]),
         gl.join(vals[6], vals[7]))
    v = gl.join(gl.join(q[0], q[1]), gl.join(q[2], q[3]))  # [TA, 2 r, 4 w, 32 t, 2 j0, 2 j1, 2 j2]
    v = gl.reshape(v, [TA, 2, 4, 8, 4, 2, 2, 2])  # t = t0 + 4·t1 -> (t1, t0)
    # A's rows (output columns) 16(w + 4r) + 8·j2 + t1; its k (input rows) 16a + 8·j1 + 2·t0 + j0
    # (tests/kernels/test_exl3_kernels.py replays these steps in torch).
    v = gl.permute(v, A_PERM.value)
    wa = gl.convert_layout(gl.reshape(v, [128, 16 * TA]), a_layout, assert_trivial=True)
    return mma_v2(wa, gl.convert_layout(xb, b_layout), acc)


@gluon.jit
def _prefetch_rows(tr_ptr, row0, n_rows, col_tile, NT: gl.constexpr, K: gl.constexpr, ROWS: gl.constexpr):
    """L2 prefetch of tile rows [row0, row0 + min(ROWS, n_rows)) of the 8 tile columns from col_tile."""
    lay: gl.constexpr = gl.BlockedLayout([1, 1], [4, 8], [4, 1], [1, 0])  # NUM_WARPS warps
    a = gl.arange(0, ROWS, layout=gl.SliceLayout(1, lay))[:, None]
    c = gl.arange(0, 8, layout=gl.SliceLayout(0, lay))[None, :]
    prefetch_tiles_l2(tr_ptr + ((row0 + a) * NT + col_tile + c) * (8 * K), (a < n_rows) & (c >= 0), K)


@gluon.jit
def _tc_loads(src, i, K: gl.constexpr, EARLY: gl.constexpr = False, first=True):
    """Iteration i's trellis words (the third only for K > 4, whose lane streams span three words) and
    its x rows (batch rows past M as zeros). src = (word pointers p0 p1 p2, x pointers, batch-row
    indices, M, words' and x's step per iteration). EARLY and first: wait for the kernel that wrote x'
    between the two (grid_wait returns at once after its first time)."""
    p0, p1, p2, xp, bm, M, step_w, step_x = src
    w0 = gl.load(p0 + i * step_w).to(gl.uint32, bitcast=True)
    w1 = gl.load(p1 + i * step_w).to(gl.uint32, bitcast=True)
    w2 = w1
    if K > 4:
        w2 = gl.load(p2 + i * step_w).to(gl.uint32, bitcast=True)
    if EARLY:
        if first:
            grid_wait()
    xb = gl.load(xp + i * step_x, mask=bm[None, :] < M, other=0.0)
    return w0, w1, w2, xb


@gluon.jit
def _tc_epilogue(acc, xsum_ptr, svh_ptr, bias_ptr, y_ptr, M, N, k_blocks, stride_ym, blk,
                 BN: gl.constexpr, CODEBOOK: gl.constexpr, HAS_BIAS: gl.constexpr, C1: gl.constexpr,
                 C2: gl.constexpr):
    """acc [128 columns, BN rows] (mma layout) -> y[:, the block] = had128(y') ⊙ svh (+ bias).

    The 128-point transform runs as butterflies in registers in two phases, column bits 0-3 with 16
    columns per thread and then bits 4-6 with 8 per thread (one exchange through shared memory in
    between): whole rows per thread would need ~180 registers and cap the K-loop's occupancy."""
    # Phase 1: [rows, column bits 4-6, bits 0-3]; phase 2: [rows, bits 0-3, bits 4-6]. Sylvester order
    # pairs columns c and c ^ 2^b at every bit b.
    l1: gl.constexpr = gl.BlockedLayout([1, 1, 16], [4, 8, 1], [4, 1, 1], [2, 1, 0])
    l2: gl.constexpr = gl.BlockedLayout([1, 1, 8], [4, 8, 1], [4, 1, 1], [2, 1, 0])
    z = gl.convert_layout(gl.reshape(gl.permute(acc, [1, 0]), [BN, 8, 16]), l1)
    if CODEBOOK == 0:  # weights are C1·h + C2 with h = 1024 + b, so Σ x'·w = C1·Σ x'·h + C2·Σ x'
        sums: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [4, 1], [1, 0])
        r = gl.arange(0, BN, layout=gl.SliceLayout(1, sums))
        xs = gl.zeros([BN], gl.float32, layout=gl.SliceLayout(1, sums))
        for b0 in range(0, k_blocks, 32):
            b = b0 + gl.arange(0, 32, layout=gl.SliceLayout(0, sums))
            xs += gl.sum(gl.load(xsum_ptr + r[:, None] * k_blocks + b[None, :],
                                 mask=(r[:, None] < M) & (b[None, :] < k_blocks), other=0.0), axis=1)
        xs = gl.convert_layout(xs, gl.SliceLayout(1, gl.SliceLayout(2, l1)))
        z = z * C1 + xs[:, None, None] * C2
    v = gl.reshape(z, [BN, 8, 2, 2, 2, 2])
    for _ in gl.static_range(4):
        lo, hi = gl.split(v)  # the last dimension: the current bit
        v = gl.permute(gl.join(lo + hi, lo - hi), [0, 1, 5, 2, 3, 4])  # next bit last
    z = gl.convert_layout(gl.permute(gl.reshape(v, [BN, 8, 16]), [0, 2, 1]), l2)  # [BN, 16 (bits 0-3), 8]
    v = gl.reshape(z, [BN, 16, 2, 2, 2])
    for _ in gl.static_range(3):
        lo, hi = gl.split(v)
        v = gl.permute(gl.join(lo + hi, lo - hi), [0, 1, 4, 2, 3])
    z = gl.convert_layout(gl.reshape(v, [BN, 16, 8]), l2)
    rows = gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, l2)))[:, None, None]
    lo_i = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, l2)))[None, :, None]
    hi_i = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, l2)))[None, None, :]
    cols = blk * 128 + 16 * hi_i + lo_i  # [1, 16, 8]
    z = z * (gl.load(svh_ptr + cols).to(gl.float32) * 0.08838834764831845)  # 128^-1/2
    if HAS_BIAS:
        z += gl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(gl.float32)
    gl.store(y_ptr + rows * stride_ym + cols, z.to(y_ptr.dtype.element_ty), mask=(rows < M) & (cols < N))


# CH is never specialised on the value 1 (k = 128 with TA = 8): Triton 3.6 then fails to lower the
# kernel (an assertion in ConvertTritonGPUToLLVM, seen on an H100 and in an ahead-of-time compile).
@gluon.jit(do_not_specialize=["CH"])
def _exl3_tc_kernel(
    x_ptr, xsum_ptr, tr_ptr, svh_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr, clk_ptr,
    M, N, stride_xm, stride_ym, k_blocks, CH, U, P, MAXSEG, GB1, GB2, stride_xg, stride_sg,
    NT: gl.constexpr, K: gl.constexpr, CODEBOOK: gl.constexpr, TA: gl.constexpr, BN: gl.constexpr,
    HAS_BIAS: gl.constexpr, C1: gl.constexpr, C2: gl.constexpr, GROUPED: gl.constexpr, PREFETCH: gl.constexpr,
    PINGPONG: gl.constexpr, TIMELINE: gl.constexpr, PDL: gl.constexpr = False,
    PDL_PF: gl.constexpr = 0, XCOAL: gl.constexpr = False, PDL_EARLY: gl.constexpr = False,
):
    """Stream-K as exl3_gemv's kernel: the U = (column blocks) × CH (chunks of TA tile rows) units are
    cut into P equal runs; a block's segments publish partial sums in fixed slots and the last to
    finish adds them in slot order and runs the epilogue. NT (the trellis row stride in tiles) is a
    constant so that every word load is an immediate offset from one per-lane pointer. TIMELINE (a
    diagnostic, benchmarks/timeline_tc.py) records per program: the SM, global-timer ns at start and
    end, and SM cycles at start, after its K-loops and at end, in clk_ptr[pid, 0:6]. PDL: a dependent launch
    (see trellm.kernels.PDL) that waits for the kernel before it first, after asking L2 for the words of its
    first PDL_PF iterations; PDL_EARLY: the wait moves into the span (_tc_span's EARLY)."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[4, 1], instr_shape=[16, 8])
    pid = gl.program_id(0)
    if TIMELINE:
        t_start = _timer(pid, GLOBALTIMER)
        c_start = _timer(pid, CLOCK)
        c_loops = c_start - c_start
    cr = gl.arange(0, 128, layout=gl.SliceLayout(1, mma))
    cm = gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
    keep = (cm[None, :] < M) & (cr[:, None] >= 0)
    part = cr[:, None] * BN + cm[None, :]  # a slot holds [128, BN] fp32
    u = pid * U // P
    u_end = (pid + 1) * U // P
    if PDL:
        if PDL_PF > 0:
            blk = u // CH
            c0 = u - blk * CH
            _prefetch_rows(tr_ptr, c0 * TA, gl.minimum(u_end - u, CH - c0) * TA, blk * 8, NT, K, PDL_PF * TA)
        if not PDL_EARLY:
            grid_wait()
    while u < u_end:
        blk = u // CH
        c0 = u - blk * CH
        c1 = gl.minimum(CH, c0 + (u_end - u))
        xg_ptr = x_ptr
        xsg_ptr = xsum_ptr
        if GROUPED:
            grp = (blk >= GB1).to(gl.int32) + (blk >= GB2).to(gl.int32)
            xg_ptr = x_ptr + gl.multiple_of(grp * stride_xg, 16)
            xsg_ptr = xsum_ptr + grp * stride_sg
        if TIMELINE:
            c_span = _timer(pid, CLOCK)
        acc = _tc_span(xg_ptr, tr_ptr, stride_xm, M, c0 * TA, c1 - c0, blk * 8, NT, K, TA, BN, CODEBOOK,
                       PREFETCH, PINGPONG, XCOAL, PDL_EARLY)
        if TIMELINE:  # read the clock once the span's products exist
            c_loops += _timer(gl.sum(gl.sum(acc, axis=1), axis=0).to(gl.int32), CLOCK) - c_span
        first = ((blk * CH + 1) * P - 1) // U
        nseg = ((blk * CH + CH) * P - 1) // U - first + 1
        if nseg == 1:
            _tc_epilogue(acc, xsg_ptr, svh_ptr, bias_ptr, y_ptr, M, N, k_blocks, stride_ym, blk, BN, CODEBOOK,
                         HAS_BIAS, C1, C2)
        else:
            gl.store(ws_ptr + (blk * MAXSEG + pid - first) * (128 * BN) + part, acc, mask=keep)
            done = gl.atomic_add(cnt_ptr + blk, 1, sem="acq_rel")
            if done == nseg - 1:
                acc = gl.zeros([128, BN], gl.float32, layout=mma)
                for s in range(nseg):
                    acc += gl.load(ws_ptr + (blk * MAXSEG + s) * (128 * BN) + part, mask=keep, other=0.0,
                                   cache_modifier=".cg")
                gl.store(cnt_ptr + blk, 0)  # ready for the next call
                _tc_epilogue(acc, xsg_ptr, svh_ptr, bias_ptr, y_ptr, M, N, k_blocks, stride_ym, blk, BN,
                             CODEBOOK, HAS_BIAS, C1, C2)
        u += c1 - c0
    if TIMELINE:
        c_end = _timer(pid, CLOCK)
        t_end = _timer(pid, GLOBALTIMER)
        row = clk_ptr + pid * 6
        gl.store(row, _timer(pid, SMID))
        gl.store(row + 1, t_start)
        gl.store(row + 2, t_end)
        gl.store(row + 3, c_start)
        gl.store(row + 4, c_loops)
        gl.store(row + 5, c_end - c_start)


# Special registers read by the TIMELINE diagnostic.
GLOBALTIMER = gl.constexpr("mov.u64 $0, %globaltimer;")
CLOCK = gl.constexpr("mov.u64 $0, %clock64;")
SMID = gl.constexpr("{ .reg .u32 t; mov.u32 t, %smid; cvt.u64.u32 $0, t; }")


@gluon.jit
def _timer(dep, ASM: gl.constexpr):
    """A special register as int64 (ASM: one of the above); `dep` only orders the read after it."""
    return gl.inline_asm_elementwise(ASM, "=l,r", [dep], dtype=gl.int64, is_pure=False, pack=1)


_PLANS: dict[tuple, tuple[dict, int, int]] = {}
_RESIDENT: dict[tuple, int] = {}


MAX_M = 64  # batch rows one launch takes (the generator's decode batches up to 64 sequences)


def tc_bn(m: int) -> int:
    """Batch columns of the mma tiles for m rows: 8, 16, 32 or 64."""
    assert 1 <= m <= MAX_M, f"exl3_tc takes 1..{MAX_M} rows, got {m}"
    return max(8, 1 << (m - 1).bit_length())


def tc_constexprs(kt: int, nt: int, depth: int, codebook: str, m: int, has_bias: bool, grouped: bool,
                  ta: int | None = None, prefetch: bool | None = None, pingpong: bool = False,
                  timeline: bool = False, pdl: bool = False, pdl_prefetch: int = 0,
                  x_coalesced: bool | None = None, pdl_early: bool = False) -> dict:
    """The compile-time constants of one launch (also used by the compile tests and sass_report)."""
    bn = tc_bn(m)
    if x_coalesced is None:
        x_coalesced = m >= XCOAL_M
    if ta is None:
        # 8 tile rows per iteration: fewer instructions per weight (K = 4, m = 1: 4.77 against 5.44 with 4)
        # and more loads in flight. With three words per tile (K = 5, 6) or two mma columns (m > 8) that
        # takes 124-167 registers (3 programs per SM instead of 5), yet timed faster on an H100 in 33 of
        # 36 shape × K × m cases, the other 3 within 2 % (K = 4, m = 16, 4096→4096: 16.2 against 24.1 µs).
        # From 32 columns on, the accumulator alone takes BN / 2 registers: 4 rows keep the rest in bounds,
        # except at 32 columns with x through shared memory and K <= 4 (161-164 registers, 3 programs per
        # SM): K = 4, 4096->14336 32.1 against 35.7 us, 4096^2 21.3 against 29.4 (64 columns with 8 rows
        # spill: 255 registers).
        ta = 8 if bn <= 16 or (bn == 32 and x_coalesced and depth <= 64) else 4
    if prefetch is None:
        # Loading iteration i + 1's words before decoding iteration i's (120-161 registers) timed 1-10 %
        # faster at m = 1 and 4 on an H100 and 4-14 % slower at m = 16, where the second mma column
        # already holds as many registers (benchmarks/RESULTS.md, 2026-12-07 third session).
        prefetch = m <= 8
    assert kt % ta == 0 and pdl_prefetch in (0, 1, 2, 4)
    return dict(NT=nt, K=depth // 16, CODEBOOK=CODEBOOK_IDS[codebook], TA=ta, BN=bn,
                HAS_BIAS=has_bias, C1=MUL1_C1, C2=MUL1_C2, GROUPED=grouped, PREFETCH=prefetch,
                PINGPONG=pingpong, TIMELINE=timeline, PDL=pdl, PDL_PF=pdl_prefetch if pdl else 0,
                XCOAL=x_coalesced, PDL_EARLY=pdl and pdl_early)


def exl3_gemv_tc(x_h: torch.Tensor, x_sums: torch.Tensor, trellis: torch.Tensor, svh: torch.Tensor,
                 bias: torch.Tensor | None, codebook: str, n: int, out_dtype: torch.dtype, *, ta: int | None = None,
                 prefetch: bool | None = None, pingpong: bool = False, per_sm: int | None = None,
                 programs: int | None = None, group_blocks: tuple[int, ...] = (), timeline: bool = False,
                 x_coalesced: bool | None = None):
    """Same contract as exl3_gemv (x_h fp16 [m <= 64, k_pad] or [G <= 3, m, k_pad] with group_blocks),
    on the tensor cores for every m; CUDA only (sm_80+). pingpong (two register sets for the prefetch) is a
    variant to time, see _tc_span; x_coalesced
    (x rows loaded once per program and moved through shared memory) defaults to m >= XCOAL_M.
    timeline=True (a diagnostic) returns (y, the kernel's per-program record [programs, 6] int64: SM,
    start / end ns, start cycle, K-loop cycles, cycles)."""
    m, k_pad = x_h.shape[-2:]
    kt, nt, depth = trellis.shape
    assert m <= MAX_M and k_pad == kt * 16 and x_h.stride(-1) == 1 and x_h.dtype == torch.float16 and x_h.is_cuda
    assert trellis.stride(2) == 1 and trellis.stride(1) == depth, "trellis tiles must be contiguous"
    if depth % 16 or not 1 <= depth // 16 <= 8:
        raise ValueError(f"the tensor-core kernel handles integer K = 1..8, got trellis depth {depth}")
    groups = x_h.shape[0] if x_h.dim() == 3 else 1
    assert len(group_blocks) == groups - 1 <= 2 and x_sums.dim() == x_h.dim()
    gb = [*group_blocks, *[nt // 8] * (2 - len(group_blocks))]
    stride_xg, stride_sg = (x_h.stride(0), x_sums.stride(0)) if groups > 1 else (0, 0)
    row_stride = trellis.stride(0) // depth  # tiles per trellis row (a column slice keeps the parent's)
    y = torch.empty(m, n, device=x_h.device, dtype=out_dtype)
    tr = trellis.view(torch.int32)
    if x_coalesced is None:
        x_coalesced = m >= XCOAL_M
    key = (x_h.device, kt, nt, row_stride, depth, codebook, tc_bn(m), bias is not None, ta, prefetch, pingpong,
           per_sm, programs, groups > 1, timeline, x_coalesced)
    plan = _PLANS.get(key)

    def args(p: int, maxseg: int, ws: torch.Tensor, cnt: torch.Tensor, clk: torch.Tensor | None = None) -> tuple:
        return (x_h, x_sums, tr, svh, bias if bias is not None else svh, y, ws, cnt,
                clk if clk is not None else cnt, m, n, x_h.stride(-2),
                y.stride(0), kt // 8, kt // consts["TA"], nt // 8 * (kt // consts["TA"]), p, maxseg, *gb,
                stride_xg, stride_sg)

    if plan is None:
        pdl = pdl_on(x_h.device)  # (a module switch: tests and benchmarks that flip it clear _PLANS)
        consts = tc_constexprs(kt, row_stride, depth, codebook, m, bias is not None, groups > 1, ta, prefetch,
                               pingpong, timeline, pdl, PDL_PREFETCH, x_coalesced, PDL_EARLY)
        plan = _PLANS[key] = (consts, *stream_k_plan(
            x_h.device, nt // 8, kt // consts["TA"], per_sm, programs, _RESIDENT,
            (x_h.device, tuple(sorted(consts.items()))), NUM_WARPS,
            lambda ws, cnt: _exl3_tc_kernel.warmup(*args(1, 1, ws, cnt), grid=(1,), num_warps=NUM_WARPS,
                                                   launch_pdl=pdl, **consts)))
    consts, programs, maxseg = plan
    ws, cnt = _workspace(x_h.device, nt // 8 * maxseg * consts["BN"] * 128, nt // 8)
    clk = torch.zeros(programs, 6, device=x_h.device, dtype=torch.int64) if timeline else None
    _exl3_tc_kernel[(programs,)](*args(programs, maxseg, ws, cnt, clk), num_warps=NUM_WARPS,
                                 launch_pdl=consts["PDL"], **consts)
    return (y, clk) if timeline else y


# Argument types of _exl3_tc_kernel for an ahead-of-time compile (tests on machines without a GPU,
# benchmarks/sass_report.py); pointers and the strides a Llama shape has are 16-divisible.
_SIGNATURE = {"x_ptr": "*fp16", "xsum_ptr": "*fp32", "tr_ptr": "*i32", "svh_ptr": "*fp16", "bias_ptr": "*fp16",
              "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "clk_ptr": "*i64", "M": "i32", "N": "i32",
              "stride_xm": "i32", "stride_ym": "i32", "k_blocks": "i32", "CH": "i32", "U": "i32", "P": "i32",
              "MAXSEG": "i32", "GB1": "i32", "GB2": "i32", "stride_xg": "i32", "stride_sg": "i32"}
_DIVISIBLE = ("N", "stride_xm", "stride_ym", "k_blocks", "CH", "U", "GB1", "GB2", "stride_xg", "stride_sg")


def compile_for_sm90(consts: dict):
    """Compile _exl3_tc_kernel for an H100 without one (ptxas ships in the triton wheel): the compiled
    kernel, whose .asm["cubin"] holds the SASS (cubin_registers reads its register count)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource  # Gluon's counterpart of ASTSource

    sig = dict(_SIGNATURE)
    sig.update({name: "constexpr" for name in consts})
    names = list(sig)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in names
             if sig[a].startswith("*") or a in _DIVISIBLE}
    return triton.compile(GluonASTSource(fn=_exl3_tc_kernel, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": NUM_WARPS})


def cubin_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, local-memory bytes per thread: spills) of a compiled kernel, read with the
    cuobjdump that ships in the triton wheel."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"LOCAL:(\d+)", usage).group(1))


def cubin_registers(cubin: bytes) -> int:
    """Registers per thread of a compiled kernel (cubin_usage)."""
    return cubin_usage(cubin)[0]
