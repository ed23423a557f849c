"""The continuously batched generator and its paged attention, against the simple one-sequence path."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from trellm.cache.paged import PagedKVCache, Segment
from trellm.engine.generate import GenerationRequest, generate_tokens
from trellm.engine.generator import Generator, Job
from trellm.engine.sampling import SamplingParams
from trellm.errors import GenerationError
from trellm.layers.attention import AttentionParams, attention_ref
from trellm.models.loader import load_model


@pytest.mark.parametrize("window, softcap", [(None, None), (5, None), (None, 30.0)])
def test_paged_attention_equals_reference_attention(window, softcap):
    """Three sequences advancing in chunks of different sizes through shared, shuffled pages: each
    step's output equals attention_ref over the sequence's contiguous keys and values."""
    g = torch.Generator().manual_seed(0)
    h, hkv, d, ps = 6, 2, 16, 4
    cfg = SimpleNamespace(num_layers=1, num_kv_heads=hkv, head_dim=d)
    cache = PagedKVCache(cfg, num_pages=20, page_size=ps, device="cpu", dtype=torch.float32)
    params = AttentionParams(scale=d**-0.5, window=window, softcap=softcap)
    order = torch.randperm(20, generator=g).tolist()
    pages = {0: order[0:5], 1: order[5:10], 2: order[10:15]}  # 20 positions each
    full_k = {s: torch.randn(1, 20, hkv, d, generator=g) for s in pages}
    full_v = {s: torch.randn(1, 20, hkv, d, generator=g) for s in pages}
    done = {0: 0, 1: 0, 2: 0}
    for plan in ([(0, 7), (1, 3)], [(0, 1), (1, 9), (2, 13)], [(2, 1), (0, 5)], [(0, 1), (1, 1), (2, 6)]):
        segs, q, k, v, offset = [], [], [], [], 0
        for s, n in plan:
            segs.append(Segment(offset, done[s], n, pages[s]))
            q.append(torch.randn(1, n, h, d, generator=g))
            k.append(full_k[s][:, done[s] : done[s] + n])
            v.append(full_v[s][:, done[s] : done[s] + n])
            offset += n
        out = cache.step(segs).attend(0, torch.cat(q, 1), torch.cat(k, 1), torch.cat(v, 1), params)
        for (s, n), seg, qs in zip(plan, segs, q):
            end = done[s] + n
            ref = attention_ref(qs, full_k[s][:, :end], full_v[s][:, :end], done[s], params)
            torch.testing.assert_close(out[:, seg.offset : seg.offset + n], ref, rtol=1e-5, atol=1e-5)
            done[s] = end


@pytest.fixture(scope="module", params=["qwen2", "gemma3", "mistral"])
def model(request, tiny_model_dir):
    return load_model(tiny_model_dir(request.param)[0], device="cpu")


def alone(model, prompt, n, sampling=None, stop=()):
    req = GenerationRequest(prompt, max_new_tokens=n, sampling=sampling or SamplingParams(), stop_token_ids=stop)
    return list(generate_tokens(model, req))


def random_prompts(seed, count, longest):
    rng = random.Random(seed)
    return [[rng.randrange(1, 250) for _ in range(rng.randrange(1, longest))] for _ in range(count)]


def test_batched_greedy_equals_one_at_a_time(model):
    """Mixed lengths, several pages each, chunked prefill (7-token budget) interleaved with decode,
    sliding-window layers (gemma3, mistral): token for token the simple path's output."""
    prompts = random_prompts(1, 6, 30)
    gen = Generator(model, page_size=4, max_batch_tokens=7, max_seqs=4, cache_tokens=400)
    out = gen.generate([Job(p, max_new_tokens=12) for p in prompts])
    assert out == [alone(model, p, 12) for p in prompts]
    assert gen.pool.available == gen.pool.num_pages


def test_shared_prefix_is_reused_with_the_same_output(model):
    stem = random_prompts(2, 1, 2)[0] + list(range(10, 31))  # >= 5 pages of 4
    prompts = [stem + [40], stem + [41, 42], stem + [43]]
    gen = Generator(model, page_size=4, max_batch_tokens=64, cache_tokens=400)
    first = gen.generate([Job(prompts[0], max_new_tokens=6)])
    rest = gen.generate([Job(p, max_new_tokens=6) for p in prompts[1:]])
    assert gen.pool.reused_tokens >= 2 * 20
    assert first + rest == [alone(model, p, 6) for p in prompts]


def test_a_small_cache_preempts_and_still_gives_the_same_answers(model):
    prompts = random_prompts(3, 5, 12)
    gen = Generator(model, page_size=4, max_batch_tokens=16, max_seqs=5, cache_tokens=40, max_seq_len=40)
    out = gen.generate([Job(p, max_new_tokens=20) for p in prompts])
    assert gen.scheduler.preemptions > 0
    assert out == [alone(model, p, 20) for p in prompts]
    assert gen.pool.available == gen.pool.num_pages


def test_stop_tokens_seeds_and_finish_reasons(model):
    free = alone(model, [5, 6, 7], 16)
    stop = free[4]
    sampling = SamplingParams(temperature=1.3, top_k=40, seed=11)
    gen = Generator(model, page_size=4, max_batch_tokens=8)
    ids = [gen.enqueue(Job([5, 6, 7], max_new_tokens=16, stop_token_ids=[stop], identifier="stop")),
           gen.enqueue(Job([9, 9], max_new_tokens=5, sampling=sampling, identifier="seeded")),
           gen.enqueue(Job([1, 2, 3, 4, 5, 6], max_new_tokens=3, identifier="length"))]
    got, reasons = {i: [] for i in ids}, {}
    for r in gen.stream():
        got[r.job_id] += r.new_token_ids
        if r.finished:
            reasons[r.identifier] = r.finish_reason
    assert got[ids[0]] == free[: free.index(stop) + 1] and reasons["stop"] == "stop"
    assert got[ids[1]] == alone(model, [9, 9], 5, sampling)  # the job's own seed, whatever runs beside it
    assert reasons == {"stop": "stop", "seeded": "length", "length": "length"}
    assert gen.pool.available == gen.pool.num_pages


def test_overlapped_passes_give_the_same_results(model):
    """Decode passes queued before the previous pass's tokens are read (overlap; on a CPU the same logic
    runs eagerly) give every job the same results as passes in turn: tokens, texts, finish reasons and
    logprobs, with a stop token hit mid-way (the pass already queued after it is dropped), min_new_tokens,
    a seeded job, a job with a penalty (no lookahead while it runs), a job cancelled and one arriving
    mid-stream. Every page comes back."""
    free = alone(model, [5, 6, 7], 16)
    stop = free[5]
    at = free.index(stop)  # the stop token is allowed from this token on: "min_edge" stops there

    def run(overlap: bool):
        gen = Generator(model, page_size=4, max_batch_tokens=64, cache_tokens=400, overlap=overlap)
        jobs = [Job([5, 6, 7], max_new_tokens=16, stop_token_ids=[stop], identifier="stop"),
                Job([5, 6, 7], max_new_tokens=16, min_new_tokens=at, stop_token_ids=[stop], identifier="min_edge"),
                Job([5, 6, 7], max_new_tokens=16, min_new_tokens=at + 1, stop_token_ids=[stop], identifier="min"),
                Job([9, 9], max_new_tokens=9, sampling=SamplingParams(temperature=1.3, top_k=40, seed=11),
                    logprobs=3, identifier="seeded"),
                Job(list(range(1, 11)), max_new_tokens=13, identifier="length"),
                Job([3, 1, 4], max_new_tokens=30, identifier="cancelled")]
        ids = {gen.enqueue(job): job.identifier for job in jobs}
        got: list[tuple] = []
        steps = 0
        while gen.busy:
            for r in gen.iterate():
                got.append((ids[r.job_id], r.new_token_ids, r.finished, r.finish_reason, r.logprobs))
            steps += 1
            if steps == 6:
                gen.cancel(next(i for i, name in ids.items() if name == "cancelled"))
                ids[gen.enqueue(Job([8, 8, 8, 8], max_new_tokens=7, identifier="late"))] = "late"
            if steps == 14:
                ids[gen.enqueue(Job([2, 7], max_new_tokens=6, identifier="penalty",
                                    sampling=SamplingParams(repetition_penalty=1.3)))] = "penalty"
        assert gen.pool.available == gen.pool.num_pages
        return sorted(got, key=lambda g: g[0]), gen.passes_ahead

    (plain, none), (overlapped, ahead) = run(False), run(True)
    assert none == 0 and ahead > 10
    # Equal but for the log-probabilities' last bits (the passes' batch sizes differ: bf16 matmuls).
    assert [g[:4] for g in overlapped] == [g[:4] for g in plain]
    for a, b in zip(overlapped, plain):
        assert [[t for t, _ in top] for _, top in a[4]] == [[t for t, _ in top] for _, top in b[4]]
        assert [lp for lp, _ in a[4]] == pytest.approx([lp for lp, _ in b[4]], abs=2e-3)
    tokens = {}
    for name, new, *_ in plain:
        tokens[name] = tokens.get(name, []) + new
    assert tokens["stop"] == tokens["min_edge"] == free[: at + 1] and len(tokens["min"]) > at + 1
    assert len(tokens["late"]) == 7 and 0 < len(tokens["cancelled"]) < 30


def test_bad_jobs_are_refused_and_do_not_disturb_the_others(model):
    gen = Generator(model, page_size=4, max_seq_len=32)
    good = gen.enqueue(Job([1, 2, 3], max_new_tokens=4))
    with pytest.raises(GenerationError, match="context is 32"):
        gen.enqueue(Job(list(range(1, 40)), max_new_tokens=4))
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        gen.enqueue(Job([1, 10**6]))
    with pytest.raises(GenerationError, match="max_new_tokens"):
        gen.enqueue(Job([1], max_new_tokens=0))
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        gen.generate([Job([4]), Job([-1])])  # all or nothing
    out = {}
    for r in gen.stream():
        out.setdefault(r.job_id, []).extend(r.new_token_ids)
    assert out == {good: alone(model, [1, 2, 3], 4)}
    gen.cancel(12345)  # unknown: ignored
    assert gen.pool.available == gen.pool.num_pages


def test_cancel_frees_pages_and_spares_the_others(model):
    gen = Generator(model, page_size=4, max_batch_tokens=8, cache_tokens=200)
    a = gen.enqueue(Job(list(range(1, 20)), max_new_tokens=30))
    b = gen.enqueue(Job(list(range(5, 9)), max_new_tokens=5))
    out: dict[int, list[int]] = {}
    for _ in range(3):
        for r in gen.iterate():
            out.setdefault(r.job_id, []).extend(r.new_token_ids)
    gen.cancel(a)
    for r in gen.stream():
        out.setdefault(r.job_id, []).extend(r.new_token_ids)
    assert len(out.get(a, [])) < 30 and not gen.busy
    assert out[b] == alone(model, list(range(5, 9)), 5)
    assert gen.pool.available == gen.pool.num_pages


def test_held_back_text_is_the_longest_possible_start_of_a_stop_string():
    from trellm.engine.generator import held_back as _held_back

    assert _held_back("hello wor", ["world"]) == 3
    assert _held_back("hello", ["xyz", "lo!"]) == 2
    assert _held_back("abc", ["zzz"]) == 0
    assert _held_back("a", ["ab", "b"]) == 1


def test_stop_strings_across_token_boundaries_min_new_tokens_and_logprobs(tiny_chat_model):
    from trellm.io.tokenizer import Tokenizer

    model = load_model(tiny_chat_model, device="cpu")
    tok = Tokenizer.from_folder(tiny_chat_model)
    prompt = tok.encode("The quick brown fox", add_special_tokens=True)
    free = alone(model, prompt, 24)
    text = tok.decode(free)
    # A stop string made of the last character of one token's text and the first of the next one's.
    b = next(n for k in range(len(free) // 2, len(free)) if 1 <= (n := len(tok.decode(free[:k]))) < len(text))
    stop = text[b - 1 : b + 1]
    assert len(stop) == 2
    gen = Generator(model, tokenizer=tok, page_size=4)
    job = gen.enqueue(Job(prompt, max_new_tokens=24, stop_strings=[stop], logprobs=3))
    got_text, got_tokens, reasons, logprobs = "", [], [], []
    for r in gen.stream():
        got_text += r.text
        got_tokens += r.new_token_ids
        logprobs += r.logprobs
        reasons.append(r.finish_reason)
        assert stop not in got_text  # never shown, not even for a moment
    assert got_text == text[: text.find(stop)] and reasons[-1] == "stop"
    assert got_tokens == free[: len(got_tokens)]
    assert len(logprobs) == len(got_tokens)
    for (chosen, top), t in zip(logprobs, got_tokens):  # greedy: the chosen token is the most likely
        assert len(top) == 3 and top[0][0] == t and chosen == pytest.approx(top[0][1]) and chosen <= 0
    assert gen.pool.available == gen.pool.num_pages
    # min_new_tokens bans the stop tokens until then
    stop_tok = free[2]
    out = gen.generate([Job(prompt, max_new_tokens=10, min_new_tokens=6, stop_token_ids=[stop_tok])])[0]
    assert stop_tok not in out[:6] and len(out) >= 6
    with pytest.raises(GenerationError, match="tokenizer"):
        Generator(model).enqueue(Job(prompt, stop_strings=["x"]))
    with pytest.raises(GenerationError, match="min_new_tokens"):
        gen.enqueue(Job(prompt, max_new_tokens=3, min_new_tokens=4))


def test_constrained_output_follows_json_schema_regex_and_lark(tiny_chat_model):
    pytest.importorskip("llguidance")
    import json
    import re

    from trellm.engine.constraints import Constraint
    from trellm.io.tokenizer import Tokenizer

    model = load_model(tiny_chat_model, device="cpu")
    tok = Tokenizer.from_folder(tiny_chat_model)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    gen = Generator(model, tokenizer=tok, page_size=4)
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"enum": [1, 2, 3]}},
              "required": ["answer", "n"], "additionalProperties": False}
    prompt = tok.encode("Reply:", add_special_tokens=True)
    jobs = [Job(prompt, max_new_tokens=60, stop_token_ids=eos, constraint=Constraint.json_schema(schema)),
            Job(prompt, max_new_tokens=20, stop_token_ids=eos, constraint=Constraint.regex(r"(red|green|blue)!")),
            Job(prompt, max_new_tokens=20, stop_token_ids=eos,
                constraint=Constraint.lark('start: "x" ("ab" | "cd") "y"')),
            Job(prompt, max_new_tokens=30, stop_token_ids=eos, sampling=SamplingParams(temperature=1.5, seed=4),
                constraint=Constraint.json_object())]
    ids = [gen.enqueue(j) for j in jobs]
    text, reasons = {i: "" for i in ids}, {}
    for r in gen.stream():
        text[r.job_id] += r.text
        if r.finished:
            reasons[r.job_id] = r.finish_reason
    value = json.loads(text[ids[0]])
    assert set(value) == {"answer", "n"} and value["answer"] in ("yes", "no") and value["n"] in (1, 2, 3)
    assert re.fullmatch(r"(red|green|blue)!", text[ids[1]])
    assert re.fullmatch(r"x(ab|cd)y", text[ids[2]])
    assert reasons[ids[0]] == reasons[ids[1]] == reasons[ids[2]] == "stop"
    if reasons[ids[3]] == "stop":  # a free-form object may run out of tokens first
        assert isinstance(json.loads(text[ids[3]]), dict)
    else:
        assert text[ids[3]].lstrip().startswith("{")
    with pytest.raises(GenerationError, match="invalid lark"):
        gen.enqueue(Job(prompt, constraint=Constraint.lark("start: ((")))
    with pytest.raises(GenerationError, match="unknown constraint kind"):
        Constraint("xml", "<a/>")
    assert gen.pool.available == gen.pool.num_pages


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["qwen2", "gemma3", "mistral"])
def test_gpu_generator_with_kernels_and_cuda_graphs_equals_one_at_a_time(kind, tiny_model_dir):
    """On a GPU the generator attends through the Triton paged kernel and decodes through captured CUDA
    graphs (padded to batch buckets): in fp32 its greedy tokens equal the simple path's, with chunked
    prefill, sliding windows, more sequences than one bucket and a pool that preempts."""
    model = load_model(tiny_model_dir(kind)[0], device="cuda", dtype="float32")
    prompts = random_prompts(3, 11, 40)
    gen = Generator(model, page_size=16, max_batch_tokens=24, max_seqs=6, cache_tokens=16 * 14)
    assert gen.graphs is not None
    out = gen.generate([Job(p, max_new_tokens=20) for p in prompts])
    assert out == [alone(model, p, 20) for p in prompts]
    assert 6 in gen.graphs._graphs  # decode passes really replayed graphs
    assert gen.pool.available == gen.pool.num_pages
    eager = Generator(model, page_size=16, max_batch_tokens=24, max_seqs=6, cache_tokens=16 * 14, cuda_graphs=False)
    assert eager.generate([Job(p, max_new_tokens=20) for p in prompts]) == out


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["qwen2", "gemma3"])
def test_gpu_overlapped_passes_feed_tokens_on_the_device(kind, tiny_model_dir):
    """With overlap on a GPU, decode passes replay their graphs with the previous pass's tokens copied on
    the device (and the host reads tokens through pinned buffers and events): the same tokens and
    logprobs as without, jobs stopping and cancelled mid-stream, every page back."""
    model = load_model(tiny_model_dir(kind)[0], device="cuda", dtype="float32")
    prompts = random_prompts(4, 7, 30)
    free = alone(model, prompts[0], 20)

    def run(overlap):
        gen = Generator(model, page_size=16, max_batch_tokens=256, max_seqs=8, cache_tokens=16 * 40,
                        overlap=overlap)
        ids = [gen.enqueue(Job(p, max_new_tokens=20, logprobs=2 if i == 1 else 0,
                               stop_token_ids=[free[7]] if i == 0 else ())) for i, p in enumerate(prompts)]
        got = {i: [] for i in ids}
        lps = []
        steps = 0
        while gen.busy:
            for r in gen.iterate():
                got[r.job_id] += r.new_token_ids
                lps += [lp for lp, _ in r.logprobs]
            steps += 1
            if steps == 9:
                gen.cancel(ids[2])
        assert gen.pool.available == gen.pool.num_pages
        return [got[i] for i in ids], lps, gen.passes_ahead

    (plain, lp_plain, none), (overlapped, lp_over, ahead) = run(False), run(True)
    assert none == 0 and ahead > 10
    assert overlapped == plain and plain[0] == free[: free.index(free[7]) + 1]
    assert lp_over == pytest.approx(lp_plain, abs=1e-4)


@pytest.mark.gpu
def test_gpu_bf16_graph_logits_match_eager(tiny_model_dir):
    """bf16: a graph replay of a padded decode batch gives the eager pass's logits."""
    model = load_model(tiny_model_dir("llama")[0], device="cuda", dtype="bfloat16")
    gen = Generator(model, page_size=16, max_seqs=8, cache_tokens=16 * 20)
    prompts = random_prompts(5, 3, 50)
    segs, ids, pos = [], [], []
    for i, p in enumerate(prompts):  # prefill each prompt eagerly into its own pages
        pages = list(range(4 * i, 4 * i + 4))
        model(torch.tensor([p], device="cuda"), torch.arange(len(p), device="cuda")[None],
              gen.cache.step([Segment(0, 0, len(p), pages)]), max_seq_len=len(p))
        segs.append(Segment(i, len(p), 1, pages))
        ids.append(p[-1] + 1)
        pos.append(len(p))
    eager = model(torch.tensor([ids], device="cuda"), torch.tensor([pos], device="cuda"), gen.cache.step(segs),
                  max_seq_len=max(pos) + 1)[0].clone()
    replay = gen.graphs.run(ids, pos, [s.pages for s in segs]).clone()
    assert (replay - eager).abs().max().item() <= 2e-2 * eager.abs().max().item()


def test_banned_strings_rewind_and_never_show(tiny_chat_model):
    """Banned strings found in the greedy output: the job goes back to the token where each began and
    samples again with it banned there. Nothing banned is ever returned, returned tokens and text
    agree, and after every rewind (pages of 4 tokens: rewinds cut committed, shared pages) the model's
    greedy choice holds at every position except the ones a ban changed."""
    from trellm.io.tokenizer import Tokenizer

    model = load_model(tiny_chat_model, device="cpu")
    tok = Tokenizer.from_folder(tiny_chat_model)
    prompt = tok.encode("The quick brown fox", add_special_tokens=True)
    free = alone(model, prompt, 40)
    text = tok.decode(free)
    banned = [text[4:14], text[20:22]]  # in the greedy text; the first spans several 4-token pages
    gen = Generator(model, tokenizer=tok, page_size=4)
    # First in, so its committed pages are the ones the prefix cache keeps (and the twin shares).
    job = gen.enqueue(Job(prompt, max_new_tokens=40, banned_strings=banned, logprobs=2))
    gen.enqueue(Job(prompt, max_new_tokens=40))
    got_text, got_tokens, logprobs, reasons, twin_tokens = "", [], [], [], []
    for r in gen.stream():
        if r.job_id != job:
            twin_tokens += r.new_token_ids
            continue
        got_text += r.text
        got_tokens += r.new_token_ids
        logprobs += r.logprobs
        reasons.append(r.finish_reason)
        assert not any(b in got_text for b in banned)
    assert gen.rewinds >= 1 and reasons[-1] == "length" and len(got_tokens) == 40
    assert twin_tokens == free  # the rewinds never wrote into the pages the twin shares
    cached_before = gen.pool.reused_tokens
    assert gen.generate([Job(prompt + free[:20], max_new_tokens=20)])[0] == free[20:]  # nor into cached pages
    assert gen.pool.reused_tokens - cached_before >= 16
    assert got_text == tok.decode(got_tokens) and len(logprobs) == len(got_tokens)
    assert not any(b in got_text for b in banned)
    assert gen.pool.available == gen.pool.num_pages
    # KV after the rewinds is right: one pass over prompt + output; greedy everywhere but <= one
    # position per rewind (where the banned token was replaced).
    ids = torch.tensor([prompt + got_tokens])
    logits = model(ids, torch.arange(ids.shape[1])[None], PagedKVCache(model.config, num_pages=40, page_size=4,
                   device="cpu", dtype=torch.float32).step([Segment(0, 0, ids.shape[1], list(range(40)))]),
                   max_seq_len=ids.shape[1])[0]
    greedy = logits[len(prompt) - 1 : -1].argmax(-1).tolist()
    changed = sum(g != t for g, t in zip(greedy, got_tokens))
    assert 1 <= changed <= gen.rewinds
    with pytest.raises(GenerationError, match="tokenizer"):
        Generator(model).enqueue(Job(prompt, banned_strings=["x"]))
    with pytest.raises(GenerationError, match="empty"):
        gen.enqueue(Job(prompt, banned_strings=[""]))


@pytest.mark.gpu
def test_gpu_warmup_captures_every_bucket_and_changes_nothing(tiny_model_dir):
    """warmup() (a server's start) compiles and captures every decode bucket, leaves the pool full and the
    generator answering exactly as a fresh one."""
    model = load_model(tiny_model_dir("llama")[0], device="cuda", dtype="float32")
    prompts = random_prompts(4, 5, 30)
    warm = Generator(model, page_size=16, max_seqs=6, cache_tokens=16 * 40)
    warm.warmup()
    assert sorted(warm.graphs._graphs) == warm.graphs.buckets
    assert warm.pool.available == warm.pool.num_pages and not warm.busy
    cold = Generator(model, page_size=16, max_seqs=6, cache_tokens=16 * 40)
    jobs = [Job(p, max_new_tokens=12) for p in prompts]
    assert warm.generate(jobs) == cold.generate(jobs)
