"""Quantizing one linear layer to EXL3 (QUANTIZER.md, "Quantizing one linear").

    W [k, n] (y = x·W)  ->  random signs + blockwise Hadamard on both sides (incoherence)
                        ->  per-input and per-output channel scales (row / column RMS) and a
                            global scale chosen by a small search on sample tiles
                        ->  block LDLQ over 16-row strips, each strip's 16×16 tiles trellis-quantized
                            by Viterbi in the format's sequence order
                        ->  trellis, suh = signs · input scales, svh = signs · output scales · global
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trellm.quant import exl3_format as fmt
from trellm.quant.convert.ldlq import STRIP, block_ldl, ldlq_steps, proxy_error
from trellm.quant.convert.viterbi import decode_states, trellis_search
from trellm.quant.exl3 import round_up

# Global scale candidates, × the RMS of the rotated weights (the codebooks' RMS is ~1 for mul1, ~1.24 for
# mcg/3inst): low bit widths do best near 1, high ones far above it (the extremes dominate their error).
SCALE_CANDIDATES = (0.85, 1.0, 1.15, 1.3, 1.5, 1.75, 2.0, 2.4)
SCALE_TOP_TILES = 16  # tiles with the largest values, always in the scale search
SCALE_RANDOM_TILES = 48  # random tiles standing for the rest (at most 1/16 of a matrix's tiles each)


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


def _scale_samples(wr: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles of the rotated weights (sequence order) to choose the global scale on, and the weight of
    each in an estimate of the whole matrix's trellis error: the tiles holding the largest values, each
    counted once, plus a random sample of the rest standing for all of them.

    The extremes must be in the sample: a trellis reaches only 2^K codebook values per step, so a
    value a few sigma out costs far more than the typical one, and rotated real weights have several
    times the Gaussian share beyond 3.5 sigma. On SmolLM2-135M a sample of 8 random tiles chose 1.08 x
    RMS at K = 6 where the layer's Hessian-weighted error was 3.4x lower at 1.5 x RMS."""
    kp, np_ = wr.shape
    blocks = wr.view(kp // 16, 16, np_ // 16, 16).permute(0, 2, 1, 3).reshape(-1, 16, 16)  # row-major tiles
    peaks = blocks.abs().amax(dim=(1, 2))
    n = peaks.numel()
    top_n = min(SCALE_TOP_TILES, max(1, n // 16))
    rand_n = min(SCALE_RANDOM_TILES, max(1, n // 16), n - top_n)
    top = peaks.topk(top_n).indices.cpu()
    rest = torch.ones(n, dtype=torch.bool)
    rest[top] = False
    others = torch.nonzero(rest).flatten()
    picked = others[torch.randperm(len(others), generator=generator)[:rand_n]]
    row, col = fmt.tile_order(wr.device)
    tiles = blocks[torch.cat([top, picked]).to(wr.device)][:, row, col]  # sequence order, as _strip_to_tiles
    weights = torch.cat([torch.ones(top_n), torch.full((rand_n,), (n - top_n) / max(rand_n, 1))])
    return tiles, weights.to(wr.device)


def _choose_scales(samples: list[tuple[torch.Tensor, torch.Tensor]], rms: list[float], bits: int, codebook: str
                   ) -> list[float]:
    """Per linear, the global scale g (target = Wr / g) of SCALE_CANDIDATES × RMS(Wr) with the least
    estimated trellis error over the whole matrix (_scale_samples); every linear and candidate in one
    search."""
    trials = [(i, r * f) for i, r in enumerate(rms) for f in SCALE_CANDIDATES]
    tiles = torch.cat([samples[i][0] / g for i, g in trials])
    q = decode_states(trellis_search(tiles, bits, codebook, tail_biting=False), codebook)
    best: list[tuple[float, float] | None] = [None] * len(samples)
    for (i, g), q_t in zip(trials, q.split([len(samples[i][0]) for i, _ in trials])):
        t, w = samples[i]
        err = float(((t - q_t * g).pow(2).sum(dim=1) * w).sum())
        if best[i] is None or err < best[i][0]:
            best[i] = (err, g)
    return [b[1] for b in best]


def _rms(wr: torch.Tensor) -> float:
    return float(wr.pow(2).mean().sqrt()) or 1.0


def choose_scale(wr: torch.Tensor, bits: int, codebook: str, generator: torch.Generator) -> float:
    """Global scale g (target = Wr / g) minimising the estimated trellis error of the whole matrix."""
    return _choose_scales([_scale_samples(wr, generator)], [_rms(wr)], bits, codebook)[0]


SCALE_MODES = ("both", "columns", "none")  # what channel_scales computes
CHANNEL_SCALES = (*SCALE_MODES, "best")  # what quantize_linears accepts ("best" tries two modes)


def channel_scales(w: torch.Tensor, mode: str = "both") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-input (d, rows) and per-output (c, columns) scales with w = diag(d)·w̃·diag(c); w̃ is quantized.

    both: every row and column of w̃ of RMS ~1 (the columns' RMS first, then the rows' RMS of the
    column-scaled matrix). columns: d = 1 and c = the square root of each column's RMS. The trellis puts an
    error of about the same size on every entry of w̃, so a column's error in w grows with its c, while the
    global scale must cover w̃'s largest columns: √RMS balances the two. On SmolLM2 (CPU, torch Viterbi)
    `columns` lowered the Hessian-weighted proxy error against `both` by 14–56 % on five of six attention
    projections tried at K = 2, 4, 6 and raised it 6 % on the sixth; `both`'s row scales were the costly
    part (RESULTS.md). The KL-divergence did not follow (SmolLM2, H100, 6 bpw: both 0.00455, columns
    0.00500, best 0.00444; 4 and 2 bpw alike), so `both` stays the default.
    none: no scales. best (handled by quantize_linears): each linear quantized with `both` and with
    `columns`, keeping the one with the lower proxy error.
    All-zero rows or columns (padding) keep scale 1. Powers of two would be exact in fp16; these are
    rounded there with suh/svh, and the error report uses the rounded values."""
    if mode not in SCALE_MODES:
        raise ValueError(f"channel scales must be one of {', '.join(SCALE_MODES)}, got {mode!r}")
    ones_d = torch.ones(w.shape[0], device=w.device)
    if mode == "none":
        return ones_d, torch.ones(w.shape[1], device=w.device)
    c = w.pow(2).mean(0).sqrt()
    c = torch.where(c > 0, c, torch.ones_like(c))
    if mode == "columns":
        return ones_d, c.sqrt()
    d = (w / c[None, :]).pow(2).mean(1).sqrt()
    d = torch.where(d > 0, d, torch.ones_like(d))
    return d, c


@dataclass
class LinearJob:
    """One linear to quantize: weight [n, k] (Hugging Face layout), hessian [k, k] = mean of xᵀx."""
    weight: torch.Tensor
    hessian: torch.Tensor
    bits: int
    seed: int = 0


@dataclass
class _Plan:
    """A linear between its preparation and the end of its LDLQ."""
    job: LinearJob
    w: torch.Tensor  # padded [kp, np]
    su: torch.Tensor
    sv: torch.Tensor
    wr: torch.Tensor  # rotated, channel-scaled
    l: torch.Tensor
    damping: float
    samples: tuple[torch.Tensor, torch.Tensor]  # tiles for the scale search and their weights
    trellis: torch.Tensor  # int16 [kp/16, np/16, 16K], filled strip by strip
    scale: float = 1.0


def _prepare(job: LinearJob, damping: float, scales: str) -> _Plan:
    weight, hessian = job.weight, job.hessian
    n, k = weight.shape
    kp, np_ = round_up(k, 128), round_up(n, 128)
    dev = weight.device
    g = torch.Generator().manual_seed(job.seed)
    w = F.pad(weight.float().T, (0, np_ - n, 0, kp - k))  # [kp, np]
    h = torch.zeros(kp, kp, dtype=torch.float64, device=dev)
    h[:k, :k] = hessian.double()
    if kp > k:  # padded inputs are always zero: any positive diagonal keeps H definite
        h[k:, k:] = torch.eye(kp - k, dtype=torch.float64, device=dev) * torch.diagonal(h[:k, :k]).mean()
    su, sv = _signs(kp, g).to(dev), _signs(np_, g).to(dev)
    d, c = channel_scales(w, scales)
    # w = diag(d)·w̃·diag(c): quantize w̃ against the Hessian of its own input x ⊙ d; d and c fold into
    # suh and svh.
    su, sv = su * d, sv * c
    wr = _had_both(w / su[:, None] / sv[None, :])  # rotated weights: close to i.i.d. Gaussian
    hr = _had_both((h * su.double()[:, None] * su.double()[None, :]))  # Hk·S·H·S·Hk
    samples = _scale_samples(wr, g)
    l, _, used = block_ldl(hr, damping=damping)
    trellis = torch.empty(kp // 16, np_ // 16, 16 * job.bits, dtype=torch.int16, device=dev)
    return _Plan(job, w, su, sv, wr, l, used, samples, trellis)


def _finish(plan: _Plan, wr_hat: torch.Tensor, codebook: str) -> QuantizedLinear:
    n, k = plan.job.weight.shape
    w, scale = plan.w, plan.scale
    suh, svh = plan.su.half(), (plan.sv * scale).half()
    # Report the error in the original space as a reader reconstructs it (fp16 suh/svh), on the real
    # (unpadded) rows and columns: padded output columns soak up part of the rotated error but are
    # thrown away by every reader.
    w_hat = _had_both(wr_hat / scale) * suh.float()[:, None] * svh.float()[None, :]
    return QuantizedLinear(trellis=plan.trellis, suh=suh, svh=svh, bits=plan.job.bits, codebook=codebook,
                           proxy_error=proxy_error(w[:k, :n], w_hat[:k, :n], plan.job.hessian), damping=plan.damping)


def quantize_linears(jobs: Sequence[LinearJob], *, codebook: str = "mul1", damping: float = 0.025,
                     channel_scales: str = "both") -> list[QuantizedLinear]:
    """Quantize several linears (a layer's) at once, each exactly as quantize_linear would alone. Their
    LDLQ strips advance together and every step's tiles of one bit width go through one trellis search:
    a GPU launch then holds thousands of tiles instead of one strip's few dozen (the strips of one
    linear are sequential, so a lone small linear leaves most of the GPU idle)."""
    if channel_scales == "best":  # twice the work: each linear keeps whichever has the lower proxy error
        tries = [quantize_linears(jobs, codebook=codebook, damping=damping, channel_scales=mode)
                 for mode in ("both", "columns")]
        return [min(pair, key=lambda q: q.proxy_error) for pair in zip(*tries)]
    plans = [_prepare(job, damping, channel_scales) for job in jobs]
    for bits in sorted({p.job.bits for p in plans}):
        group = [p for p in plans if p.job.bits == bits]
        scales = _choose_scales([p.samples for p in group], [_rms(p.wr) for p in group], bits, codebook)
        for p, scale in zip(group, scales):
            p.scale = scale
    steps = {i: ldlq_steps(p.wr, p.l) for i, p in enumerate(plans)}
    pending = {i: next(s) for i, s in steps.items()}  # plan -> (strip, target) waiting for its search
    results: dict[int, torch.Tensor] = {}
    while pending:
        for bits in sorted({plans[i].job.bits for i in pending}):
            ids = [i for i in pending if plans[i].job.bits == bits]
            tiles = [_strip_to_tiles(pending[i][1] / plans[i].scale) for i in ids]
            states = trellis_search(torch.cat(tiles), bits, codebook).split([len(t) for t in tiles])
            for i, st in zip(ids, states):
                p, b = plans[i], pending[i][0]
                p.trellis[b] = fmt.pack_states(st, bits)
                try:
                    pending[i] = steps[i].send(_tiles_to_strip(decode_states(st, codebook) * p.scale))
                except StopIteration as done:
                    results[i] = done.value
                    del pending[i]
    return [_finish(p, results[i], codebook) for i, p in enumerate(plans)]


def quantize_linear(weight: torch.Tensor, hessian: torch.Tensor, bits: int, *, codebook: str = "mul1",
                    seed: int = 0, damping: float = 0.025, channel_scales: str = "both") -> QuantizedLinear:
    """weight [n, k] (Hugging Face layout), hessian [k, k] = mean of xᵀx over calibration rows."""
    return quantize_linears([LinearJob(weight, hessian, bits, seed)], codebook=codebook, damping=damping,
                            channel_scales=channel_scales)[0]
