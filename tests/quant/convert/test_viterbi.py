"""The Viterbi trellis search: optimal on short sequences, closed rings, and the Gaussian targets."""

from __future__ import annotations

import pytest
import torch

from trellm.quant import exl3_format as fmt
from trellm.quant.convert.viterbi import _search, decode_states, viterbi_ref


def test_free_ends_equal_brute_force():
    """16-bit states, K = 1, 8 steps: every path (65536 start states × 2^7 bit choices) checked."""
    values = fmt.codebook_lut("mul1").float()
    targets = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    bits = torch.arange(128)
    for row in targets:
        states = torch.arange(65536)[:, None].expand(65536, 128)
        cost = (row[0] - values[states]) ** 2
        for p in range(1, 8):
            states = ((states << 1) | ((bits >> (7 - p)) & 1)[None, :]) & 0xFFFF
            cost = cost + (row[p] - values[states]) ** 2
        found = _search(row[None], values, 1, None)[0]
        assert torch.isclose(((row - values[found]) ** 2).sum(), cost.min())
        # and the path is a trellis path: each state is its predecessor shifted by one bit
        assert torch.equal(found[1:] >> 1, found[:-1] & 0x7FFF)


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_tail_biting_closes_the_ring(bits):
    """The first states continue the last ones, so the stored stream reproduces every state."""
    targets = torch.randn(3, 256, generator=torch.Generator().manual_seed(bits))
    states = viterbi_ref(targets, bits, "3inst")
    mask = (1 << (16 - bits)) - 1
    assert torch.equal(states >> bits, torch.roll(states, 1, dims=1) & mask)
    assert torch.equal(fmt.unpack_states(fmt.pack_states(states, bits)), states)


@pytest.mark.slow
@pytest.mark.parametrize("bits, limit", [(2, 0.070), (3, 0.0195), (4, 0.0052)])
def test_gaussian_mse(bits, limit):
    """Unit-normal tiles through the mul1 codebook at the best of a few global scales (QUANTIZER.md)."""
    x = torch.randn(24, 256, generator=torch.Generator().manual_seed(100 + bits))
    best = min(((x - s * decode_states(viterbi_ref(x / s, bits, "mul1"), "mul1")) ** 2).mean().item()
               for s in (0.95, 1.0, 1.05, 1.1))
    assert best <= limit, best


KERNEL_SCRIPT = """
import torch
from trellm.kernels.viterbi import viterbi
from trellm.quant.convert.viterbi import viterbi_ref
g = torch.Generator().manual_seed(0)
fails = []
for bits, cb, length, ring in [(2, "mul1", 64, True), (4, "3inst", 40, True), (1, "mcg", 32, False), (8, "mul1", 24, True)]:
    x = torch.randn(2, length, generator=g)
    if not torch.equal(viterbi(x, bits, cb, tail_biting=ring), viterbi_ref(x, bits, cb, tail_biting=ring)):
        fails.append((bits, cb, length, ring))
print("FAILS", fails)
"""


def test_triton_kernel_interpreted_equals_reference():
    """The Triton search (TRITON_INTERPRET=1, short sequences) finds exactly the reference's states:
    free and ring paths, K = 1, 2, 4, 8, all three codebooks."""
    from tests.conftest import run_interpreted

    pytest.importorskip("triton")
    out = run_interpreted(KERNEL_SCRIPT)
    assert "FAILS []" in out, out[-2000:]


@pytest.mark.gpu
@pytest.mark.parametrize("bits, codebook", [(1, "mul1"), (2, "mul1"), (3, "mcg"), (4, "3inst"), (6, "mul1"), (8, "mcg")])
def test_triton_kernel_on_gpu_matches_reference(bits, codebook):
    """Full 256-step rings on the GPU: closed rings, and the same path cost as the reference (the GPU may
    fuse the error's multiply-add, so exact near-ties can go either way)."""
    from trellm.kernels.viterbi import viterbi

    x = torch.randn(300, 256, generator=torch.Generator().manual_seed(bits)).cuda()
    got, want = viterbi(x, bits, codebook), viterbi_ref(x, bits, codebook)
    assert torch.equal(got[:, 1:] >> bits, got[:, :-1] & ((1 << (16 - bits)) - 1))
    assert torch.equal(got[:, 0] >> bits, got[:, -1] & ((1 << (16 - bits)) - 1))  # the ring closes
    cost = lambda s: ((decode_states(s, codebook) - x) ** 2).sum(1)  # noqa: E731
    rel = (cost(got) - cost(want)).abs() / cost(want)
    assert rel.mean() < 1e-3 and rel.max() < 0.05
    assert (got == want).all(dim=1).float().mean() > 0.9
