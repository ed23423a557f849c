"""Fused EXL3 matmul for small batches (m <= 16: the decode path).

    y = had128( had128(x ⊙ suh) · Q ) ⊙ svh + bias

x' = had128(x ⊙ suh) comes from kernels/hadamard.py. Both kernels here decode the
trellis inside the K-loop (Q never exists in memory) and split K across programs so
that every SM has work for tall and wide shapes alike. For one row, each decoded
weight feeds one FFMA (`_exl3_gemv_fma_kernel`); for 2..16 rows the tensor cores
multiply (`_exl3_gemv_kernel`, tl.dot with the batch padded to 16 rows). Each program writes its
partial sums to a workspace and bumps a per-column-block counter; the program
that arrives last adds the partials and applies the output Hadamard, svh and the
bias, so the whole matmul is one launch (plus the input transform).

mul1 weights enter the product as h = 1024 + bytesum (exact in fp16) and the
codebook's affine map is applied once at the end: Σ x·(C1·h + C2) = C1·Σ x·h + C2·Σ x.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from trellm.kernels.exl3_decode import (
    CODEBOOK_IDS, MUL1_C1, MUL1_C2, _codebook_f32, decode_block, group_state, load_group_words,
)
from trellm.kernels.hadamard import had_out_store, hadamard_128
from trellm.quant import exl3_format as fmt

BM = 16  # tl.dot needs 16 rows; smaller batches are masked


@triton.jit
def _exl3_gemv_kernel(
    x_ptr, xsum_ptr, tr_ptr, svh_ptr, bias_ptr, h_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, NT, stride_xm, stride_ym, tiles_per_split, k_blocks,
    K: tl.constexpr, CODEBOOK: tl.constexpr, TA: tl.constexpr, SPLITS: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, KB_P2: tl.constexpr,
):
    TC: tl.constexpr = 8  # 128 output columns per program: one Hadamard block
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, 16)
    acc = tl.zeros((16, 128), dtype=tl.float32)
    tile0 = pid_s * tiles_per_split
    for it in range(0, tiles_per_split, TA):
        ks = (tile0 + it) * 16 + tl.arange(0, 16 * TA)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=rows[:, None] < M, other=0.0)  # [16, 16TA]
        w = decode_block(tr_ptr, tile0 + it, pid_n * TC, NT, K, TA, TC, CODEBOOK, True, USE_ASM)  # [16TA, 128]
        acc = tl.dot(x, w, acc)
    _finish(acc, pid_n, pid_s, xsum_ptr, svh_ptr, bias_ptr, h_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, NT, stride_ym,
            k_blocks, CODEBOOK, SPLITS, HAS_BIAS, C1, C2, 0.0, KB_P2, 16)


@triton.jit
def _exl3_gemv_fma_kernel(
    x_ptr, xsum_ptr, tr_ptr, svh_ptr, bias_ptr, h_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, NT, stride_xm, stride_ym, tiles_per_split, k_blocks,
    K: tl.constexpr, CODEBOOK: tl.constexpr, TA: tl.constexpr, SPLITS: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, PREFETCH: tl.constexpr,
    KB_P2: tl.constexpr,
):
    """m = 1 without tensor cores: every decoded weight feeds one FFMA, accumulated per output
    column in registers; no layout conversion. Same split-K fixup and epilogue as the MMA kernel."""
    TC: tl.constexpr = 8
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    acc0 = tl.zeros((TA, TC, 8), dtype=tl.float32)  # columns 16c + g
    acc1 = tl.zeros((TA, TC, 8), dtype=tl.float32)  # columns 16c + g + 8
    tile0 = pid_s * tiles_per_split
    a = tl.arange(0, TA)[:, None, None]
    words = load_group_words(tr_ptr, tile0, pid_n * TC, NT, K, TA, TC)
    for it in range(0, tiles_per_split, TA):
        if PREFETCH:
            # Issue the next iteration's loads before decoding this one (the last one reloads itself).
            nxt = tl.minimum(it + TA, tiles_per_split - TA)
            words_next = load_group_words(tr_ptr, tile0 + nxt, pid_n * TC, NT, K, TA, TC)
        else:
            words_next = load_group_words(tr_ptr, tile0 + it, pid_n * TC, NT, K, TA, TC)
            words = words_next
        # The tile row's 16 activations in one load, split into 16 register tensors [TA, 1, 1].
        r = tl.arange(0, 16)[None, None, None, :]
        x16 = tl.load(x_ptr + (tile0 + it + a)[:, :, :, None] * 16 + r).to(tl.float32)  # [TA, 1, 1, 16]
        x16 = tl.reshape(x16, (TA, 1, 1, 2, 2, 2, 2))  # row bits 3, 2, 1, 0
        xa, xb = tl.split(x16)  # bit 0
        xaa, xab = tl.split(xa)  # bit 1
        xba, xbb = tl.split(xb)
        q0, q4 = tl.split(xaa)  # bit 2
        q2, q6 = tl.split(xab)
        q1, q5 = tl.split(xba)
        q3, q7 = tl.split(xbb)
        e0, e8 = tl.split(q0)
        e4, e12 = tl.split(q4)
        e2, e10 = tl.split(q2)
        e6, e14 = tl.split(q6)
        e1, e9 = tl.split(q1)
        e5, e13 = tl.split(q5)
        e3, e11 = tl.split(q3)
        e7, e15 = tl.split(q7)
        xr = (e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15)
        for p0 in tl.static_range(32):
            # p0 = 8·t0 + j: row 2·t0 + j0 + 8·j1 of the tile, column half j2.
            w = _codebook_f32(group_state(words, p0, K, USE_ASM), CODEBOOK, USE_ASM)
            xv = xr[2 * (p0 // 8) + (p0 % 2) + 8 * ((p0 // 2) % 2)]
            if (p0 // 4) % 2 == 0:
                acc0 += w * xv
            else:
                acc1 += w * xv
        words = words_next
    # [TC, 8] per column half -> [1, 128] in natural column order 16c + 8·half + g.
    s0 = tl.sum(acc0, axis=0)
    s1 = tl.sum(acc1, axis=0)
    accn = tl.reshape(tl.permute(tl.join(s0, s1), (0, 2, 1)), (1, 128))
    rows = tl.arange(0, 16)
    acc = tl.where(rows[:, None] == 0, accn, 0.0)  # [16, 128]: row 0 real, the rest padding
    _finish(acc, pid_n, pid_s, xsum_ptr, svh_ptr, bias_ptr, h_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, NT, stride_ym,
            k_blocks, CODEBOOK, SPLITS, HAS_BIAS, C1, C2, 1024.0, KB_P2, 1)


@triton.jit
def _finish(acc, pid_n, pid_s, xsum_ptr, svh_ptr, bias_ptr, h_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, NT, stride_ym,
            k_blocks, CODEBOOK: tl.constexpr, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, C1: tl.constexpr,
            C2: tl.constexpr, RAW_OFFSET: tl.constexpr, KB_P2: tl.constexpr, ROWS: tl.constexpr):
    """Split-K fixup, then the epilogue. Each split publishes its partial sums (the first ROWS rows of
    acc [16, 128]) and bumps the column block's counter; the program that arrives last adds them all,
    resets the counter for the next call and writes the output."""
    rows = tl.arange(0, 16)
    cols = pid_n * 128 + tl.arange(0, 128)
    if SPLITS > 1:
        n_pad = NT * 16
        keep = (rows[:, None] < ROWS) & (cols[None, :] >= 0)
        tl.store(ws_ptr + (pid_s * 16 + rows[:, None]) * n_pad + cols[None, :], acc, mask=keep)
        done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if done == SPLITS - 1:
            acc = tl.zeros((16, 128), dtype=tl.float32)
            for s in tl.static_range(SPLITS):  # unrolled: all loads in flight at once
                acc += tl.load(ws_ptr + (s * 16 + rows[:, None]) * n_pad + cols[None, :], mask=keep, other=0.0,
                               cache_modifier=".cg")
            tl.store(cnt_ptr + pid_n, 0)  # ready for the next call
            _epilogue(acc, xsum_ptr, svh_ptr, bias_ptr, h_ptr, y_ptr, M, N, k_blocks, stride_ym, cols, CODEBOOK,
                      HAS_BIAS, C1, C2, RAW_OFFSET, KB_P2)
    else:
        _epilogue(acc, xsum_ptr, svh_ptr, bias_ptr, h_ptr, y_ptr, M, N, k_blocks, stride_ym, cols, CODEBOOK,
                  HAS_BIAS, C1, C2, RAW_OFFSET, KB_P2)


@triton.jit
def _epilogue(acc, xsum_ptr, svh_ptr, bias_ptr, h_ptr, y_ptr, M, N, k_blocks, stride_ym, cols,
              CODEBOOK: tl.constexpr, HAS_BIAS: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
              RAW_OFFSET: tl.constexpr, KB_P2: tl.constexpr):
    rows = tl.arange(0, 16)
    if CODEBOOK == 0:
        # mul1: acc holds Σ x'·h and the weights are C1·h + C2 (module docstring); had_in left Σ x'
        # per 128-block of each row.
        b = tl.arange(0, KB_P2)
        xs = tl.sum(tl.load(xsum_ptr + rows[:, None] * k_blocks + b[None, :],
                            mask=(rows[:, None] < M) & (b[None, :] < k_blocks), other=0.0), axis=1)  # one load
        # RAW_OFFSET: 0 when acc already holds Σ x'·h, 1024 when it holds Σ x'·b (h = 1024 + b).
        acc = acc * C1 + xs[:, None] * (C2 + C1 * RAW_OFFSET)
    had_out_store(acc, rows, cols, h_ptr, svh_ptr, bias_ptr, y_ptr, M, N, stride_ym, HAS_BIAS)


_WORKSPACES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, partial_floats: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial-sum buffer and zeroed counters, shared by all layers on a device (calls are stream-ordered)."""
    ws, cnt = _WORKSPACES.get(device, (None, None))
    if ws is None or ws.numel() < partial_floats or cnt.numel() < blocks:
        ws = torch.empty(max(partial_floats, 1 << 20), device=device, dtype=torch.float32)
        cnt = torch.zeros(max(blocks, 4096), device=device, dtype=torch.int32)
        _WORKSPACES[device] = (ws, cnt)
    return ws, cnt


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


@functools.lru_cache(maxsize=None)  # called for every matmul of every decode step
def choose_splits(k_tiles: int, n_blocks: int, ta: int, sms: int, scale: float = 1.0) -> int:
    """K-splits so that n_blocks × splits fills the GPU ~3 programs deep; splits divide the K chunks."""
    chunks = k_tiles // ta
    want = max(1, round(3 * scale * sms / n_blocks))
    divisors = [d for d in range(1, chunks + 1) if chunks % d == 0]
    return min(divisors, key=lambda d: (abs(d - want), d))


def exl3_gemv(x_h: torch.Tensor, x_sums: torch.Tensor, trellis: torch.Tensor, svh: torch.Tensor,
              bias: torch.Tensor | None, codebook: str, n: int, out_dtype: torch.dtype, *, splits: int | None = None,
              ta: int | None = None, use_asm: bool | None = None, num_warps: int | None = None,
              fma: bool | None = None, prefetch: bool = True, split_scale: float | None = None,
              maxnreg: int | None = None) -> torch.Tensor:
    """(x_h, x_sums) = had_in(x, suh): fp16 [m <= 16, k_pad] and its 128-block sums -> y [m, n] in out_dtype."""
    m, k_pad = x_h.shape
    kt, nt, depth = trellis.shape
    assert m <= BM and k_pad == kt * 16 and x_h.stride(1) == 1 and x_h.dtype == torch.float16
    if depth % 16 or not 1 <= depth // 16 <= 8:
        raise ValueError(f"the fused kernel handles integer K = 1..8, got trellis depth {depth}")
    fma = m == 1 if fma is None else fma
    assert not fma or m == 1, "the FMA kernel handles one row"
    # Defaults from benchmarks/sweep_gemv.py / tune_exl3.py on an H100 (benchmarks/RESULTS.md):
    # the FMA kernel wants 8 tile rows per iteration on 8 warps; the tensor-core kernel 2 on 4.
    ta = ta if ta is not None else (8 if fma else 2)
    num_warps = num_warps if num_warps is not None else (8 if fma else 4)
    if split_scale is None:
        split_scale = 1.0 if fma else 2.0
    n_blocks = nt // 8
    if splits is None:
        splits = choose_splits(kt, n_blocks, ta, _sm_count(x_h.device), split_scale)
    assert (kt // ta) % splits == 0, (kt, ta, splits)
    ws, cnt = _workspace(x_h.device, splits * BM * nt * 16, n_blocks)
    y = torch.empty(m, n, device=x_h.device, dtype=out_dtype)
    use_asm = x_h.is_cuda if use_asm is None else use_asm
    kernel, extra = (_exl3_gemv_fma_kernel, {"PREFETCH": prefetch}) if fma else (_exl3_gemv_kernel, {})
    if maxnreg is not None:
        extra["maxnreg"] = maxnreg  # register cap: more resident warps to hide load latency
    kernel[(n_blocks, splits)](
        x_h, x_sums, trellis.view(torch.int32), svh, bias if bias is not None else svh,
        hadamard_128(x_h.device, torch.float32), y, ws, cnt,
        m, n, nt, x_h.stride(0), y.stride(0), kt // splits, kt // 8,
        K=depth // 16, CODEBOOK=CODEBOOK_IDS[codebook], TA=ta, SPLITS=splits, HAS_BIAS=bias is not None,
        USE_ASM=use_asm, C1=MUL1_C1, C2=MUL1_C2, KB_P2=triton.next_power_of_2(kt // 8), num_warps=num_warps,
        **extra,
    )
    return y


def exl3_gemv_ref(x_h: torch.Tensor, x_sums: torch.Tensor, trellis: torch.Tensor, svh: torch.Tensor,
                  bias: torch.Tensor | None, codebook: str, n: int, out_dtype: torch.dtype) -> torch.Tensor:
    """The same function in torch: had128(x_h · Q) ⊙ svh + bias, fp32 math."""
    y = fmt.had128(x_h.float() @ fmt.decode_trellis(trellis, codebook).float()) * svh.float()
    y = y[:, :n]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
