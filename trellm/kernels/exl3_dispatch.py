"""Which EXL3 kernel runs a matmul, by device, batch size and format (CPU never gets here).

    m <= 16        had_in + a decode-GEMV: exl3_tc (tensor cores, decoded straight into mma registers;
                   sm_80 and newer) or exl3_gemv (FMA units), by SMALL_M_KERNEL
    m = 17..64     had_in + exl3_tc where it runs (TC_MAX_M), else as m > 64
    m > 64         LARGE_M "effective": the effective weight (suh, both Hadamards and svh folded in) decoded
                   into a scratch in x's dtype (in column chunks) and one cuBLAS product of x itself — no
                   transform of x or y; "scratch": had_in + Q decoded to an fp16 scratch + cuBLAS + had_out
Half-integer K (optional in the format) takes the torch reference on the GPU.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from trellm.kernels.exl3_decode import dequantize, dequantize_effective
from trellm.kernels.exl3_gemv import exl3_gemv
from trellm.kernels.hadamard import had_in, had_out

if TYPE_CHECKING:
    from trellm.quant.exl3 import EXL3Linear

SMALL_M = 16  # the most rows exl3_gemv takes
# The most rows exl3_tc takes in one launch (its MAX_M); below that it decodes each weight once for all rows,
# where the fp16 scratch + cuBLAS path writes and reads the whole decoded matrix per call. The environment
# variable (16 = the scratch path from 17 rows on) is for A/B timing.
TC_MAX_M = int(os.environ.get("TRELLM_TC_MAX_M", "64"))
if not SMALL_M <= TC_MAX_M <= 64:
    raise ValueError(f"TRELLM_TC_MAX_M={TC_MAX_M}: expected 16..64")
SCRATCH_ELEMS = 64 * 2**20  # fp16 elements of decoded Q held at once (128 MB)
# Which kernel takes m <= SMALL_M: "tc" (kernels/exl3_tc.py for every m; sm_80 and newer), "fma1" (m = 1
# exl3_gemv, m = 2..16 exl3_tc) or "fma" (kernels/exl3_gemv.py for every m). H100 (benchmarks/RESULTS.md,
# 2026-12-07 sixth session): at m = 1 exl3_tc takes 21.4 / 22.4 / 11.6 us on the three Llama shapes at K = 4
# where exl3_gemv takes 23.5 / 24.5 / 11.2; whole 8B model at batch 1 256 -> 276 tok/s with exl3_tc (and its
# early loads, PDL_EARLY). At m = 16 exl3_tc takes 16-36 us where exl3_gemv takes 26-92. The environment
# variable is for A/B timing of whole models.
SMALL_M_KERNEL = os.environ.get("TRELLM_SMALL_M", "tc")
if SMALL_M_KERNEL not in ("tc", "fma1", "fma"):
    raise ValueError(f"TRELLM_SMALL_M={SMALL_M_KERNEL!r}: expected tc, fma1 or fma")
# The large-m path (see the header). "effective" rounds the effective weight to x's dtype: in bf16 that adds
# about as much error as rounding the output to bf16 (0.17 % rms each, CPU check), under 1 % of the
# quantization noise up to K = 6 but ~6 % of it at K = 8, so bf16 layers of K >= 7 keep the fp16 scratch.
LARGE_M = os.environ.get("TRELLM_LARGE_M", "scratch")
if LARGE_M not in ("effective", "scratch"):
    raise ValueError(f"TRELLM_LARGE_M={LARGE_M!r}: expected effective or scratch")
EFFECTIVE_BF16_MAX_K = 6
# The effective path split into this many column chunks, each decoded on a side stream while the previous
# chunk's product runs (the decode is memory-bound, the product compute-bound); 0 = one decode, then one
# product. For A/B timing (not yet timed on a GPU).
EFFECTIVE_OVERLAP = int(os.environ.get("TRELLM_LARGE_M_OVERLAP", "0"))


@functools.lru_cache(maxsize=None)
def _has_mma_v2(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 8


def small_m_limit(device: torch.device) -> int:
    """The most rows gemv_small takes on this device; more go through the fp16 scratch and cuBLAS."""
    return TC_MAX_M if SMALL_M_KERNEL != "fma" and _has_mma_v2(device) else SMALL_M


def gemv_small(x_h: torch.Tensor, x_sums: torch.Tensor, trellis: torch.Tensor, svh: torch.Tensor,
               bias: torch.Tensor | None, codebook: str, n: int, out_dtype: torch.dtype,
               group_blocks: tuple[int, ...] = ()) -> torch.Tensor:
    """The m <= small_m_limit product after had_in (see exl3_gemv for the arguments), by SMALL_M_KERNEL."""
    m = x_h.shape[-2]
    use_tc = SMALL_M_KERNEL == "tc" or (SMALL_M_KERNEL == "fma1" and m > 1) or m > SMALL_M
    if use_tc and _has_mma_v2(x_h.device):
        from trellm.kernels.exl3_tc import exl3_gemv_tc  # Gluon: imported only where it runs

        return exl3_gemv_tc(x_h, x_sums, trellis, svh, bias, codebook, n, out_dtype, group_blocks=group_blocks)
    return exl3_gemv(x_h, x_sums, trellis, svh, bias, codebook, n, out_dtype, group_blocks=group_blocks)


def exl3_matmul(x: torch.Tensor, layer: EXL3Linear,
                rotated: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x [m, in_features] on CUDA -> [m, out_features] in x.dtype. rotated: had_in(x, layer.suh),
    already computed by x's producer (EXL3Linear.input_rotation)."""
    if not float(layer.bits).is_integer():
        return layer._forward_ref(x)
    small = x.shape[0] <= small_m_limit(x.device)
    if not small and uses_effective(layer, x.dtype):
        return exl3_gemm_effective(x, layer)  # x as it is: a rotation handed over goes unused
    x_h, x_sums = had_in(x.contiguous(), layer.suh) if rotated is None else rotated
    if small:
        return gemv_small(x_h, x_sums, layer.trellis, layer.svh, layer.bias, layer.codebook, layer.out_features,
                          x.dtype)
    return exl3_gemm_dequant(x_h, layer, x.dtype)


def uses_effective(layer: EXL3Linear, dtype: torch.dtype) -> bool:
    """Whether a large batch of this layer in `dtype` takes exl3_gemm_effective (LARGE_M and the precision rule)."""
    return LARGE_M == "effective" and (dtype == torch.float16 or
                                       (dtype == torch.bfloat16 and layer.bits <= EFFECTIVE_BF16_MAX_K))


def exl3_gemm_effective(x: torch.Tensor, layer: EXL3Linear, transform: str = "dot",
                        overlap: int | None = None) -> torch.Tensor:
    """Large batches: y = x @ W + bias with W decoded whole (exl3_decode.dequantize_effective) into a scratch
    in x's dtype; cuBLAS reads x directly (W's padding rows dropped, x not padded). In column chunks where W
    exceeds SCRATCH_ELEMS, or (overlap, default EFFECTIVE_OVERLAP) in that many chunks decoded on a side
    stream ahead of the products."""
    overlap = EFFECTIVE_OVERLAP if overlap is None else overlap
    n, k, k_pad, n_pad = layer.out_features, layer.in_features, layer.k_pad, layer.n_pad
    if overlap <= 1 and n_pad * k_pad <= SCRATCH_ELEMS:  # every Llama-8B linear but the head: one product
        w_t = dequantize_effective(layer.trellis, layer.codebook, layer.suh, layer.svh, transform=transform,
                                   dtype=x.dtype)
        return F.linear(x, w_t[:n, :k], layer.bias.to(x.dtype) if layer.bias is not None else None)
    return _effective_chunks(x, layer, transform, max(overlap, 1), side=overlap > 1)


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _effective_chunks(x: torch.Tensor, layer: EXL3Linear, transform: str, chunks: int, side: bool) -> torch.Tensor:
    """exl3_gemm_effective in (at least) `chunks` column chunks through two scratch buffers within SCRATCH_ELEMS.
    side: the side stream decodes chunk i + 1 while the current stream multiplies chunk i (events order each
    buffer's reuse); else both on the current stream."""
    m = x.shape[0]
    n, k, k_pad, n_pad = layer.out_features, layer.in_features, layer.k_pad, layer.n_pad
    step = -(-n_pad // chunks // 128) * 128  # n_pad / chunks rounded up to whole 128-column blocks
    step = max(128, min(step, SCRATCH_ELEMS // 2 // k_pad // 128 * 128))
    main = torch.cuda.current_stream(x.device)
    decoder = _SIDE_STREAMS.setdefault(x.device, torch.cuda.Stream(x.device)) if side else main
    bufs = [torch.empty(step, k_pad, device=x.device, dtype=x.dtype) for _ in range(2)]
    decoder.wait_stream(main)  # the buffers' memory may have had earlier users on this stream
    freed: list[torch.cuda.Event | None] = [None, None]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    for i, c0 in enumerate(range(0, n_pad, step)):
        c1, buf = min(n_pad, c0 + step), bufs[i % 2]
        with torch.cuda.stream(decoder):
            if freed[i % 2] is not None:
                decoder.wait_event(freed[i % 2])  # the product that read this buffer two chunks ago is done
            dequantize_effective(layer.trellis, layer.codebook, layer.suh, layer.svh, cols=(c0, c1),
                                 transform=transform, out=buf[: c1 - c0])
            ready = torch.cuda.Event()
            ready.record(decoder)
        main.wait_event(ready)
        cols = min(c1, n) - c0  # the last chunk may hold padding columns
        torch.mm(x, buf[:cols, :k].t(), out=y[:, c0 : c0 + cols])
        freed[i % 2] = torch.cuda.Event()
        freed[i % 2].record(main)
    if side:
        for buf in bufs:
            buf.record_stream(decoder)  # not reused before the side stream's work on it is done
    if layer.bias is not None:
        y += layer.bias
    return y


def exl3_gemm_dequant(x_h: torch.Tensor, layer: EXL3Linear, dtype: torch.dtype) -> torch.Tensor:
    """Large batches: decode Q column chunk by chunk (never the whole matrix) and let cuBLAS multiply."""
    m = x_h.shape[0]
    k_pad, n_pad = layer.k_pad, layer.n_pad
    chunk = max(128, min(n_pad, SCRATCH_ELEMS // k_pad // 128 * 128))
    y_h = torch.empty(m, n_pad, device=x_h.device, dtype=torch.float16)
    scratch = torch.empty(k_pad * chunk, device=x_h.device, dtype=torch.float16)
    for c0 in range(0, n_pad, chunk):
        c1 = min(n_pad, c0 + chunk)
        # Q^T chunk [c1 - c0, k_pad]: the decoder writes it with wide stores; cuBLAS reads it transposed.
        q_t = dequantize(layer.trellis, layer.codebook, cols=(c0, c1), transposed=True,
                         out=scratch[: k_pad * (c1 - c0)].view(c1 - c0, k_pad))
        torch.mm(x_h, q_t.t(), out=y_h[:, c0:c1])
    return had_out(y_h, layer.svh, layer.bias, layer.out_features, dtype)
