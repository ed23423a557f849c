"""The simple generate path: stop tokens, limits, seeds and clear errors."""

from __future__ import annotations

import pytest

from trellm.engine.generate import GenerationRequest, GenerationStats, generate_tokens
from trellm.engine.sampling import SamplingParams
from trellm.errors import GenerationError
from trellm.models.loader import load_model


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir("qwen2")[0], device="cpu")


def test_stops_at_a_stop_token_and_reports_why(model):
    free = list(generate_tokens(model, GenerationRequest([1, 2, 3], max_new_tokens=20)))
    stop = free[5]
    stats = GenerationStats()
    out = list(generate_tokens(model, GenerationRequest([1, 2, 3], max_new_tokens=20, stop_token_ids=[stop]), stats))
    assert out == free[: free.index(stop) + 1]
    assert stats.finish_reason == "stop" and stats.completion_tokens == len(out) and stats.prompt_tokens == 3
    stats = GenerationStats()
    assert len(list(generate_tokens(model, GenerationRequest([1, 2, 3], max_new_tokens=7), stats))) == 7
    assert stats.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    def run(seed):
        req = GenerationRequest([5, 6], max_new_tokens=24, sampling=SamplingParams(temperature=1.5, seed=seed))
        return list(generate_tokens(model, req))

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_generation_stops_at_the_context_length(model):
    ctx = model.config.max_position_embeddings
    out = list(generate_tokens(model, GenerationRequest([1] * (ctx - 3), max_new_tokens=50)))
    assert len(out) == 3


@pytest.mark.parametrize("req, words", [
    (GenerationRequest([]), "empty"),
    (GenerationRequest([1] * 512), "context"),
    (GenerationRequest([1, 99999]), "outside the vocabulary"),
    (GenerationRequest([1], max_new_tokens=0), "max_new_tokens"),
])
def test_bad_requests(model, req, words):
    with pytest.raises(GenerationError, match=words):
        list(generate_tokens(model, req))


def test_llm_stream_through_the_generator_equals_the_simple_loop(tiny_chat_model):
    """LLM(engine="generator") (the default on CUDA) streams the same text and stats as the simple loop,
    reuses a chat's earlier turns from its prefix cache, and a consumer that stops early frees the pages."""
    from trellm.engine.llm import LLM

    simple = LLM(tiny_chat_model, device="cpu", engine="simple")
    fast = LLM(tiny_chat_model, device="cpu", engine="generator")
    chat = [{"role": "user", "content": "The quick brown fox"}]
    for prompt in ("The quick brown fox", chat):
        a, b = GenerationStats(), GenerationStats()
        want = "".join(simple.stream(prompt, max_new_tokens=12, stats=a))
        assert "".join(fast.stream(prompt, max_new_tokens=12, stats=b)) == want
        assert (b.prompt_tokens, b.completion_tokens, b.finish_reason) == (a.prompt_tokens, a.completion_tokens,
                                                                          a.finish_reason)
        assert b.prefill_seconds > 0 and b.decode_seconds > 0
    gen = fast._generator
    reused = gen.pool.reused_tokens
    long_chat = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 12}]  # > 1 page
    answer = fast.generate(long_chat, max_new_tokens=12)
    turn2 = long_chat + [{"role": "assistant", "content": answer}, {"role": "user", "content": "and then?"}]
    assert fast.generate(turn2, max_new_tokens=6) == simple.generate(turn2, max_new_tokens=6)
    assert gen.pool.reused_tokens > reused  # the first turn's pages were not recomputed
    pieces = fast.stream("The quick brown fox", max_new_tokens=12)
    next(pieces)
    pieces.close()  # e.g. Ctrl-C in the chat
    assert not gen.busy and gen.pool.available == gen.pool.num_pages
    with pytest.raises(ValueError, match="engine"):
        LLM(tiny_chat_model, device="cpu", engine="fast")


def test_llm_stream_takes_the_simple_loop_beyond_the_generators_cache(tiny_chat_model, monkeypatch):
    import trellm.engine.llm as llm_mod

    monkeypatch.setattr(llm_mod, "STREAM_CACHE_TOKENS", 40)
    fast = llm_mod.LLM(tiny_chat_model, device="cpu", engine="generator")
    simple = llm_mod.LLM(tiny_chat_model, device="cpu", engine="simple")
    used = []
    real = fast._stream_generator
    monkeypatch.setattr(fast, "_stream_generator", lambda *a: used.append(1) or real(*a))
    assert fast._get_generator().max_seq_len == 40
    assert fast.generate("The quick brown fox", max_new_tokens=8) == simple.generate("The quick brown fox",
                                                                                    max_new_tokens=8)
    assert used == [1]
    long = "The quick brown fox jumps over the lazy dog. " * 3  # past 40 tokens with the answer
    assert fast.generate(long, max_new_tokens=8) == simple.generate(long, max_new_tokens=8)
    assert used == [1]  # the simple loop took it
