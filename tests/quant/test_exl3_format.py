"""The EXL3 reference decoder against the golden vectors of the reference implementation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from trellm.quant import exl3_format as fmt

GOLDEN = Path(__file__).resolve().parents[3] / "shared" / "golden" / "exl3_linear_golden.safetensors"
CASES = [(k, cb) for k in ("1", "2", "3", "4", "5", "6", "8") for cb in fmt.CODEBOOKS] + [("2.5", "mul1")]


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN.exists():
        pytest.skip(f"golden vectors not found at {GOLDEN}")
    with safe_open(str(GOLDEN), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("bits, codebook", CASES)
def test_decoded_bit_for_bit(golden, bits, codebook):
    key = f"k{bits}_{codebook}"
    q = fmt.decode_trellis(golden[f"{key}_trellis"], codebook)
    assert torch.equal(q.view(torch.int16), golden[f"{key}_decoded"].view(torch.int16))


@pytest.mark.parametrize("bits, codebook", CASES)
def test_weight_and_output_within_fp16_tolerance(golden, bits, codebook):
    key = f"k{bits}_{codebook}"
    args = golden[f"{key}_trellis"], golden[f"{key}_suh"], golden[f"{key}_svh"], codebook
    w, w_ref = fmt.exl3_weight(*args), golden[f"{key}_weight"].float()
    assert (w - w_ref).abs().max() <= 1.5e-3 * w_ref.abs().max()
    y, y_ref = fmt.exl3_linear_ref(golden[f"{key}_x"], *args), golden[f"{key}_y"].float()
    assert (y - y_ref).abs().max() <= 5e-3 * y_ref.abs().max()


# RMS over all 65536 states: mul1 is scaled to 1 (the golden K=4 tiles: 1.0008); mcg and 3inst ~1.244.
@pytest.mark.parametrize("codebook, rms", [("mul1", 1.0003), ("mcg", 1.2441), ("3inst", 1.2437)])
def test_codebooks_over_all_states(codebook, rms):
    lut = fmt.codebook_lut(codebook).float()
    assert lut.shape == (65536,) and torch.isfinite(lut).all()
    assert abs(lut.mean()) < 0.05
    assert lut.pow(2).mean().sqrt().item() == pytest.approx(rms, abs=2e-4)


def test_mul1_lut_formula_spot_checks():
    # value = fma(fp16(1024 + bytesum(s * 0x83DCD12D)), C1, C2): check a few states by hand in float64.
    c1, c2 = float(fmt._fp16(fmt.MUL1_C1_BITS)), float(fmt._fp16(fmt.MUL1_C2_BITS))
    lut = fmt.codebook_lut("mul1")
    for s in (0, 1, 255, 4660, 65535):
        x = (s * fmt.MUL1_MULT) & 0xFFFFFFFF
        b = sum((x >> (8 * i)) & 0xFF for i in range(4))
        assert float(lut[s]) == pytest.approx((1024 + b) * c1 + c2, abs=5e-3)


def test_tile_order_is_a_permutation():
    row, col = fmt.tile_order()
    assert len(set(zip(row.tolist(), col.tolist()))) == 256


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    trellis = torch.randint(-(1 << 15), 1 << 15, (3, 2, 16 * bits), dtype=torch.int16, generator=g)
    states = fmt.unpack_states(trellis)
    # Consecutive states overlap in 16 - K bits (the trellis property), including across the wrap.
    prev = torch.roll(states, 1, dims=-1) & ((1 << (16 - bits)) - 1)
    assert torch.equal(states >> bits, prev)
    assert torch.equal(fmt.pack_states(states, bits), trellis)


def test_legacy_sign_bits():
    words = torch.tensor([0b101, -1], dtype=torch.int16)  # bits 0 and 2 set; then all set
    signs = fmt.signs_from_bits(words, 20)
    assert signs[:4].tolist() == [-1.0, 1.0, -1.0, 1.0] and (signs[16:] == -1).all()


def test_hadamard_is_orthonormal_and_blockwise():
    h = fmt.hadamard_matrix(128, torch.float64)
    torch.testing.assert_close(h @ h, torch.eye(128, dtype=torch.float64))
    x = torch.randn(3, 256, dtype=torch.float64)
    y = fmt.had128(x)
    torch.testing.assert_close(y[:, :128], x[:, :128] @ h)
    torch.testing.assert_close(fmt.had128(y), x)
