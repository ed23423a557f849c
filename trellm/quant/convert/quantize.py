"""Quantizing one linear layer to EXL3 (QUANTIZER.md, "Quantizing one linear").

    W [k, n] (y = x·W)  ->  random signs + blockwise Hadamard on both sides (incoherence)
                        ->  per-input and per-output channel scales (row / column RMS) and a
                            global scale chosen by a small search on sample tiles
                        ->  block LDLQ over 16-row strips, each strip's 16×16 tiles trellis-quantized
                            by Viterbi in the format's sequence order
                        ->  trellis, suh = signs · input scales, svh = signs · output scales · global
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trellm.quant import exl3_format as fmt
from trellm.quant.convert.ldlq import STRIP, block_ldl, ldlq
from trellm.quant.convert.viterbi import decode_states, trellis_search
from trellm.quant.exl3 import round_up

SCALE_CANDIDATES = (0.92, 1.0, 1.08)  # × the RMS of the rotated weights (codebook RMS ~1)


@dataclass
class QuantizedLinear:
    trellis: torch.Tensor  # int16 [k_pad/16, n_pad/16, 16K]
    suh: torch.Tensor  # fp16 [k_pad]
    svh: torch.Tensor  # fp16 [n_pad]
    bits: int
    codebook: str
    proxy_error: float  # tr(Eᵀ H E) / tr(Wᵀ H W) of what readers reconstruct (fp16 scales included)
    damping: float


def _signs(size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (size,), generator=generator).float() * 2 - 1


def _had_both(w: torch.Tensor) -> torch.Tensor:
    """Hk · w · Hn with blockwise 128-point Hadamards on rows and columns."""
    return fmt.had128(fmt.had128(w.T).T)


def _strip_to_tiles(strip: torch.Tensor) -> torch.Tensor:
    """[16, n] -> [n/16, 256]: each 16×16 tile in the format's sequence order p."""
    row, col = fmt.tile_order(strip.device)
    tiles = strip.view(STRIP, -1, 16).permute(1, 0, 2)  # [tiles, 16, 16]
    return tiles[:, row, col]


def _tiles_to_strip(seq: torch.Tensor) -> torch.Tensor:
    row, col = fmt.tile_order(seq.device)
    tiles = torch.empty(seq.shape[0], 16, 16, dtype=seq.dtype, device=seq.device)
    tiles[:, row, col] = seq
    return tiles.permute(1, 0, 2).reshape(STRIP, -1)


def choose_scale(wr: torch.Tensor, bits: int, codebook: str, generator: torch.Generator, samples: int = 8) -> float:
    """Global scale g (target = Wr / g) minimising the trellis error on a sample of tiles."""
    k, n = wr.shape
    rms = float(wr.pow(2).mean().sqrt()) or 1.0
    a = torch.randint(0, k // 16, (samples,), generator=generator)
    c = torch.randint(0, n // 16, (samples,), generator=generator)
    tiles = torch.stack([_strip_to_tiles(wr[16 * i : 16 * i + 16, 16 * j : 16 * j + 16])[0] for i, j in zip(a, c)])
    best = None
    for f in SCALE_CANDIDATES:
        g = rms * f
        q = decode_states(trellis_search(tiles / g, bits, codebook, tail_biting=False), codebook) * g
        err = float((tiles - q).pow(2).mean())
        if best is None or err < best[0]:
            best = (err, g)
    return best[1]


def channel_scales(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-input (d, rows) and per-output (c, columns) scales with w = diag(d)·w̃·diag(c) and every row
    and column of w̃ of RMS ~1: the columns' RMS first, then the rows' RMS of the column-scaled
    matrix. All-zero rows or columns (padding) keep scale 1. Powers of two would be exact in fp16;
    these are rounded there with suh/svh, and the error report uses the rounded values."""
    c = w.pow(2).mean(0).sqrt()
    c = torch.where(c > 0, c, torch.ones_like(c))
    d = (w / c[None, :]).pow(2).mean(1).sqrt()
    d = torch.where(d > 0, d, torch.ones_like(d))
    return d, c


def quantize_linear(weight: torch.Tensor, hessian: torch.Tensor, bits: int, *, codebook: str = "mul1",
                    seed: int = 0, damping: float = 0.025, scale_channels: bool = True) -> QuantizedLinear:
    """weight [n, k] (Hugging Face layout), hessian [k, k] = mean of xᵀx over calibration rows."""
    n, k = weight.shape
    kp, np_ = round_up(k, 128), round_up(n, 128)
    dev = weight.device
    g = torch.Generator().manual_seed(seed)
    w = F.pad(weight.float().T, (0, np_ - n, 0, kp - k))  # [kp, np]
    h = torch.zeros(kp, kp, dtype=torch.float64, device=dev)
    h[:k, :k] = hessian.double()
    if kp > k:  # padded inputs are always zero: any positive diagonal keeps H definite
        h[k:, k:] = torch.eye(kp - k, dtype=torch.float64, device=dev) * torch.diagonal(h[:k, :k]).mean()
    su, sv = _signs(kp, g).to(dev), _signs(np_, g).to(dev)
    d, c = channel_scales(w) if scale_channels else (torch.ones(kp, device=dev), torch.ones(np_, device=dev))
    # w = diag(d)·w̃·diag(c): quantize w̃, whose rows and columns have equal RMS, against the Hessian of
    # its own input x ⊙ d; d and c fold into suh and svh.
    su, sv = su * d, sv * c
    wr = _had_both(w / su[:, None] / sv[None, :])  # rotated weights: close to i.i.d. Gaussian
    hr = _had_both((h * su.double()[:, None] * su.double()[None, :]))  # Hk·S·H·S·Hk
    scale = choose_scale(wr, bits, codebook, g)
    l, _, used = block_ldl(hr, damping=damping)
    trellis = torch.empty(kp // 16, np_ // 16, 16 * bits, dtype=torch.int16, device=dev)

    def quantize_strip(b: int, target: torch.Tensor) -> torch.Tensor:
        states = trellis_search(_strip_to_tiles(target / scale), bits, codebook)  # [tiles, 256]
        trellis[b] = fmt.pack_states(states, bits)
        return _tiles_to_strip(decode_states(states, codebook) * scale)

    wr_hat = ldlq(wr, l, quantize_strip)
    suh, svh = su.half(), (sv * scale).half()
    # Report the error in the original space as a reader reconstructs it (fp16 suh/svh), on the real
    # (unpadded) rows and columns: padded output columns soak up part of the rotated error but are
    # thrown away by every reader.
    w_hat = _had_both(wr_hat / scale) * suh.float()[:, None] * svh.float()[None, :]
    e = (w[:k, :n] - w_hat[:k, :n]).double()
    w64, h64 = w[:k, :n].double(), hessian.double()
    proxy = float(torch.trace(e.T @ h64 @ e) / torch.trace(w64.T @ h64 @ w64))
    return QuantizedLinear(trellis=trellis, suh=suh, svh=svh, bits=bits, codebook=codebook, proxy_error=proxy,
                           damping=used)
