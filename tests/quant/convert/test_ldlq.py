"""Block LDL / LDLQ against a literal implementation, and one whole linear through the quantizer."""

from __future__ import annotations

import pytest
import torch

from trellm.quant.convert.ldlq import block_ldl, hessian_energy, ldlq, ldlq_direct, proxy_error
from trellm.quant.convert.quantize import quantize_linear
from trellm.quant.exl3 import EXL3Linear


def _hessian(k: int, rows: int = 400, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) @ torch.randn(k, k, generator=g) * torch.linspace(0.1, 2, k)
    return x.T @ x / rows


def test_block_ldl_reconstructs_the_damped_hessian():
    h = _hessian(64)
    l, d, used = block_ldl(h)
    damped = h.double() + used * torch.diagonal(h.double()).mean() * torch.eye(64, dtype=torch.float64)
    torch.testing.assert_close(l @ torch.block_diag(*d) @ l.T, damped)
    blocks = l.view(4, 16, 4, 16)
    for b in range(4):
        torch.testing.assert_close(blocks[b, :, b], torch.eye(16, dtype=torch.float64))  # unit diagonal blocks
        assert (blocks[b, :, b + 1 :] == 0).all()  # block lower triangular


def test_ldlq_equals_the_literal_algorithm_and_beats_rounding():
    h = _hessian(80)
    w = torch.randn(80, 33, generator=torch.Generator().manual_seed(1))
    l, _, used = block_ldl(h)
    quantize = lambda b, t: torch.round(t * 3) / 3  # noqa: E731  (any strip quantizer will do)
    fast, slow = ldlq(w, l, quantize), ldlq_direct(w, h, quantize, used)
    torch.testing.assert_close(fast, slow)
    assert proxy_error(w, fast, h) < 0.8 * proxy_error(w, torch.round(w * 3) / 3, h)


def test_hessian_energy_is_the_trace_without_the_n_by_n_product():
    h = _hessian(48).double()
    m = torch.randn(48, 70, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert hessian_energy(m, h) == pytest.approx(float(torch.trace(m.T @ h @ m)), rel=1e-12)


def test_singular_hessian_is_damped_and_zero_hessian_refused():
    x = torch.randn(10, 32)  # rank 10 < 32
    block_ldl(x.T @ x)
    with pytest.raises(ValueError, match="degenerate"):
        block_ldl(torch.zeros(32, 32))


@pytest.mark.slow
def test_quantize_linear_round_trip_and_error_falls_with_bits():
    k, n = 128, 130  # n pads to 256
    h = _hessian(k, seed=2)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3)) * 0.02
    errors, first = [], None
    for bits in (2, 4):
        q = quantize_linear(w, h, bits, seed=5)
        first = first or q
        lin = EXL3Linear(k, n, False)
        lin.set_tensors(q.trellis, suh=q.suh, svh=q.svh, codebook=q.codebook)
        dense = lin.dense_weight()  # what a reader reconstructs from the stored tensors
        measured = proxy_error(w.T, dense.T, h)
        assert measured == pytest.approx(q.proxy_error, rel=0.05, abs=1e-4)  # reported = stored reality
        errors.append(measured)
    assert errors[1] < errors[0] / 8 and errors[0] < 0.08
    assert torch.equal(quantize_linear(w, h, 2, seed=5).trellis, first.trellis)  # deterministic for a seed


def test_channel_scales_equalise_rows_and_columns_and_keep_padding_at_one():
    from trellm.quant.convert.quantize import channel_scales

    g = torch.Generator().manual_seed(4)
    w = torch.randn(96, 64, generator=g) * torch.linspace(0.1, 5, 64)[None, :] * torch.linspace(3, 0.2, 96)[:, None]
    w[:, -5:] = 0  # padded output columns
    w[-7:, :] = 0  # padded input rows
    d, c = channel_scales(w)
    assert (c[-5:] == 1).all() and (d[-7:] == 1).all()
    wt = w / d[:, None] / c[None, :]
    spread = lambda r: float(r.max() / r.min())  # noqa: E731
    for dim in (0, 1):  # row and column RMS: a 5-50-fold spread before, sampling noise after
        assert spread(w[:-7, :-5].pow(2).mean(dim).sqrt()) > 5
        assert spread(wt[:-7, :-5].pow(2).mean(dim).sqrt()) < 1.6
    torch.testing.assert_close(wt * d[:, None] * c[None, :], w)
    # columns: no row scales, each column by the square root of its RMS (padding still 1); none: all 1.
    d, c = channel_scales(w, "columns")
    assert (d == 1).all() and (c[-5:] == 1).all()
    torch.testing.assert_close(c[:-5], w[:, :-5].pow(2).mean(0).sqrt().sqrt())
    d, c = channel_scales(w, "none")
    assert (d == 1).all() and (c == 1).all()
    with pytest.raises(ValueError, match="channel scales must be one of"):
        channel_scales(w, "rows")


@pytest.mark.slow
def test_channel_scales_lower_the_error_of_uneven_weights():
    k, n = 128, 128
    g = torch.Generator().manual_seed(6)
    h = _hessian(k, seed=7)
    rows, cols = torch.rand(n, 1, generator=g) * 3 + 0.2, torch.rand(1, k, generator=g) * 2 + 0.3  # uneven norms
    w = torch.randn(n, k, generator=g) * rows * cols
    plain = quantize_linear(w, h, 2, seed=1, channel_scales="none").proxy_error
    scaled = quantize_linear(w, h, 2, seed=1).proxy_error
    columns = quantize_linear(w, h, 2, seed=1, channel_scales="columns").proxy_error
    assert scaled < 0.95 * plain and columns < 0.95 * plain, (scaled, columns, plain)


def test_best_channel_scales_keep_the_lower_error_of_each_linear():
    """'best' quantizes every linear with both kinds of scales and keeps, per linear, the result with the
    lower proxy error: exactly that result, trellis and all."""
    from trellm.quant.convert.quantize import LinearJob, quantize_linears

    g = torch.Generator().manual_seed(8)
    jobs = []
    for n, k, spread in [(128, 128, 6.0), (128, 128, 1.0)]:  # uneven columns, then even ones
        w = torch.randn(n, k, generator=g) * torch.linspace(1, spread, n)[:, None]
        jobs.append(LinearJob(w, _hessian(k, seed=n + int(spread)), 2, seed=3))
    tries = {mode: quantize_linears(jobs, channel_scales=mode) for mode in ("both", "columns", "best")}
    chosen = set()
    for i, best in enumerate(tries["best"]):
        pick = min((tries["both"][i], tries["columns"][i]), key=lambda q: q.proxy_error)
        chosen.add("both" if pick is tries["both"][i] else "columns")
        assert best.proxy_error == pick.proxy_error and torch.equal(best.trellis, pick.trellis)
        assert torch.equal(best.svh, pick.svh)
    assert chosen == {"both", "columns"}  # these two linears go different ways: both branches are taken


def test_quantize_linears_together_equals_one_by_one():
    """A layer's linears quantized together (shared trellis searches, mixed bit widths and sizes) give
    exactly what each gives alone."""
    from trellm.quant.convert.quantize import LinearJob, quantize_linears

    g = torch.Generator().manual_seed(11)
    jobs = []
    for n, k, bits in [(200, 136, 2), (128, 256, 3), (96, 128, 2)]:
        w = torch.randn(n, k, generator=g)
        x = torch.randn(300, k, generator=g)
        jobs.append(LinearJob(w, x.T @ x / 300, bits, seed=n))
    together = quantize_linears(jobs)
    for job, q in zip(jobs, together):
        alone = quantize_linear(job.weight, job.hessian, job.bits, seed=job.seed)
        assert torch.equal(q.trellis, alone.trellis)
        assert torch.equal(q.svh, alone.svh) and torch.equal(q.suh, alone.suh)
        assert q.proxy_error == alone.proxy_error


def test_global_scale_search_sees_the_extremes():
    """Rotated weights with a few extreme values (as real layers have): the chosen global scale's trellis
    error over the whole matrix is within 5 % of the best candidate's (every tile searched), at a high and a
    low bit width. Choosing on a handful of random tiles misses the extremes and scales too tight at K = 6."""
    from trellm.quant.convert import quantize as Q
    from trellm.quant.convert.viterbi import decode_states, trellis_search

    g = torch.Generator().manual_seed(3)
    wr = torch.randn(128, 128, generator=g)
    wr[3:13:3, 5:45:10] = 6.0 * torch.sign(torch.randn(4, 4, generator=g))  # 16 extremes in 3 of the 64 tiles
    rms = float(wr.pow(2).mean().sqrt())
    tiles = torch.cat([Q._strip_to_tiles(wr[16 * i : 16 * i + 16]) for i in range(8)])
    for bits in (6, 2):
        errors = {}
        for f in Q.SCALE_CANDIDATES:
            q = decode_states(trellis_search(tiles / (rms * f), bits, "mul1", tail_biting=False), "mul1") * rms * f
            errors[f] = float((tiles - q).pow(2).sum())
        chosen = Q.choose_scale(wr, bits, "mul1", torch.Generator().manual_seed(0)) / rms
        best = min(errors.values())
        assert errors[min(errors, key=lambda f: abs(f - chosen))] <= 1.05 * best, (bits, chosen, errors)
    assert chosen < 1.3  # K = 2 (the last one) stays near the RMS: the extremes do not dominate there
