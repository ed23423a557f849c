"""Fused small ops of the decoder: RMSNorm (with the residual add before it), RoPE on q and k (optionally
storing k and v into a paged KV cache in the same pass), act(gate)·up.

In a decode step each of these is a handful of tiny torch kernels per layer (a norm alone is six);
at batch 1 their launches cost more than the work. Each function here is one kernel that rounds
exactly where the torch code in layers/ rounds (products and sums in fp32, rounded to the model
dtype at the same points), so the two paths differ only in the order of the norm's sum of squares.
The torch code in layers/ is the reference; these run only on CUDA tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trellm.kernels import grid_release, pdl_on
from trellm.kernels.hadamard import had_in, rotate_store, rotation_outputs

# A linear input already transformed by its producer: (x' fp16 [G, rows, k_pad], 128-block sums fp32
# [G, rows, k_pad/128]) for the G linears that read it (layers/linear.py LinearGroup).
Rotated = tuple[torch.Tensor, torch.Tensor]


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, sum_ptr, w_ptr, out_ptr, N, eps, offset, stride_x, stride_r, stride_o,
                     HAS_RES: tl.constexpr, W_FP32: tl.constexpr, BLOCK: tl.constexpr,
                     RELEASE: tl.constexpr = False):
    if RELEASE:  # the linear after the norm may launch now (it waits for this kernel's output)
        grid_release()
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = _residual_sum(x_ptr, res_ptr, sum_ptr, row, cols, ok, stride_x, stride_r, stride_o, HAS_RES, True)
    xf = x.to(tl.float32)
    r = _inv_rms(xf, N, eps)
    tl.store(out_ptr + row * stride_o + cols, _scaled(xf, r, w_ptr, cols, ok, offset, out_ptr, W_FP32), mask=ok)


@triton.jit
def _residual_sum(x_ptr, res_ptr, sum_ptr, row, cols, ok, stride_x, stride_r, stride_o, HAS_RES: tl.constexpr,
                  STORE: tl.constexpr):
    """x's columns `cols` of a row, or with HAS_RES h + x (rounded like torch's add), which STORE also
    writes: the new residual, beside the norm."""
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RES:
        x = (tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
             + x.to(tl.float32)).to(res_ptr.dtype.element_ty)
        if STORE:
            tl.store(sum_ptr + row * stride_o + cols, x, mask=ok)
    return x


@triton.jit
def _inv_rms(xf, N, eps):
    """1 / rms of a whole row xf [BLOCK] (fp32, zero past N)."""
    return 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)


@triton.jit
def _scaled(xf, r, w_ptr, cols, ok, offset, out_ptr, W_FP32: tl.constexpr):
    """xf · r · (offset + w) in the output dtype, rounded the way the model was trained."""
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if W_FP32:  # Gemma: multiply by (offset + w) in fp32, round once
        y = xf * r * (offset + w)
    else:  # Llama: round the normalised x, multiply by the (offset-added, rounded) weight in the model dtype
        n = (xf * r).to(out_ptr.dtype.element_ty).to(tl.float32)
        y = n * (w + offset).to(out_ptr.dtype.element_ty).to(tl.float32)
    return y.to(out_ptr.dtype.element_ty)


@triton.jit
def _rms_norm_rotate_kernel(x_ptr, res_ptr, sum_ptr, w_ptr, out_ptr, suh_ptr, xh_ptr, xs_ptr, M, N, K_PAD, eps,
                            offset, stride_x, stride_r, stride_o, HAS_RES: tl.constexpr, W_FP32: tl.constexpr,
                            BLOCK: tl.constexpr, G: tl.constexpr, RELEASE: tl.constexpr = False):
    """The norm of one 128-column block of a row, and the next linears' input transform of it: each
    program reads the whole row for the row's scale (from L2 after the first), so that a decode step's
    few rows spread over k_pad / 128 programs each instead of one program doing all the butterflies."""
    if RELEASE:
        grid_release()
    row, blk = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    x = _residual_sum(x_ptr, res_ptr, sum_ptr, row, cols, cols < N, stride_x, stride_r, stride_o, HAS_RES, False)
    r = _inv_rms(x.to(tl.float32), N, eps)
    c = blk * 128 + tl.arange(0, 128)
    okc = c < N
    xb = _residual_sum(x_ptr, res_ptr, sum_ptr, row, c, okc, stride_x, stride_r, stride_o, HAS_RES, True)
    y = _scaled(xb.to(tl.float32), r, w_ptr, c, okc, offset, out_ptr, W_FP32)
    tl.store(out_ptr + row * stride_o + c, y, mask=okc)
    rotate_store(tl.where(okc, y.to(tl.float32), 0.0), blk * 128, row, suh_ptr, xh_ptr, xs_ptr, M, K_PAD, G, 128)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [R, N] with a unit stride along N (a view where the layout allows)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


# Up to this many rows the norm with the input transform runs one program per (row, 128-column block); more
# rows fill the GPU with one program per row, and the transform is had_in's launch after the plain norm.
ROTATE_ROWS = 64


def _norm(x2: torch.Tensor, res: torch.Tensor | None, weight: torch.Tensor, eps: float, offset: float,
          weight_in_fp32: bool, rotate: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor | None, Rotated | None]:
    out = torch.empty(x2.shape, device=x2.device, dtype=x2.dtype)
    summed = torch.empty_like(out) if res is not None else None
    m, n = x2.shape
    block = triton.next_power_of_2(n)
    args = (x2, res if res is not None else x2, summed if summed is not None else x2, weight, out)
    strides = (x2.stride(0), res.stride(0) if res is not None else 0, out.stride(0))
    if rotate is not None and m <= ROTATE_ROWS:
        groups, k_pad = rotate.shape
        assert rotate.is_contiguous() and n <= k_pad and k_pad % 128 == 0, (n, rotate.shape)
        rotated = rotation_outputs(rotate, m)
        _rms_norm_rotate_kernel[(m, k_pad // 128)](*args, rotate, *rotated, m, n, k_pad, eps, float(offset), *strides,
                                                   HAS_RES=res is not None, W_FP32=weight_in_fp32, BLOCK=block,
                                                   G=groups, RELEASE=pdl_on(x2.device), num_warps=4)
        return out, summed, rotated
    _rms_norm_kernel[(m,)](*args, n, eps, float(offset), *strides, HAS_RES=res is not None, W_FP32=weight_in_fp32,
                           BLOCK=block, RELEASE=pdl_on(x2.device), num_warps=min(16, max(1, block // 256)))
    return out, summed, had_in(out, rotate) if rotate is not None else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, weight_in_fp32: bool) -> torch.Tensor:
    """RMSNorm over the last dimension (RMSNorm._forward_ref's roundings)."""
    return _norm(_rows(x), None, weight, eps, offset, weight_in_fp32)[0].view(x.shape)


def add_rms_norm(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                 weight_in_fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + x, RMSNorm of that sum): the add and the norm in one pass over each row."""
    assert residual.shape == x.shape, "the residual must have x's shape"
    out, summed, _ = _norm(_rows(x), _rows(residual), weight, eps, offset, weight_in_fp32)
    return summed.view(x.shape), out.view(x.shape)


def rms_norm_rotated(residual: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor, eps: float,
                     offset: float, weight_in_fp32: bool, rotate: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, Rotated | None]:
    """RMSNorm of residual + x (of x alone without a residual) that also applies the next linears' input
    transform (hadamard.rotate_store; `rotate` = their suh [G, k_pad]): returns (the sum — x itself
    without a residual —, the norm, (x' [G, rows, k_pad], block sums [G, rows, k_pad/128]), or None
    without `rotate`)."""
    out, summed, rotated = _norm(_rows(x), _rows(residual) if residual is not None else None, weight, eps, offset,
                                 weight_in_fp32, rotate)
    return (summed.view(x.shape) if summed is not None else x), out.view(x.shape), rotated


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr, HQ, HK, stride_qt, stride_kt,
                 stride_ct, stride_vt, stride_cache, D: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                 BLOCK_H: tl.constexpr, STORE_KV: tl.constexpr, TAIL_PAD: tl.constexpr, D_PAD: tl.constexpr):
    t = tl.program_id(0)
    heads = tl.arange(0, BLOCK_H)
    i = tl.arange(0, HALF_PAD)
    i_ok = i < HALF
    c1 = tl.load(cos_ptr + t * stride_ct + i, mask=i_ok).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + t * stride_ct + HALF + i, mask=i_ok).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + t * stride_ct + i, mask=i_ok).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + t * stride_ct + HALF + i, mask=i_ok).to(tl.float32)[None, :]
    if STORE_KV:
        row = tl.load(slots_ptr + t).to(tl.int64) * stride_cache  # int64: a layer's cache may pass 2^31 elements
    for which in tl.static_range(2):
        if which == 0:
            ptr, nh, stride = q_ptr, HQ, stride_qt
        else:
            ptr, nh, stride = k_ptr, HK, stride_kt
        for h0 in range(0, nh, BLOCK_H):
            h = h0 + heads
            p = ptr + t * stride + h[:, None] * D + i[None, :]
            ok = (h < nh)[:, None] & i_ok[None, :]
            x1 = tl.load(p, mask=ok, other=0.0)
            x2 = tl.load(p + HALF, mask=ok, other=0.0)
            ty = x1.dtype
            # x·cos + rotate_half(x)·sin with torch's roundings: each product, then the sum.
            a1 = (x1.to(tl.float32) * c1).to(ty).to(tl.float32)
            b1 = (-x2.to(tl.float32) * s1).to(ty).to(tl.float32)
            a2 = (x2.to(tl.float32) * c2).to(ty).to(tl.float32)
            b2 = (x1.to(tl.float32) * s2).to(ty).to(tl.float32)
            y1, y2 = (a1 + b1).to(ty), (a2 + b2).to(ty)
            tl.store(p, y1, mask=ok)
            tl.store(p + HALF, y2, mask=ok)
            if STORE_KV and which == 1:
                pc = kc_ptr + row + h[:, None] * D + i[None, :]
                tl.store(pc, y1, mask=ok)
                tl.store(pc + HALF, y2, mask=ok)
                if TAIL_PAD > 0:  # partial rotary: the channels past rotary_dim go to the cache unrotated
                    j = 2 * HALF + tl.arange(0, TAIL_PAD)
                    tail = (h < nh)[:, None] & (j < D)[None, :]
                    x = tl.load(ptr + t * stride + h[:, None] * D + j[None, :], mask=tail)
                    tl.store(kc_ptr + row + h[:, None] * D + j[None, :], x, mask=tail)
    if STORE_KV:
        d = tl.arange(0, D_PAD)
        for h0 in range(0, HK, BLOCK_H):
            h = h0 + heads
            ok = (h < HK)[:, None] & (d < D)[None, :]
            x = tl.load(v_ptr + t * stride_vt + h[:, None] * D + d[None, :], mask=ok)
            tl.store(vc_ptr + row + h[:, None] * D + d[None, :], x, mask=ok)


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                  v: torch.Tensor | None = None,
                  store: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first rotary_dim channels of q [.., T, Hq, D] and k [.., T, Hk, D] by cos/sin
    [.., T, rotary_dim] (model dtype); in place where each is a view of unit-stride head rows (fresh
    projections), else on a contiguous copy. Returns the rotated (q, k).

    With `store` = (k_rows, v_rows, slots) — a KV cache seen as rows [R, Hk, D] and one row index per
    token [T] — the same launch also writes each token's rotated k and its v [.., T, Hk, D] into row
    slots[t] of k_rows / v_rows, as `index_copy_` would: a paged cache then needs no kernels of its own
    to take a step's keys and values. Slots must be distinct except on rows whose contents nobody reads
    (padding), where which token lands last is unspecified, as with `index_copy_`."""
    d, rd = q.shape[-1], cos.shape[-1]

    def rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x2 = x.reshape(-1, x.shape[-2], d)
        if x2.data_ptr() != x.data_ptr() or x2.stride(1) != d or x2.stride(2) != 1:  # reshape copied: no view
            x = x.contiguous()
            x2 = x.view(-1, x.shape[-2], d)
        return x, x2

    q, q2 = rows(q)
    k, k2 = rows(k)
    c2, s2 = cos.reshape(-1, rd).contiguous(), sin.reshape(-1, rd).contiguous()
    hq, hk = q2.shape[1], k2.shape[1]
    if store is not None:
        assert v is not None, "storing into a KV cache needs v"
        kc, vc, slots = store
        v2 = rows(v)[1]
        assert v2.shape == k2.shape, "v must have k's shape"
        assert slots.shape == (k2.shape[0],), "one cache slot per token"
        for c in (kc, vc):
            assert c.shape[1:] == (hk, d) and c.stride(2) == 1 and c.stride(1) == d, "cache rows [R, Hk, D]"
            assert c.dtype == k2.dtype, "the cache must have the model dtype"
        assert kc.stride(0) == vc.stride(0), "k and v caches must share a layout"
    else:  # never read: STORE_KV=False compiles the stores out
        v2 = kc = vc = slots = k2
    _rope_kernel[(q2.shape[0],)](q2, k2, c2, s2, v2, kc, vc, slots, hq, hk, q2.stride(0), k2.stride(0),
                                 c2.stride(0), v2.stride(0), kc.stride(0), D=d, HALF=rd // 2,
                                 HALF_PAD=triton.next_power_of_2(rd // 2),
                                 BLOCK_H=min(16, triton.next_power_of_2(max(hq, hk))), STORE_KV=store is not None,
                                 TAIL_PAD=triton.next_power_of_2(d - rd) if rd < d else 0,
                                 D_PAD=triton.next_power_of_2(d))
    return q, k


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    return tl.where(x >= 0, 1.0, -1.0) * (1.0 - e) / (1.0 + e)


@triton.jit
def _act_mul_kernel(g_ptr, u_ptr, out_ptr, suh_ptr, xh_ptr, xs_ptr, M, N, K_PAD, stride_g, stride_u, stride_o,
                    ACT: tl.constexpr, BLOCK: tl.constexpr, ROTATE: tl.constexpr, RELEASE: tl.constexpr = False):
    if RELEASE:  # the down projection may launch now
        grid_release()
    row, pid = tl.program_id(0), tl.program_id(1)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    g = tl.load(g_ptr + row * stride_g + cols, mask=ok, other=0.0)
    u = tl.load(u_ptr + row * stride_u + cols, mask=ok, other=0.0).to(tl.float32)
    x = g.to(tl.float32)
    if ACT == 0:  # silu
        a = x / (1.0 + tl.exp(-x))
    elif ACT == 1:  # gelu, tanh approximation
        a = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACT == 2:  # gelu, exact
        a = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    else:  # relu
        a = tl.maximum(x, 0.0)
    a = a.to(g.dtype).to(tl.float32)  # torch rounds the activation before the product
    y = (a * u).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, y, mask=ok)
    if ROTATE > 0:  # the down projection's input transform (BLOCK: a multiple of 128)
        rotate_store(tl.where(ok, y.to(tl.float32), 0.0), pid * BLOCK, row, suh_ptr, xh_ptr, xs_ptr, M, K_PAD,
                     ROTATE, BLOCK)


ACT_CODES = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1, "gelu_new": 1, "gelu_fast": 1, "gelu": 2, "relu": 3}


def act_mul_rotated(act: str, gate: torch.Tensor, up: torch.Tensor, rotate: torch.Tensor | None
                    ) -> tuple[torch.Tensor, Rotated | None]:
    """act(gate) · up and, with `rotate` (the consuming linears' suh [G, k_pad]), their transformed input,
    as rms_norm_rotated; (product, None) without."""
    g2, u2 = _rows(gate), _rows(up)
    m, n = g2.shape
    out = torch.empty(g2.shape, device=gate.device, dtype=gate.dtype)
    block = 1024
    rotated, groups, k_pad, width = None, 0, 0, n
    if rotate is not None:
        groups, k_pad = rotate.shape
        assert rotate.is_contiguous() and n <= k_pad and k_pad % 128 == 0, (n, rotate.shape)
        rotated, width = rotation_outputs(rotate, m), k_pad  # programs cover the padding too
    xh, xs = rotated if rotated is not None else (out, out)
    _act_mul_kernel[(m, triton.cdiv(width, block))](g2, u2, out, rotate if rotate is not None else out, xh, xs, m, n,
                                                    k_pad, g2.stride(0), u2.stride(0), out.stride(0),
                                                    ACT=ACT_CODES[act], BLOCK=block, ROTATE=groups,
                                                    RELEASE=pdl_on(gate.device))
    return out.view(gate.shape), rotated


def act_mul(act: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """act(gate) · up, elementwise over [.., N] tensors with unit last stride."""
    return act_mul_rotated(act, gate, up, None)[0]
