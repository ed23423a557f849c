"""Measured bit allocation: the noise probe, the per-linear sensitivities, and the allocation that uses them."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from trellm.errors import ConfigError
from trellm.quant.convert.bits import TRELLIS_MSE, LinearSlot, allocate_measured, average_bits, bit_range
from trellm.quant.convert.sensitivity import NOISE, linear_sensitivities, probe_noise


def _slots(sizes):
    return [LinearSlot(f"model.layers.{i}.mlp.up_proj", i, w) for i, w in enumerate(sizes)]


def _damage(slots, sens, bits):
    return sum(sens[s.name] * TRELLIS_MSE[bits[s.name]] for s in slots)


def test_bit_range():
    assert bit_range(6.0) == (5, 8) and bit_range(4.5) == (3, 7) and bit_range(2.0) == (2, 4)
    assert bit_range(1.5) == (1, 4) and bit_range(7.5) == (6, 8) and bit_range(8.0) == (7, 8)


def test_equal_sensitivities_give_the_uniform_width():
    slots = _slots([128 * 128] * 6)
    sens = {s.name: 1e-3 for s in slots}
    assert set(allocate_measured(slots, 6.0, sens).values()) == {6}
    assert set(allocate_measured(slots, 3.0, sens).values()) == {3}


def test_sensitive_linears_get_more_bits_and_the_budget_holds():
    slots = _slots([128 * 128] * 6)
    sens = {s.name: v for s, v in zip(slots, (1e-5, 1e-3, 1e-3, 1e-3, 1e-3, 1.0))}
    bits = allocate_measured(slots, 6.0, sens)
    assert bits[slots[5].name] == 8 and bits[slots[0].name] == 5
    assert average_bits(slots, bits) == 6.0  # equal sizes: the budget is spent exactly
    assert _damage(slots, sens, bits) < 0.2 * _damage(slots, sens, {s.name: 6 for s in slots})


@pytest.mark.parametrize("bpw", [2.0, 3.25, 4.0, 5.5, 6.0])
def test_equal_sizes_match_brute_force(bpw):
    """With equal sizes, buying the best upgrade per bit is optimal: compare with every assignment."""
    slots = _slots([1] * 5)
    g = torch.Generator().manual_seed(int(bpw * 4))
    sens = {s.name: float(10 ** (4 * torch.rand(1, generator=g))) for s in slots}
    lo, hi = bit_range(bpw)
    best = min(_damage(slots, sens, dict(zip(sens, ks)))
               for ks in itertools.product(range(lo, hi + 1), repeat=len(slots)) if sum(ks) <= bpw * len(slots))
    bits = allocate_measured(slots, bpw, sens)
    assert average_bits(slots, bits) <= bpw
    assert _damage(slots, sens, bits) == pytest.approx(best, rel=1e-12)


def test_unequal_sizes_stay_within_budget_and_near_it():
    sizes = [128 * 128, 128 * 384, 384 * 128, 128 * 1024, 1024 * 128] * 4
    slots = _slots(sizes)
    g = torch.Generator().manual_seed(3)
    sens = {s.name: float(torch.rand(1, generator=g)) * s.weights for s in slots}
    for bpw in (2.5, 4.0, 4.75, 6.0):
        avg = average_bits(slots, allocate_measured(slots, bpw, sens))
        assert bpw - min(sizes) / sum(sizes) <= avg <= bpw


def test_zero_sensitivity_and_missing_ones():
    slots = _slots([16] * 3)
    bits = allocate_measured(slots, 4.0, {s.name: 0.0 for s in slots})  # nothing measurable: still valid
    assert average_bits(slots, bits) <= 4.0 and min(bits.values()) >= 3
    with pytest.raises(ConfigError, match="no measured sensitivity for model.layers.2.mlp.up_proj"):
        allocate_measured(slots, 4.0, {slots[0].name: 1.0, slots[1].name: 1.0})
    with pytest.raises(ConfigError, match="between 1 and 8"):
        allocate_measured(slots, 9.0, {s.name: 1.0 for s in slots})


def test_probe_noise_is_iid_in_the_channel_scaled_weights():
    g = torch.Generator().manual_seed(0)
    col = torch.tensor([0.25, 1.0, 4.0, 1.0]).repeat_interleave(64)  # output channels of different size
    w = torch.randn(256, 192, generator=g) * col[:, None]  # [n, k] (Hugging Face layout)
    e = probe_noise(w, "both", torch.Generator().manual_seed(1))
    assert e.shape == w.shape and e.dtype == torch.float32
    rms = e.pow(2).mean(1).sqrt()  # per output channel: proportional to that channel's size
    for lo, hi, size in ((0, 64, 0.25), (128, 192, 4.0)):
        assert float(rms[lo:hi].mean() / rms[64:128].mean()) == pytest.approx(size, rel=0.1)
    # relative to the weights, NOISE everywhere (w's rows have equal RMS after the column scaling)
    assert float(e.pow(2).mean(1).sqrt().div(w.pow(2).mean(1).sqrt()).mean()) == pytest.approx(NOISE, rel=0.05)
    plain = probe_noise(w, "none", torch.Generator().manual_seed(1))
    assert float(plain.pow(2).mean().sqrt() / w.pow(2).mean().sqrt()) == pytest.approx(NOISE, rel=0.02)


def _tiny_model(tmp_path, layers=2, dtype="float32"):
    from conftest import write_tiny_llama
    from trellm.models.loader import load_model

    if not (tmp_path / "src" / "config.json").exists():
        write_tiny_llama(tmp_path / "src", layers, weight_scale=1.0)
    return tmp_path / "src", load_model(tmp_path / "src", device="cpu", dtype=dtype, fuse=False)


def test_sensitivities_of_a_tiny_model(tmp_path):
    from trellm.quant.convert.job import ConvertArgs, _layer_linears, _sensitivities

    src, model = _tiny_model(tmp_path)
    names = [lin.name for layer in model.layers for lin in _layer_linears(layer)]
    before = {lin.name: lin.impl.weight.clone() for layer in model.layers for lin in _layer_linears(layer)}
    ids = torch.randint(0, 320, (5, 40), generator=torch.Generator().manual_seed(2))
    args = ConvertArgs(str(src), str(tmp_path / "o"), str(tmp_path / "w"), 4.0)
    sens = _sensitivities(model, ids, args, batch=2)
    assert list(sens) == names and all(v > 0 for v in sens.values())
    for layer in model.layers:  # every weight restored exactly
        for lin in _layer_linears(layer):
            assert torch.equal(lin.impl.weight, before[lin.name])
    assert _sensitivities(model, ids, args, batch=3) == pytest.approx(sens, rel=1e-4)  # seeded; batching aside
    # The KL-divergence is quadratic in small errors: twice the noise costs about four times as much.
    layers = [_layer_linears(layer) for layer in model.layers]
    states = model.embed(ids[:4], dtype=torch.float32)

    def run_layer(i, h):
        from trellm.quant.convert.job import _layer_forward
        return _layer_forward(model, i, h, 4)[0]

    def logprobs(h):
        return torch.log_softmax(model.lm_head(model.norm(h)), -1)

    small = linear_sensitivities(layers, states, run_layer, logprobs, noise=0.01)
    large = linear_sensitivities(layers, states, run_layer, logprobs, noise=0.02)
    ratios = torch.tensor([large[n] / small[n] for n in names])
    assert float(ratios.min()) > 3.5 and float(ratios.max()) < 4.5


def test_the_probe_leaves_a_16_bit_model_as_it_was(tmp_path):
    """On a GPU the converter holds the model in bf16 and the probe turns each layer to float32 for its
    passes and back: every tensor of the model keeps its dtype and value (the layers it quantizes later
    must be the checkpoint's)."""
    from trellm.quant.convert.job import ConvertArgs, _sensitivities

    src, model = _tiny_model(tmp_path, dtype="bfloat16")
    before = {n: t.clone() for n, t in [*model.named_parameters(), *model.named_buffers()] if t is not None}
    assert any(t.dtype == torch.bfloat16 for t in before.values())
    ids = torch.randint(0, 320, (5, 40), generator=torch.Generator().manual_seed(2))
    sens = _sensitivities(model, ids, ConvertArgs(str(src), str(tmp_path / "o"), str(tmp_path / "w"), 4.0), batch=4)
    assert len(sens) == 14 and all(v > 0 for v in sens.values())
    after = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()] if t is not None}
    assert after.keys() == before.keys()
    for name, t in before.items():
        assert after[name].dtype == t.dtype and torch.equal(after[name], t), name


@pytest.mark.parametrize("kind", ["gemma3_softcap", "gemma3", "qwen2", "llama_tied_bias", "mistral"])
def test_the_probe_passes_reproduce_the_model(tiny_model_dir, kind):
    """The probe's layer-by-layer float32 passes give the model's own next-token distribution (embedding
    scale, sliding windows, norms, tied or separate head, soft-capping), and without noise every
    sensitivity is exactly zero."""
    from trellm.cache.contiguous import ContiguousKVCache
    from trellm.models.loader import load_model
    from trellm.quant.convert.job import _layer_linears, _probe_passes

    path, _ = tiny_model_dir(kind)
    model = load_model(path, device="cpu", dtype="float32", fuse=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(5))
    run_layer, logprobs = _probe_passes(model, batch=2)
    h = model.embed(ids, dtype=torch.float32)
    for i in range(len(model.layers)):
        h = run_layer(i, h)
    cache = ContiguousKVCache(model.config, batch_size=2, max_len=20, device="cpu", dtype=torch.float32)
    expected = torch.log_softmax(model(ids, torch.arange(20).expand(2, -1), cache.step(20), max_seq_len=20), -1)
    torch.testing.assert_close(logprobs(h), expected, rtol=1e-4, atol=1e-4)
    layers = [_layer_linears(layer) for layer in model.layers]
    zero = linear_sensitivities(layers, model.embed(ids, dtype=torch.float32), run_layer, logprobs, noise=0.0)
    assert len(zero) == 7 * len(layers) and set(zero.values()) == {0.0}
