"""Fused EXL3 matmul for small batches (m <= 16: the decode path).

    y = had128( had128(x ⊙ suh) · Q ) ⊙ svh + bias

x' = had128(x ⊙ suh) comes from kernels/hadamard.py. One kernel, `_exl3_gemv_kernel`,
decodes the trellis inside its K-loop (Q never exists in memory):
- m = 1 (`_fma_span`): each thread owns one 16×16 tile per iteration. The tiles' words
  arrive by coalesced, software-pipelined (cp.async) loads and move to their thread
  through shared memory; every window is then cut from registers, and each decoded
  weight feeds one FFMA into one of the tile's 16 column sums.
- m = 2..16 (`_mma_span`): decoded [16·TA, 128] blocks feed the tensor cores (tl.dot,
  the batch padded to 16 rows).
Work is scheduled stream-K: the (column block × K-chunk) units are cut into exactly as
many equal runs as the GPU holds programs at once, so no shape leaves SMs idle or runs a
second partial wave. A program publishes the partial sums of each column block it
touches in a fixed slot; the last one to finish a block adds the slots in order
(deterministic), applies the output Hadamard, svh and the bias. The whole matmul is
one launch (plus the input transform).

mul1 weights enter the product as h = 1024 + bytesum (exact in fp16) and the
codebook's affine map is applied once at the end: Σ x·(C1·h + C2) = C1·Σ x·h + C2·Σ x.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from trellm.kernels import PDL_PREFETCH, grid_wait, pdl_on, prefetch_tiles_l2, sm_count
from trellm.kernels.exl3_decode import (
    CODEBOOK_IDS, MUL1_C1, MUL1_C2, _codebook_f32, _window, decode_block, split4,
)
from trellm.kernels.hadamard import had_out_store
from trellm.quant import exl3_format as fmt

BM = 16  # tl.dot needs 16 rows; smaller batches are masked


@triton.jit
def _epilogue(acc, xsum_ptr, svh_ptr, bias_ptr, y_ptr, M, N, k_blocks, stride_ym, cols,
              CODEBOOK: tl.constexpr, HAS_BIAS: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
              RAW_OFFSET: tl.constexpr, KB_P2: tl.constexpr):
    """acc [R, 128] (R = 1 for a DIRECT launch of the FMA body, else 16 rows, padded for m = 1) -> y's block."""
    rows = tl.arange(0, acc.shape[0])
    if CODEBOOK == 0:
        # mul1: acc holds Σ x'·h and the weights are C1·h + C2 (module docstring); had_in left Σ x'
        # per 128-block of each row.
        b = tl.arange(0, KB_P2)
        xs = tl.sum(tl.load(xsum_ptr + rows[:, None] * k_blocks + b[None, :],
                            mask=(rows[:, None] < M) & (b[None, :] < k_blocks), other=0.0), axis=1)  # one load
        # RAW_OFFSET: 0 when acc already holds Σ x'·h, 1024 when it holds Σ x'·b (h = 1024 + b).
        acc = acc * C1 + xs[:, None] * (C2 + C1 * RAW_OFFSET)
    had_out_store(acc, rows, cols, svh_ptr, bias_ptr, y_ptr, M, N, stride_ym, HAS_BIAS)


@triton.jit
def _tile_words(tr_ptr, tile_a, tile_c, NT, K: tl.constexpr, TA: tl.constexpr, TC: tl.constexpr):
    """Every word of TA × TC tiles, one tile per thread: a tuple whose i-th entry is word i (uint32 [TA, TC])
    of each tile. The load is coalesced (consecutive threads read consecutive 16-byte pieces); the
    splits move the words to their tile's thread through shared memory, one round trip per tile."""
    W: tl.constexpr = 8 * K
    WP: tl.constexpr = 32 if K <= 4 else 64  # a power of two >= 8K; the extra words are masked off
    LOG: tl.constexpr = 5 if K <= 4 else 6
    a = tl.arange(0, TA)[:, None, None]
    c = tl.arange(0, TC)[None, :, None]
    w = tl.arange(0, WP)[None, None, :]
    t = tl.load(tr_ptr + ((tile_a + a) * NT + tile_c + c) * W + w, mask=w < W, other=0).to(tl.uint32, bitcast=True)
    return _unzip(t, TA, TC, WP, LOG, W)


@triton.jit
def _tile_words_direct(tr_ptr, tile_a, tile_c, NT, K: tl.constexpr, TA: tl.constexpr, TC: tl.constexpr):
    """_tile_words by each thread reading its own tile, 16 bytes per load: no shared-memory round trip and
    no barrier. A warp's load touches 32 tiles of 32·K bytes each, so it is split into more L1 wavefronts
    than a coalesced one; those are far fewer than the decode's instructions."""
    W: tl.constexpr = 8 * K
    a = tl.arange(0, TA)[:, None, None]
    c = tl.arange(0, TC)[None, :, None]
    v = tl.arange(0, 4)[None, None, :]
    base = tr_ptr + ((tile_a + a) * NT + tile_c + c) * W + v
    words = ()
    for q in tl.static_range(W // 4):
        words = words + split4(tl.load(base + 4 * q).to(tl.uint32, bitcast=True))
    return words


@triton.jit
def _tile_row_x(x_ptr, tile_a, TA: tl.constexpr, TC: tl.constexpr):
    """The 16 activations of each thread's tile row as 16 tensors [TA, TC] (loaded in the words' shape so
    that both get the same layout; the TC threads of a row read the same addresses)."""
    a = tl.arange(0, TA)[:, None, None]
    c = tl.arange(0, TC)[None, :, None]
    v = tl.arange(0, 4)[None, None, :]
    base = x_ptr + (tile_a + a) * 16 + v + c * 0
    xs = ()
    for q in tl.static_range(4):
        xs = xs + split4(tl.load(base + 4 * q).to(tl.float32))
    return xs


@triton.jit
def _unzip(t, A: tl.constexpr, B: tl.constexpr, N: tl.constexpr, LOG: tl.constexpr, KEEP: tl.constexpr):
    """[A, B, N] (N = 2^LOG) -> a tuple of its first KEEP slices [A, B] along the last dimension, each
    held whole by the threads that hold its [A, B] position. Halving the last dimension LOG times and
    ordering each level's halves as (evens of every part, odds of every part) leaves slice i at
    tuple index i."""
    parts = (t,)
    for level in tl.static_range(LOG):
        evens = ()
        odds = ()
        for q in tl.static_range(1 << level):
            lo, hi = tl.split(tl.reshape(parts[q], (A, B, N >> (level + 1), 2)))
            evens = evens + (lo,)
            odds = odds + (hi,)
        parts = evens + odds
    out = ()
    for i in tl.static_range(KEEP):
        out = out + (tl.reshape(parts[i], (A, B)),)
    return out


@triton.jit
def _tile_state(words, P: tl.constexpr, K: tl.constexpr, USE_ASM: tl.constexpr):
    """State of weight P of each thread's tile: the 16 bits ending at bit (P + 1)·K, read cyclically
    (tail-biting: the first weights' windows start in the tile's last word)."""
    W: tl.constexpr = 8 * K
    start: tl.constexpr = (P + 1) * K - 16  # >= -15
    d: tl.constexpr = (start + 32) // 32 - 1  # word holding the first bit: -1 .. W-1
    off: tl.constexpr = start - 32 * d
    return _window(words[(d + W) % W], words[(d + 1) % W], off, USE_ASM)


@triton.jit
def _add_at(acc, I: tl.constexpr, v):
    """acc with v added to its I-th entry (a tuple of 16 tensors)."""
    out = ()
    for i in tl.static_range(16):
        if i == I:
            out = out + (acc[i] + v,)
        else:
            out = out + (acc[i],)
    return out


@triton.jit
def _fma_span(x_ptr, tr_ptr, NT, row0, n_iter, col_tile, K: tl.constexpr, TA: tl.constexpr,
              CODEBOOK: tl.constexpr, USE_ASM: tl.constexpr, STAGES: tl.constexpr, PROBE: tl.constexpr = 0,
              DIRECT: tl.constexpr = False, PREFETCH: tl.constexpr = False):
    """Σ x'·q over tile rows [row0, row0 + n_iter·TA) of the 8 tile columns from col_tile, one row of x':
    [1, 128] fp32. Each thread owns one tile per iteration (TA × 8 threads): all its
    windows are cut from words in its registers, every decoded weight feeds one FFMA into one of the
    tile's 16 column sums, and the activations of its tile row sit in 16 registers.

    PROBE (benchmarks only, wrong results): 1 loads the words but folds them into the sums without
    decoding (the load floor); 2 decodes words made up in registers (the decode floor)."""
    TC: tl.constexpr = 8
    W: tl.constexpr = 8 * K
    a = tl.arange(0, TA)[:, None, None]
    r = tl.arange(0, 16)[None, None, :]
    acc = ()
    for col in tl.static_range(16):
        acc = acc + (tl.zeros((TA, TC), dtype=tl.float32),)
    if PREFETCH:  # (DIRECT only) the next iteration's words load while this one decodes
        ahead = _tile_words_direct(tr_ptr, row0, col_tile, NT, K, TA, TC)
    for i in tl.range(n_iter, num_stages=STAGES):
        tile_a = row0 + i * TA
        if PROBE == 2:
            seed = (a * 131 + tl.arange(0, TC)[None, :, None] * 17 + tile_a * 40503).to(tl.uint32)
            seed = tl.reshape(seed, (TA, TC)) | tl.zeros((TA, TC), dtype=tl.uint32)
            words = ()
            for j in tl.static_range(W):
                words = words + (seed * (2 * j + 0x9E3779B1),)
        elif PREFETCH:
            words = ahead
            # The last iteration reloads its own tiles rather than read past the segment.
            ahead = _tile_words_direct(tr_ptr, tl.where(i + 1 < n_iter, tile_a + TA, tile_a), col_tile, NT, K, TA, TC)
        elif DIRECT:
            words = _tile_words_direct(tr_ptr, tile_a, col_tile, NT, K, TA, TC)
        else:
            words = _tile_words(tr_ptr, tile_a, col_tile, NT, K, TA, TC)
        if DIRECT:
            xr = _tile_row_x(x_ptr, tile_a, TA, TC)  # 16 × [TA, TC]
        else:
            # The tile row's 16 activations, split into 16 tensors [TA, 1] (broadcast over the tile columns).
            xr = _unzip(tl.load(x_ptr + (tile_a + a) * 16 + r).to(tl.float32), TA, 1, 16, 4, 16)  # 16 × [TA, 1]
        if PROBE == 1:
            folded = words[0]
            for j in tl.static_range(1, W):
                folded = folded ^ words[j]
            acc = _add_at(acc, 0, folded.to(tl.float32) * xr[0])
        else:
            for p in tl.static_range(256):
                # p = 8t + j (§3): tile row 2(t mod 4) + j0 + 8·j1, tile column t div 4 + 8·j2.
                q = _codebook_f32(_tile_state(words, p, K, USE_ASM), CODEBOOK, USE_ASM)
                acc = _add_at(acc, (p // 8) // 4 + 8 * ((p % 8) // 4),
                              q * xr[2 * ((p // 8) % 4) + (p % 2) + 8 * ((p // 2) % 2)])
    # Sum over the tile rows, then [TC, 16] -> [1, 128] in natural column order 16c + col.
    sums = ()
    for col in tl.static_range(16):
        sums = sums + (tl.sum(acc[col], axis=0),)  # [TC]
    parts = sums
    for level in tl.static_range(4):  # join pairs (col, col + 8 >> level) back into the column dimension
        joined = ()
        for q in tl.static_range(8 >> level):
            joined = joined + (tl.join(parts[q], parts[q + (8 >> level)]),)
        parts = joined
    return tl.reshape(parts[0], (1, 128))  # the caller pads it to 16 rows unless the launch is DIRECT


@triton.jit
def _mma_span(x_ptr, tr_ptr, NT, M, stride_xm, row0, n_iter, col_tile, K: tl.constexpr, TA: tl.constexpr,
              CODEBOOK: tl.constexpr, USE_ASM: tl.constexpr):
    """The same sum for up to 16 rows of x' on the tensor cores (x' padded to 16 rows): [16, 128] fp32."""
    rows = tl.arange(0, 16)
    acc = tl.zeros((16, 128), dtype=tl.float32)
    for i in range(n_iter):
        ks = (row0 + i * TA) * 16 + tl.arange(0, 16 * TA)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=rows[:, None] < M, other=0.0)
        w = decode_block(tr_ptr, row0 + i * TA, col_tile, NT, K, TA, 8, CODEBOOK, True, USE_ASM)  # [16TA, 128]
        acc = tl.dot(x, w, acc)
    return acc


@triton.jit
def _exl3_gemv_kernel(
    x_ptr, xsum_ptr, tr_ptr, svh_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, NT, stride_xm, stride_ym, k_blocks, CH, U, P, MAXSEG, GB1, GB2, stride_xg, stride_sg,
    K: tl.constexpr, CODEBOOK: tl.constexpr, TA: tl.constexpr, FMA: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, KB_P2: tl.constexpr,
    STAGES: tl.constexpr = 2, PROBE: tl.constexpr = 0, GROUPED: tl.constexpr = False, DIRECT: tl.constexpr = False,
    PREFETCH: tl.constexpr = False, PDL: tl.constexpr = False, PDL_PF: tl.constexpr = 0,
):
    """Stream-K: the U = (column blocks) × CH (chunks of TA tile rows) units of work are cut into P
    equal runs, one per program, P = the programs the GPU holds at once. A run covers the tail of
    one column block, whole blocks, then the head of another; each piece is a segment. A block's
    segments publish their partial sums in fixed slots and the one that finishes last adds them
    in slot order (deterministic), applies the epilogue and resets the block's counter.

    Up to three linears that share an input run as one (q/k/v, gate/up): their trellis columns are
    concatenated, and column blocks from GB1 (from GB2) read the second (third) transformed input,
    stride_xg / stride_sg further on. NT is the trellis row stride in tiles.

    PDL (a dependent launch, see trellm.kernels.PDL): the programs may start before the kernel that wrote
    x' has finished, and wait for it before touching x', the workspace or y; before that they ask L2 for
    the words of their first PDL_PF iterations (which no kernel writes)."""
    pid = tl.program_id(0)
    # Rows of a partial sum: the one real row with DIRECT (the epilogue's output Hadamard and the stream-K
    # partial sums then skip the 15 padding rows); 16 otherwise, the form timed on the GPU so far.
    R: tl.constexpr = 1 if FMA and DIRECT else 16
    rows = tl.arange(0, R)
    u = pid * U // P
    u_end = (pid + 1) * U // P
    if PDL:
        if PDL_PF > 0:  # the first segment's first PDL_PF iterations: TA × 8 tiles each, one per thread
            blk = u // CH
            c0 = u - blk * CH
            a = tl.arange(0, PDL_PF * TA)[:, None]
            c = tl.arange(0, 8)[None, :]
            prefetch_tiles_l2(tr_ptr + ((c0 * TA + a) * NT + blk * 8 + c) * (8 * K),
                              (a < tl.minimum(u_end - u, CH - c0) * TA) & (c >= 0), K)
        grid_wait()
    while u < u_end:
        blk = u // CH
        c0 = u - blk * CH
        c1 = tl.minimum(CH, c0 + (u_end - u))
        xg_ptr, xsg_ptr = x_ptr, xsum_ptr
        if GROUPED:  # (a constexpr: single linears keep the pointers' alignment facts intact)
            grp = (blk >= GB1).to(tl.int32) + (blk >= GB2).to(tl.int32)
            xg_ptr = x_ptr + tl.multiple_of(grp * stride_xg, 16)
            xsg_ptr = xsum_ptr + grp * stride_sg
        if FMA:
            acc = _fma_span(xg_ptr, tr_ptr, NT, c0 * TA, c1 - c0, blk * 8, K, TA, CODEBOOK, USE_ASM, STAGES, PROBE,
                            DIRECT, PREFETCH)  # [1, 128]
            if R == 16:
                acc = tl.where(rows[:, None] == 0, acc, 0.0)
        else:
            acc = _mma_span(xg_ptr, tr_ptr, NT, M, stride_xm, c0 * TA, c1 - c0, blk * 8, K, TA, CODEBOOK, USE_ASM)
        cols = blk * 128 + tl.arange(0, 128)
        # Programs owning the block's first and last unit: owner(v) = ((v + 1)·P - 1) // U.
        first = ((blk * CH + 1) * P - 1) // U
        nseg = ((blk * CH + CH) * P - 1) // U - first + 1
        if nseg == 1:
            _epilogue(acc, xsg_ptr, svh_ptr, bias_ptr, y_ptr, M, N, k_blocks, stride_ym, cols, CODEBOOK,
                      HAS_BIAS, C1, C2, 1024.0 if FMA else 0.0, KB_P2)
        else:
            keep = (rows[:, None] < M) & (cols[None, :] >= 0)
            slot = (blk * MAXSEG + pid - first) * 16
            tl.store(ws_ptr + (slot + rows[:, None]) * 128 + tl.arange(0, 128)[None, :], acc, mask=keep)
            done = tl.atomic_add(cnt_ptr + blk, 1, sem="acq_rel")
            if done == nseg - 1:
                acc = tl.zeros((R, 128), dtype=tl.float32)
                for s in range(nseg):
                    slot = (blk * MAXSEG + s) * 16
                    acc += tl.load(ws_ptr + (slot + rows[:, None]) * 128 + tl.arange(0, 128)[None, :], mask=keep,
                                   other=0.0, cache_modifier=".cg")
                tl.store(cnt_ptr + blk, 0)  # ready for the next call
                _epilogue(acc, xsg_ptr, svh_ptr, bias_ptr, y_ptr, M, N, k_blocks, stride_ym, cols,
                          CODEBOOK, HAS_BIAS, C1, C2, 1024.0 if FMA else 0.0, KB_P2)
        u += c1 - c0


_WORKSPACES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
# Workspaces that a larger one replaced, kept alive: CUDA graphs captured earlier still read and write them
# (freed, their memory would be handed out again under the replayed kernels: illegal addresses at best).
_OUTGROWN: list[tuple[torch.Tensor, torch.Tensor]] = []


def _workspace(device: torch.device, partial_floats: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial-sum buffer and zeroed counters, shared by all layers on a device (calls are stream-ordered)."""
    ws, cnt = _WORKSPACES.get(device, (None, None))
    if ws is None or ws.numel() < partial_floats or cnt.numel() < blocks:
        if ws is not None:
            _OUTGROWN.append((ws, cnt))
            partial_floats, blocks = max(partial_floats, ws.numel()), max(blocks, cnt.numel())
        ws = torch.empty(max(partial_floats, 1 << 20), device=device, dtype=torch.float32)
        cnt = torch.zeros(max(blocks, 4096), device=device, dtype=torch.int32)
        _WORKSPACES[device] = (ws, cnt)
    return ws, cnt


@functools.lru_cache(maxsize=None)
def _max_segments(n_blocks: int, chunks: int, programs: int) -> int:
    """Most programs any column block is split over (the stream-K workspace slots per block)."""
    units = n_blocks * chunks
    owner = lambda v: ((v + 1) * programs - 1) // units  # noqa: E731
    return max(owner(b * chunks + chunks - 1) - owner(b * chunks) + 1 for b in range(n_blocks))


# How the m = 1 kernel fetches its words when the caller does not say: "shared" (coalesced load shared out
# through shared memory), "direct" or "prefetch" (see exl3_gemv). direct was faster in every case timed on
# an H100 (e.g. 4096→14336: 23.9 against 26.0 µs at K = 4, 21.7 against 24.9 at K = 2; RESULTS.md). The
# environment variable is for A/B timing.
M1_LOADS = os.environ.get("TRELLM_GEMV_M1", "direct")
if M1_LOADS not in ("shared", "direct", "prefetch"):
    raise ValueError(f"TRELLM_GEMV_M1={M1_LOADS!r}: expected shared, direct or prefetch")
_RESIDENT: dict[tuple, int] = {}  # compiled-kernel key -> programs per SM (for the sweep's report too)
_PLANS: dict[tuple, tuple[dict, int, int]] = {}  # call signature -> (constexprs, programs, slots per block)


def _resident_per_sm(kernel, num_warps: int) -> int:
    """How many programs of a compiled kernel one SM holds at once (registers, shared memory, warps)."""
    kernel._init_handles()
    warp_regs = -(-kernel.n_regs * 32 // 256) * 256  # registers are allocated per warp in units of 256
    by_regs = (65536 // warp_regs) // num_warps
    by_smem = (227 * 1024) // max(1, kernel.metadata.shared + 1024)
    return max(1, min(by_regs, by_smem, 64 // num_warps, 32))


def stream_k_plan(device: torch.device, n_blocks: int, chunks: int, per_sm: int | None, programs: int | None,
                  resident: dict, ckey: tuple, num_warps: int, warmup) -> tuple[int, int]:
    """(programs, workspace slots per column block) of a stream-K launch over n_blocks × chunks units: as many
    programs as the GPU holds at once, from the compiled kernel's resources (`warmup(ws, cnt)` compiles it;
    cached in `resident` under ckey), unless per_sm or programs say otherwise."""
    if programs is None:
        if per_sm is None and device.type != "cuda":
            per_sm = 1  # the interpreter: any count is correct
        if per_sm is None:
            if ckey not in resident:
                resident[ckey] = _resident_per_sm(warmup(*_workspace(device, 1, n_blocks)), num_warps)
            per_sm = resident[ckey]
        programs = per_sm * sm_count(device)
    programs = min(programs, n_blocks * chunks)
    return programs, _max_segments(n_blocks, chunks, programs)


def exl3_gemv(x_h: torch.Tensor, x_sums: torch.Tensor, trellis: torch.Tensor, svh: torch.Tensor,
              bias: torch.Tensor | None, codebook: str, n: int, out_dtype: torch.dtype, *, ta: int | None = None,
              num_warps: int | None = None, fma: bool | None = None, use_asm: bool | None = None,
              per_sm: int | None = None, programs: int | None = None, stages: int | None = None,
              probe: int = 0, group_blocks: tuple[int, ...] = (), direct: bool | None = None,
              prefetch: bool | None = None) -> torch.Tensor:
    """(x_h, x_sums) = had_in(x, suh): fp16 [m <= 16, k_pad] and its 128-block sums -> y [m, n] in out_dtype.

    Linears sharing an input (their trellis columns concatenated; the trellis may be a column slice of a
    larger one): x_h [G <= 3, m, k_pad] from had_in with stacked suh, and group_blocks = the first
    128-column block of each group after the first.

    One launch of a stream-K grid with as many programs as the GPU holds at once (per_sm / programs
    override that for tuning; ta, num_warps and stages are the launch shape). direct (m = 1 only): each
    thread loads its own tile's words and activations instead of a coalesced load shared out through
    shared memory, and the epilogue works on the one real row instead of 16 (87 registers against 164 for
    K = 4 in Triton 3.6's sm_90 code, benchmarks/sass_report.py; the default for m = 1, M1_LOADS); prefetch (with
    direct) also loads the next iteration's words before decoding the current ones. stages (default 2, 1
    with direct or prefetch: Triton's pipeliner would stage the direct loads in shared memory, 255
    registers) is the software pipelining of the shared-memory loads."""
    m, k_pad = x_h.shape[-2:]
    kt, nt, depth = trellis.shape
    if direct is None and prefetch is None and m == 1 and fma is not False:
        direct, prefetch = M1_LOADS == "direct", M1_LOADS == "prefetch"
    direct, prefetch = bool(direct), bool(prefetch)
    stages = stages if stages is not None else (1 if direct or prefetch else 2)
    assert m <= BM and k_pad == kt * 16 and x_h.stride(-1) == 1 and x_h.dtype == torch.float16
    assert trellis.stride(2) == 1 and trellis.stride(1) == depth, "trellis tiles must be contiguous"
    groups = x_h.shape[0] if x_h.dim() == 3 else 1
    assert len(group_blocks) == groups - 1 <= 2 and x_sums.dim() == x_h.dim()
    gb = [*group_blocks, *[nt // 8] * (2 - len(group_blocks))]  # blocks past the end: one group
    stride_xg, stride_sg = (x_h.stride(0), x_sums.stride(0)) if groups > 1 else (0, 0)
    if depth % 16 or not 1 <= depth // 16 <= 8:
        raise ValueError(f"the fused kernel handles integer K = 1..8, got trellis depth {depth}")
    fma = m == 1 if fma is None else fma
    assert not fma or m == 1, "the FMA kernel handles one row"
    y = torch.empty(m, n, device=x_h.device, dtype=out_dtype)
    tr = trellis.view(torch.int32)
    # Everything but the tensors is decided once per call signature (decode calls this per layer per token).
    key = (x_h.device, kt, nt, depth, codebook, fma, bias is not None, ta, num_warps, use_asm, per_sm, programs,
           stages, probe, groups > 1, direct, prefetch)
    plan = _PLANS.get(key)

    def args(p: int, maxseg: int, ws: torch.Tensor, cnt: torch.Tensor) -> tuple:
        return (x_h, x_sums, tr, svh, bias if bias is not None else svh, y, ws, cnt,
                m, n, trellis.stride(0) // depth, x_h.stride(-2), y.stride(0), kt // 8, kt // consts["TA"],
                nt // 8 * (kt // consts["TA"]), p, maxseg, *gb, stride_xg, stride_sg)

    if plan is None:
        # Tile rows per iteration (k_pad is a multiple of 128, so kt of 8). The FMA kernel gives every
        # thread one tile of the TA × 8 per iteration. k_pad = 256 with TA = 16 (one chunk) crashes
        # Triton 3.6's coalescing pass on an H200; TA = 8 with 4 warps compiles and is checked there.
        if ta is None:
            ta = (16 if kt % 16 == 0 and kt != 16 else 8) if fma else 2
            if fma and kt == 16 and num_warps is None:
                num_warps = 4
        assert kt % ta == 0
        pdl = pdl_on(x_h.device)  # (a module switch: tests and benchmarks that flip it clear _PLANS)
        num_warps = num_warps if num_warps is not None else (max(1, ta // 4) if fma else 4)
        consts = dict(K=depth // 16, CODEBOOK=CODEBOOK_IDS[codebook], TA=ta, FMA=fma, HAS_BIAS=bias is not None,
                      USE_ASM=x_h.is_cuda if use_asm is None else use_asm, C1=MUL1_C1, C2=MUL1_C2,
                      KB_P2=triton.next_power_of_2(kt // 8), num_warps=num_warps, STAGES=stages, PROBE=probe,
                      GROUPED=groups > 1, DIRECT=direct or prefetch, PREFETCH=prefetch, PDL=pdl,
                      PDL_PF=PDL_PREFETCH if pdl else 0)
        ckey = (x_h.device, tuple(sorted((k, str(v)) for k, v in consts.items())))
        plan = _PLANS[key] = (consts, *stream_k_plan(
            x_h.device, nt // 8, kt // ta, per_sm, programs, _RESIDENT, ckey, num_warps,
            lambda ws, cnt: _exl3_gemv_kernel.warmup(*args(1, 1, ws, cnt), grid=(1,), launch_pdl=pdl, **consts)))
    consts, programs, maxseg = plan
    ws, cnt = _workspace(x_h.device, nt // 8 * maxseg * BM * 128, nt // 8)
    _exl3_gemv_kernel[(programs,)](*args(programs, maxseg, ws, cnt), launch_pdl=consts["PDL"], **consts)
    return y


def exl3_gemv_ref(x_h: torch.Tensor, x_sums: torch.Tensor, trellis: torch.Tensor, svh: torch.Tensor,
                  bias: torch.Tensor | None, codebook: str, n: int, out_dtype: torch.dtype) -> torch.Tensor:
    """The same function in torch: had128(x_h · Q) ⊙ svh + bias, fp32 math."""
    y = fmt.had128(x_h.float() @ fmt.decode_trellis(trellis, codebook).float()) * svh.float()
    y = y[:, :n]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
