"""Sampling: filters keep exactly the right tokens; sampled frequencies follow the distribution."""

from __future__ import annotations

import pytest
import torch

from trellm.engine.sampling import SamplingParams, filter_logits, sample
from trellm.errors import GenerationError

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])


def test_greedy_is_argmax():
    assert sample(LOGITS, SamplingParams(), None).tolist() == [0]
    assert sample(LOGITS, SamplingParams(temperature=5.0, top_k=1), None).tolist() == [0]


def test_top_k_keeps_k_best():
    kept = torch.isfinite(filter_logits(LOGITS, SamplingParams(temperature=1.0, top_k=3)))
    assert kept.tolist() == [[True, True, True, False, False, False]]


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = LOGITS.softmax(-1)[0]
    for p in (0.3, 0.6, 0.8, 0.95, 0.999):
        kept = torch.isfinite(filter_logits(LOGITS, SamplingParams(temperature=1.0, top_p=p)))[0]
        n = int(kept.sum())
        assert kept[:n].all() and not kept[n:].any()
        assert probs[:n].sum() >= p - 1e-6 and (n == 1 or probs[: n - 1].sum() < p)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, seed=1),
    SamplingParams(temperature=0.5, seed=2),
    SamplingParams(temperature=1.3, top_k=4, seed=3),
    SamplingParams(temperature=1.0, top_p=0.8, seed=4),
])
def test_sampled_frequencies_match_the_filtered_distribution(params):
    n = 40000
    gen = torch.Generator().manual_seed(params.seed)
    logits = LOGITS.expand(n, -1)
    counts = torch.bincount(sample(logits, params, gen), minlength=LOGITS.shape[1]).float() / n
    expected = filter_logits(LOGITS, params).softmax(-1)[0]
    assert (counts - expected).abs().max() < 0.01, (counts, expected)
    assert (counts[expected == 0] == 0).all()


def test_seeded_sampling_repeats():
    p = SamplingParams(temperature=1.0, seed=7)
    a = sample(LOGITS.expand(50, -1), p, torch.Generator().manual_seed(7))
    b = sample(LOGITS.expand(50, -1), p, torch.Generator().manual_seed(7))
    assert a.tolist() == b.tolist()


@pytest.mark.parametrize("kw", [{"temperature": -1}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5},
                                {"temperature": float("nan")}])
def test_invalid_parameters(kw):
    with pytest.raises(GenerationError):
        SamplingParams(**kw)
