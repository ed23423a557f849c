"""Blockwise 128-point Hadamard transforms around an EXL3 matmul (EXL3_FORMAT.md §2.1).

    had_in:  x' = had128(pad(x) ⊙ suh)       -> fp16 [m, k_pad]   (the GEMM's input)
    had_out: y  = had128(y') ⊙ svh + bias     -> [m, n] in the caller's dtype

had_in transforms each [16, 128] block with one tensor-core product against the
orthonormal 128×128 Sylvester matrix (kept per device), or with TRELLM_HAD_IN=fwht by
butterflies in fp32 (bit-equal to had_in_ref); the output side (`had_out_store`,
also the fused GEMV's epilogue) runs a fast Walsh-Hadamard transform in registers. A call
costs one launch whatever the shape. `*_ref` are the same functions in torch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from trellm.kernels import grid_release, pdl_on
from trellm.quant.exl3_format import had128, hadamard_matrix

_H_CACHE: dict[tuple[torch.device, bool], torch.Tensor] = {}
# had_in's form: "dot" (x ⊙ suh rounded to fp16, one tensor-core product with H per [16, 128] block) or
# "fwht" (butterflies in fp32, blocks of min(16, m) rows). For A/B timing; dot is the one timed so far.
HAD_IN = os.environ.get("TRELLM_HAD_IN", "dot")
if HAD_IN not in ("dot", "fwht"):
    raise ValueError(f"TRELLM_HAD_IN={HAD_IN!r}: expected dot or fwht")


def hadamard_128(device: torch.device, unit: bool = True) -> torch.Tensor:
    """The 128-point Sylvester matrix in fp16 (a tensor-core operand), one per device: orthonormal (had_in's),
    or with unit = False its ±1 entries, exact in fp16 (the effective-weight decoder's, which scales once)."""
    key = (torch.device(device), unit)
    h = _H_CACHE.get(key)
    if h is None:
        h = hadamard_matrix(128, torch.float16 if unit else torch.float32, device)
        h = _H_CACHE[key] = (h if unit else (h * 128**0.5).round().to(torch.float16)).contiguous()
    return h


@triton.jit
def _had_in_kernel(x_ptr, suh_ptr, h_ptr, out_ptr, sums_ptr, M, K, K_PAD, stride_xm, stride_om, BM: tl.constexpr,
                   RELEASE: tl.constexpr = False):
    if RELEASE:  # the linear consuming x' may launch now (it waits for this kernel's output)
        grid_release()
    pid_m, pid_k, grp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)  # [BM]
    cols = pid_k * 128 + tl.arange(0, 128)  # [128]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :],
                mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)  # [BM, 128]
    xs = (x.to(tl.float32) * tl.load(suh_ptr + grp * K_PAD + cols).to(tl.float32)).to(tl.float16)
    r = tl.arange(0, 128)
    h = tl.load(h_ptr + r[:, None] * 128 + r[None, :])  # [128, 128] fp16
    y = tl.dot(xs, h).to(tl.float16)  # [BM, 128]
    tl.store(out_ptr + grp * M * stride_om + rows[:, None] * stride_om + cols[None, :], y, mask=rows[:, None] < M)
    # Row sums of the rounded block: the mul1 matmul applies its codebook offset through them.
    kb = tl.num_programs(1)
    tl.store(sums_ptr + (grp * M + rows) * kb + pid_k, tl.sum(y.to(tl.float32), axis=1), mask=rows < M)


@triton.jit
def _fwht128(y):
    """Unnormalised 128-point Walsh-Hadamard transform of each row of y [R, 128] (fp32) in registers:
    7 butterfly stages over the column bits (Sylvester order: bit b pairs columns c and c ^ 2^b)."""
    R: tl.constexpr = y.shape[0]
    v = tl.reshape(y, (R, 2, 2, 2, 2, 2, 2, 2))  # column bits 6 .. 0
    for _ in tl.static_range(7):
        lo, hi = tl.split(v)  # the last dimension: the current bit
        v = tl.permute(tl.join(lo + hi, lo - hi), (0, 7, 1, 2, 3, 4, 5, 6))  # next bit last
    return tl.reshape(v, (R, 128))


@triton.jit
def _had_in_fwht_kernel(x_ptr, suh_ptr, out_ptr, sums_ptr, M, K, K_PAD, stride_xm, stride_om, BM: tl.constexpr,
                        RELEASE: tl.constexpr = False):
    """had_in by butterflies in fp32 instead of a product with H: no 32 KB matrix per program, and BM
    may be as small as the batch (1 row at m = 1)."""
    if RELEASE:
        grid_release()
    pid_m, pid_k, grp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_k * 128 + tl.arange(0, 128)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :],
                mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)
    xs = x.to(tl.float32) * tl.load(suh_ptr + grp * K_PAD + cols).to(tl.float32)
    y = (_fwht128(xs) * 0.08838834764831845).to(tl.float16)  # 128^-1/2
    tl.store(out_ptr + grp * M * stride_om + rows[:, None] * stride_om + cols[None, :], y, mask=rows[:, None] < M)
    kb = tl.num_programs(1)
    tl.store(sums_ptr + (grp * M + rows) * kb + pid_k, tl.sum(y.to(tl.float32), axis=1), mask=rows < M)


@triton.jit
def rotate_store(y, c0, row, suh_ptr, out_ptr, sums_ptr, M, K_PAD, G: tl.constexpr, BLOCK: tl.constexpr):
    """had_in's fwht form inside a producing kernel (RMSNorm, act·mul): for the BLOCK columns from c0
    (a multiple of 128) of one row y (fp32, already rounded to the model dtype, zero past the input's
    width), store x' = had128(y ⊙ suh[g]) in fp16 and its 128-block sums for each of G suh rows, as
    had_in would ([G, M, K_PAD] and [G, M, K_PAD/128]), and the consumer's had_in launch disappears.
    The operations of _had_in_fwht_kernel: the same bits in the interpreter; compiled, the two may
    contract a product into a sum or order a block sum differently (last-bit differences)."""
    cols = c0 + tl.arange(0, BLOCK)
    blocks = c0 // 128 + tl.arange(0, BLOCK // 128)
    kb = K_PAD // 128
    for g in tl.static_range(G):
        s = tl.load(suh_ptr + g * K_PAD + cols, mask=cols < K_PAD, other=0.0).to(tl.float32)
        z = (_fwht128(tl.reshape(y * s, (BLOCK // 128, 128))) * 0.08838834764831845).to(tl.float16)
        tl.store(out_ptr + (g * M + row) * K_PAD + cols, tl.reshape(z, (BLOCK,)), mask=cols < K_PAD)
        tl.store(sums_ptr + (g * M + row) * kb + blocks, tl.sum(z.to(tl.float32), axis=1), mask=blocks < kb)


def rotation_outputs(suh: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (x' fp16 [G, m, k_pad], sums fp32 [G, m, k_pad/128]) for rotate_store, suh [G, k_pad]."""
    g, k_pad = suh.shape
    return (torch.empty(g, m, k_pad, device=suh.device, dtype=torch.float16),
            torch.empty(g, m, k_pad // 128, device=suh.device, dtype=torch.float32))


@triton.jit
def had_out_store(y, rows, cols, svh_ptr, bias_ptr, out_ptr, M, N, stride_om, HAS_BIAS: tl.constexpr):
    """Store had128(y) ⊙ svh (+ bias) for a [rows, 128-column block] of y' (fp32): the output side of
    every EXL3 matmul, shared by had_out and the fused GEMV's epilogue."""
    # A fast Walsh-Hadamard transform in registers, not a matmul against H: no 64 KB matrix to load or
    # stage in shared memory, which would cap how many GEMV programs fit on an SM.
    scale = tl.load(svh_ptr + cols).to(tl.float32) * 0.08838834764831845  # 128^-1/2
    z = _fwht128(y) * scale[None, :]
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], z.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _had_out_kernel(y_ptr, svh_ptr, bias_ptr, out_ptr, M, N, stride_ym, stride_om,
                    BM: tl.constexpr, HAS_BIAS: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * 128 + tl.arange(0, 128)
    y = tl.load(y_ptr + rows[:, None] * stride_ym + cols[None, :], mask=rows[:, None] < M, other=0.0)
    had_out_store(y.to(tl.float32), rows, cols, svh_ptr, bias_ptr, out_ptr, M, N, stride_om, HAS_BIAS)


def had_in(x: torch.Tensor, suh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, k] (any float dtype, unit column stride), suh fp16 [k_pad] ->
    (x' fp16 [m, k_pad], fp32 [m, k_pad/128] sums of x' over each 128-block).
    With suh [G, k_pad] (linears sharing an input, each with its own signs and scales) one launch
    transforms x for all of them: x' [G, m, k_pad], sums [G, m, k_pad/128]."""
    m, k = x.shape
    k_pad = suh.shape[-1]
    assert x.stride(1) == 1 and k_pad % 128 == 0 and k <= k_pad and suh.is_contiguous(), \
        (x.shape, x.stride(), suh.shape)
    groups = suh.shape[:-1]
    out = torch.empty(*groups, m, k_pad, device=x.device, dtype=torch.float16)
    sums = torch.empty(*groups, m, k_pad // 128, device=x.device, dtype=torch.float32)
    if HAD_IN == "fwht":
        bm = min(16, triton.next_power_of_2(m))
        grid = (triton.cdiv(m, bm), k_pad // 128, suh.numel() // k_pad)
        _had_in_fwht_kernel[grid](x, suh, out, sums, m, k, k_pad, x.stride(0), k_pad, BM=bm, RELEASE=pdl_on(x.device))
    else:
        grid = (triton.cdiv(m, 16), k_pad // 128, suh.numel() // k_pad)
        _had_in_kernel[grid](x, suh, hadamard_128(x.device), out, sums, m, k, k_pad, x.stride(0), k_pad, BM=16,
                             RELEASE=pdl_on(x.device))
    return out, sums


def had_out(y: torch.Tensor, svh: torch.Tensor, bias: torch.Tensor | None, n: int, dtype: torch.dtype) -> torch.Tensor:
    """y' [m, n_pad] -> [m, n] in `dtype`: had128(y') ⊙ svh (+ bias)."""
    m, n_pad = y.shape
    assert y.stride(1) == 1 and n_pad == svh.shape[0] and n_pad % 128 == 0
    out = torch.empty(m, n, device=y.device, dtype=dtype)
    grid = (triton.cdiv(m, 16), n_pad // 128)
    _had_out_kernel[grid](y, svh, bias if bias is not None else svh, out,
                          m, n, y.stride(0), out.stride(0), BM=16, HAS_BIAS=bias is not None)
    return out


def had_in_ref(x: torch.Tensor, suh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xp = torch.nn.functional.pad(x.float(), (0, suh.shape[0] - x.shape[1]))
    out = had128(xp * suh.float()).to(torch.float16)
    return out, out.float().reshape(x.shape[0], -1, 128).sum(-1)


def had_out_ref(y: torch.Tensor, svh: torch.Tensor, bias: torch.Tensor | None, n: int, dtype: torch.dtype) -> torch.Tensor:
    z = (had128(y.float()) * svh.float())[:, :n]
    if bias is not None:
        z = z + bias.float()
    return z.to(dtype)
