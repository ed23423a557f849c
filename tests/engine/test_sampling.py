"""Sampling: filters keep exactly the right tokens; sampled frequencies follow the distribution."""

from __future__ import annotations

import pytest
import torch

from trellm.engine.sampling import SamplingParams, filter_logits, process_logits, sample, sample_batch
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
    SamplingParams(temperature=1.5, min_p=0.2, seed=5),
    SamplingParams(temperature=1.0, typical_p=0.7, seed=6),
    SamplingParams(temperature=2.0, top_k=5, top_p=0.9, min_p=0.05, seed=8),
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
                                {"temperature": float("nan")}, {"min_p": 1.5}, {"typical_p": 0},
                                {"repetition_penalty": 0}, {"presence_penalty": 3}, {"frequency_penalty": -2.5},
                                {"xtc_probability": 2}, {"logit_bias": {3: 101.0}}, {"dry_multiplier": -1},
                                {"dry_base": 0.5}, {"dry_allowed_length": 0}, {"dry_range": -1}])
def test_invalid_parameters(kw):
    with pytest.raises(GenerationError):
        SamplingParams(**kw)


def test_min_p_keeps_tokens_above_a_fraction_of_the_best():
    probs = LOGITS.softmax(-1)[0]
    for m in (0.1, 0.3, 0.7):
        kept = torch.isfinite(filter_logits(LOGITS, SamplingParams(temperature=1.0, min_p=m)))[0]
        assert kept.tolist() == (probs >= m * probs.max()).tolist()


def test_typical_p_keeps_the_tokens_closest_to_the_entropy():
    logits = torch.tensor([[3.0, 2.9, 1.0, 0.0, -2.0]])
    probs = logits.softmax(-1)[0]
    entropy = -(probs * probs.log()).sum()
    gap = (-probs.log() - entropy).abs()
    order = gap.argsort()
    for mass in (0.2, 0.5, 0.9):
        kept = torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, typical_p=mass)))[0]
        n = int(kept.sum())
        assert set(order[:n].tolist()) == set(kept.nonzero().flatten().tolist())
        assert probs[order[:n]].sum() >= mass - 1e-6 and (n == 1 or probs[order[: n - 1]].sum() < mass)


def test_xtc_drops_the_top_choices_but_the_least_likely_of_them():
    logits = torch.tensor([[2.0, 1.9, 1.8, -3.0, -4.0]])  # three tokens above 0.1
    gen = torch.Generator().manual_seed(0)
    always = SamplingParams(temperature=1.0, xtc_threshold=0.1, xtc_probability=1.0)
    kept = torch.isfinite(filter_logits(logits, [always], [gen]))[0]
    assert kept.tolist() == [False, False, True, True, True]
    never = SamplingParams(temperature=1.0, xtc_threshold=0.5, xtc_probability=1.0)  # one token above: no-op
    assert torch.isfinite(filter_logits(logits, [never], [gen])).all()


def test_penalties_bias_and_bans():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, 0.0]])
    rep = process_logits(logits, [SamplingParams(repetition_penalty=2.0)], contexts=[[0, 1, 1]])
    assert rep.tolist() == [[1.0, -2.0, 0.5, 1.0, 0.0]]  # positive divided, negative multiplied
    pf = process_logits(logits, [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)],
                        completions=[[3, 3, 2]])
    assert pf.tolist() == [[2.0, -1.0, 0.5 - 0.75, 1.0 - 1.0, 0.0]]
    biased = process_logits(logits, [SamplingParams(logit_bias={4: 5.0, 0: -1.0}, banned_tokens=[3])])
    assert biased.tolist() == [[1.0, -1.0, 0.5, float("-inf"), 5.0]]
    assert sample(logits, SamplingParams(logit_bias={4: 5.0}), None).tolist() == [4]  # greedy sees the bias
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        process_logits(logits, [SamplingParams(banned_tokens=[9])])


def test_a_batch_with_different_parameters_per_row_equals_each_row_alone():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    params = [SamplingParams(), SamplingParams(temperature=0.9, top_k=10, seed=1),
              SamplingParams(temperature=1.2, top_p=0.7, repetition_penalty=1.3, seed=2),
              SamplingParams(temperature=1.0, min_p=0.1, presence_penalty=1.0, xtc_probability=0.5, seed=3)]
    contexts = [[1, 2], [3], [4, 4, 5], [6, 7, 7, 7]]
    completions = [[2], [], [5], [7, 7]]
    gens = lambda: [None] + [torch.Generator().manual_seed(p.seed) for p in params[1:]]  # noqa: E731
    g1, g2 = gens(), gens()
    together = [sample_batch(logits, params, g1, contexts, completions).tolist() for _ in range(20)]
    alone = [[sample_batch(logits[i : i + 1], [params[i]], [g2[i]], [contexts[i]], [completions[i]]).item()
              for i in range(4)] for _ in range(20)]
    assert together == alone
    assert len({tuple(row) for row in together}) > 1  # the seeded rows really sample


def _dry_naive(context, p):
    """The definition, quadratically: for every earlier position, how long the sequence's end
    matches what preceded it there (stopping at breakers)."""
    seq = list(context[-p.dry_range:] if p.dry_range else context)
    best = {}
    for i in range(1, len(seq)):
        k = 0
        while k < i and seq[i - 1 - k] == seq[len(seq) - 1 - k] and seq[i - 1 - k] not in p.dry_breakers \
                and seq[len(seq) - 1 - k] not in p.dry_breakers:
            k += 1
        t = seq[i]
        if k >= p.dry_allowed_length and t not in p.dry_breakers and k > best.get(t, 0):
            best[t] = k
    return {t: p.dry_multiplier * p.dry_base ** (k - p.dry_allowed_length) for t, k in best.items()}


def test_dry_penalises_tokens_that_continue_a_repeat():
    from trellm.engine.sampling import dry_penalties

    p = SamplingParams(dry_multiplier=0.8, dry_base=2.0, dry_allowed_length=2)
    context = [1, 5, 6, 7, 9, 2, 5, 6, 7]  # "5 6 7" was followed by 9
    assert dry_penalties(context, p) == pytest.approx({9: 0.8 * 2.0 ** (3 - 2)})
    assert dry_penalties(context, SamplingParams(dry_multiplier=0.8, dry_allowed_length=4)) == {}
    assert dry_penalties(context, SamplingParams(dry_multiplier=0.8, dry_breakers=[6])) == {}  # the run crosses 6
    assert dry_penalties([3, 3, 3, 3], p) == pytest.approx({3: 0.8 * 2.0 ** (3 - 2)})  # self-overlapping runs
    logits = torch.zeros(1, 12)
    out = process_logits(logits, [p], contexts=[context])
    assert out[0, 9] == pytest.approx(-1.6) and (out[0, :9] == 0).all()
    rng = torch.Generator().manual_seed(0)
    for _ in range(200):  # the O(n) algorithm equals the definition on random repetitive sequences
        draw = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=rng))  # noqa: E731
        seq = [draw(0, 4) for _ in range(draw(1, 40))]
        q = SamplingParams(dry_multiplier=1.0, dry_base=1.5, dry_allowed_length=draw(1, 4),
                           dry_breakers=[3] if seq[0] % 2 else [], dry_range=draw(0, 30))
        assert dry_penalties(seq, q) == pytest.approx(_dry_naive(seq, q)), (seq, q)


def test_a_seeded_row_samples_the_same_whatever_runs_beside_it_and_in_any_order():
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(3)) * 2
    p = SamplingParams(temperature=1.0, seed=11)

    def run(seeds, steps=30):  # tokens of each seed's row over `steps` batched draws
        gens = {s: torch.Generator().manual_seed(s) for s in seeds}
        out = {s: [] for s in seeds}
        for _ in range(steps):
            tokens = sample_batch(logits.expand(len(seeds), -1), [p] * len(seeds), [gens[s] for s in seeds])
            for s, t in zip(seeds, tokens.tolist()):
                out[s].append(t)
        return out

    alone, crowd = run([11]), run([5, 11, 7, 2])
    assert alone[11] == crowd[11] == run([2, 7, 11])[11]
    assert len({tuple(v) for v in crowd.values()}) == 4  # different seeds, different draws
    assert len(set(alone[11])) > 3


@pytest.mark.gpu
def test_sampling_generators_must_live_on_the_cpu():
    with pytest.raises(ValueError, match="CPU torch.Generators"):
        sample(LOGITS, SamplingParams(temperature=1.0), torch.Generator(device="cuda"))
