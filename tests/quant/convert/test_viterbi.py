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
