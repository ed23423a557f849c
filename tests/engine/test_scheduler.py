"""The continuous-batching scheduler, driven by a simulated model.

The simulated model's next token is a function of the whole prefix, and its "KV" for a
position is the prefix it was computed from, so a test can check that every chunk finds
exactly the right KV before it in its pages and that every answer equals the answer the
sequence would get alone, whatever the batching, preemption or prefix sharing."""

from __future__ import annotations

import random
import zlib

import pytest

from trellm.cache.pages import PagePool
from trellm.engine.scheduler import Request, Scheduler, SchedulerConfig
from trellm.errors import GenerationError

VOCAB = 40


def next_token(prefix) -> int:
    return zlib.crc32(bytes(str(tuple(prefix)), "ascii")) % VOCAB


def alone(prompt, n) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


class Model:
    """Runs batches: checks page use and KV contents, returns the sampled tokens."""

    def __init__(self, pool: PagePool):
        self.ps = pool.page_size
        self.kv: dict[tuple[int, int], tuple[int, ...]] = {}
        self.computed_tokens = 0
        self.queued_passes = 0  # passes planned by lookahead (step's `queued`)
        self.salt: dict = {}  # per sequence: rewound sequences continue differently (as after a ban)

    def run(self, batch, sched: Scheduler) -> dict:
        """All chunks of a batch run at once, as on a GPU: every read sees the KV as it was before
        the batch, and no two chunks write the same slot."""
        sampled, writes = {}, {}
        for src, dst in batch.copies:  # page copies come before the pass
            for off in range(self.ps):
                if (src, off) in self.kv:
                    self.kv[(dst, off)] = self.kv[(src, off)]
        for chunk in batch.chunks:
            if chunk.seq_id not in sched._seqs:  # gone while this pass was queued ahead: it runs anyway
                for i in range(chunk.start, chunk.start + len(chunk.tokens)):
                    writes[(chunk.pages[i // self.ps], i % self.ps)] = ("stale",)  # never read by anyone
                continue
            full = sched.tokens(chunk.seq_id)  # the sequence so far, as the scheduler knows it
            end = chunk.start + len(chunk.tokens)
            assert full[chunk.start:end] == chunk.tokens
            assert len(chunk.pages) * self.ps >= end, "a chunk writes past its pages"
            for i in range(chunk.start):  # attention reads every earlier position
                assert self.kv.get((chunk.pages[i // self.ps], i % self.ps)) == tuple(full[: i + 1]), \
                    f"{chunk.seq_id}: position {i} holds the wrong KV"
            for i in range(chunk.start, end):
                slot = (chunk.pages[i // self.ps], i % self.ps)
                assert slot not in writes, "two chunks of one batch write the same slot"
                writes[slot] = tuple(full[: i + 1])
            self.computed_tokens += len(chunk.tokens)
            if chunk.samples:
                assert end == len(full)
                salt = self.salt.get(chunk.seq_id, 0)
                sampled[chunk.seq_id] = next_token(full + [VOCAB + salt] if salt else full)
        self.kv.update(writes)
        return sampled


def step(sched: Scheduler, model: Model, outputs: dict, queued: list | None = None) -> None:
    """One forward pass: schedule, check the limits, run, record the sampled tokens, update. With a list
    `queued` (the generator's overlap), the pass is the one planned by lookahead at the previous step if
    there is one, and the next one is planned by lookahead before this one is recorded."""
    batch = queued.pop() if queued else None
    if batch is not None:  # its tokens, known on the device once the pass before was sampled
        model.queued_passes += 1
        for chunk in batch.chunks:
            if chunk.seq_id in sched._seqs:
                assert len(sched.tokens(chunk.seq_id)) == chunk.start + 1
                chunk.tokens = [sched.tokens(chunk.seq_id)[chunk.start]]
    else:
        batch = sched.schedule()
    assert batch is not None, "work left but nothing scheduled"
    assert batch.num_tokens <= sched.config.max_batch_tokens
    assert len({c.seq_id for c in batch.chunks}) == len(batch.chunks)  # one chunk per sequence
    assert sched.num_running <= sched.config.max_seqs
    sampled = model.run(batch, sched)
    if queued is not None:
        planned = sched.lookahead(batch)
        if planned is not None:
            assert [batch.chunks[j].seq_id for j in planned[1]] == [c.seq_id for c in planned[0].chunks]
            queued.append(planned[0])
    for seq_id, tok in sampled.items():
        outputs.setdefault(seq_id, []).append(tok)
    sched.update(batch, sampled)
    sched.pool.check()


def drive(sched: Scheduler, model: Model, outputs: dict, max_steps: int = 10_000, queued: list | None = None) -> int:
    steps = 0
    while not sched.idle or queued:
        step(sched, model, outputs, queued)
        steps += 1
        assert steps < max_steps, "no progress"
    return steps


def run_random_requests(sched: Scheduler, seed: int, count: int, prompt_lens: tuple, new_tokens: tuple):
    """Queue `count` random requests at once, run to the end, check every answer equals the
    answer alone and every page came back; returns the requests and the number of steps."""
    rng = random.Random(seed)
    reqs = [Request(i, [rng.randrange(VOCAB) for _ in range(rng.randrange(*prompt_lens))], rng.randrange(*new_tokens))
            for i in range(count)]
    for r in reqs:
        sched.add(r)
    outputs = {}
    steps = drive(sched, Model(sched.pool), outputs)
    for r in reqs:
        assert outputs[r.seq_id] == alone(r.prompt, r.max_new_tokens)
    assert sched.pool.available == sched.pool.num_pages
    return reqs, steps


def test_batched_answers_equal_answers_alone_and_prefill_is_chunked():
    sched = Scheduler(SchedulerConfig(max_seq_len=200, max_batch_tokens=16, max_seqs=8), PagePool(64, page_size=8))
    reqs, steps = run_random_requests(sched, 0, 10, (1, 40), (1, 12))
    assert steps > sum(len(r.prompt) for r in reqs) / 16  # the 16-token budget forced chunking


def test_shared_prefix_is_computed_once():
    pool = PagePool(32, page_size=4)
    sched = Scheduler(SchedulerConfig(max_seq_len=100, max_batch_tokens=64), pool)
    stem = list(range(1, 21))  # 5 pages
    sched.add(Request("a", stem + [30], 3))
    model, outputs = Model(pool), {}
    drive(sched, model, outputs)
    before = model.computed_tokens
    sched.add(Request("b", stem + [31, 32], 3))
    drive(sched, model, outputs)
    assert model.computed_tokens - before == 2 + 1 + 1  # [31, 32] after the cached 20, then two decodes
    assert outputs["b"] == alone(stem + [31, 32], 3)
    assert pool.reused_tokens == 20


def test_preemption_under_memory_pressure_keeps_answers_and_frees_everything():
    pool = PagePool(10, page_size=4)  # 40 token slots for sequences wanting up to 30 each
    sched = Scheduler(SchedulerConfig(max_seq_len=30, max_batch_tokens=32, max_seqs=6), pool)
    run_random_requests(sched, 3, 8, (3, 10), (10, 20))
    assert sched.preemptions > 0


def test_impossible_requests_are_refused_and_do_not_disturb_others():
    pool = PagePool(4, page_size=4)
    sched = Scheduler(SchedulerConfig(max_seq_len=64, max_batch_tokens=8), pool)
    sched.add(Request("ok", [1, 2, 3], 4))
    with pytest.raises(GenerationError, match="exceeds the context of 64 tokens"):
        sched.add(Request("long", [1] * 60, 10))
    with pytest.raises(GenerationError, match="needs 5 KV pages but the cache has 4"):
        sched.add(Request("big", [1] * 15, 5))
    with pytest.raises(GenerationError, match="already in use"):
        sched.add(Request("ok", [1], 1))
    with pytest.raises(GenerationError, match="empty"):
        sched.add(Request("empty", [], 1))
    with pytest.raises(GenerationError, match="at least 1"):
        sched.add(Request("none", [1], 0))
    outputs = {}
    drive(sched, Model(pool), outputs)
    assert outputs == {"ok": alone([1, 2, 3], 4)}


def test_finish_and_cancel_release_pages():
    pool = PagePool(16, page_size=4)
    sched = Scheduler(SchedulerConfig(max_seq_len=64, max_batch_tokens=8), pool)
    for i in range(4):
        sched.add(Request(i, [i + 1] * 6, 20))
    model, outputs = Model(pool), {}
    for _ in range(3):
        step(sched, model, outputs)
    sched.cancel(0)  # running
    sched.cancel(3)  # maybe still waiting
    sched.cancel("unknown")  # ignored
    sched.finish(1)
    drive(sched, model, outputs)
    assert outputs[2] == alone([3] * 6, 20)
    assert pool.available == pool.num_pages


def test_lookahead_plans_the_next_decode_pass_only_when_nothing_else_is_due():
    pool = PagePool(6, page_size=4)
    sched = Scheduler(SchedulerConfig(max_seq_len=40, max_batch_tokens=64, max_seqs=4), pool)
    model, outputs = Model(pool), {}
    sched.add(Request("a", [1, 2, 3], 10))
    sched.add(Request("b", [4, 5, 6, 7], 2))
    first = sched.schedule()  # both prompts: each chunk samples
    model.run(first, sched)
    ahead, rows = sched.lookahead(first)
    assert [(c.seq_id, c.start, c.tokens) for c in ahead.chunks] == [("a", 3, [0]), ("b", 4, [0])]
    assert rows == [0, 1] and len(ahead.chunks[1].pages) == 2  # b's fifth token opens its second page
    sched.add(Request("c", [9], 3))  # a request waiting: the next pass must be scheduled (it admits c)
    assert sched.lookahead(first) is None
    sched.cancel("c")
    step(sched, model, outputs)  # first + ahead's positions, recorded the plain way
    batch = sched.schedule()
    # b's next token is its last (max_new_tokens 2): the lookahead continues a alone
    ahead, rows = sched.lookahead(batch)
    assert [c.seq_id for c in ahead.chunks] == ["a"] and rows == [0]
    # No page for the next token: None, and nobody is preempted
    pool2 = PagePool(1, page_size=4)
    sched2 = Scheduler(SchedulerConfig(max_seq_len=4, max_batch_tokens=8, max_seqs=2), pool2)
    sched2.add(Request("x", [1, 2, 3], 1))
    assert sched2.lookahead(sched2.schedule()) is None  # (its only token is its last)
    pool3 = PagePool(3, page_size=2)
    sched3 = Scheduler(SchedulerConfig(max_seq_len=8, max_batch_tokens=8, max_seqs=2), pool3)
    sched3.add(Request("y", [1, 2, 3, 4], 2))
    b3 = sched3.schedule()
    hog = pool3.open([7, 7], 2)  # someone else holds the last page
    assert sched3.lookahead(b3) is None and sched3.num_running == 1 and sched3.preemptions == 0
    pool3.close(hog)
    assert sched3.lookahead(b3) is not None


@pytest.mark.parametrize("ahead", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_randomized_stress(seed, ahead):
    """Random arrivals (prompts sharing stems), random cancels and rewinds (banned strings), a small
    pool: every chunk reads exactly the right KV, every finished answer that was not rewound equals the
    answer alone, no step exceeds its limits, the pool ends full. `ahead`: decode passes planned by
    lookahead before the previous pass is recorded, as the generator's overlap does (cancels land while
    such a pass is queued; the generator never looks ahead for a job that may rewind)."""
    rng = random.Random(seed)
    queued: list | None = [] if ahead else None
    ps = rng.choice([2, 4, 8])
    pool = PagePool(rng.randrange(12, 40), page_size=ps)
    cfg = SchedulerConfig(max_seq_len=rng.randrange(24, 60), max_batch_tokens=rng.randrange(4, 48),
                          max_seqs=rng.randrange(1, 8))
    sched = Scheduler(cfg, pool)
    stems = [[rng.randrange(VOCAB) for _ in range(rng.randrange(1, 20))] for _ in range(3)]
    model, outputs, reqs, cancelled, rewound, ghosts = Model(pool), {}, {}, set(), set(), []
    due: list[tuple[int, list[int]]] = []  # (step, prompt) of ghost requests to come
    next_id = 0

    def add(prompt):
        nonlocal next_id
        r = Request(next_id, prompt, rng.randrange(1, 15))
        next_id += 1
        try:
            sched.add(r)
            reqs[r.seq_id] = r
        except GenerationError:
            assert len(prompt) + r.max_new_tokens > cfg.max_seq_len or \
                pool.pages_for(len(prompt) + r.max_new_tokens) > pool.num_pages

    def arrive():
        for _ in range(rng.choice([0, 0, 0, 1, 2])):
            prompt = (rng.choice(stems) + [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 12))])
            if ghosts and rng.random() < 0.3:  # what a sequence held before a rewind: its cached pages
                ghost = rng.choice(ghosts)
                prompt = ghost[: rng.randrange(1, len(ghost) + 1)]
            add(prompt)
        for item in [d for d in due if d[0] <= clock]:  # and once, a few steps after the rewind rewrote them
            due.remove(item)
            add(item[1])
        if reqs and rng.random() < 0.05:
            victim = rng.choice(list(reqs))
            cancelled.add(victim)
            sched.cancel(victim)
        if outputs and rng.random() < 0.1:  # a banned string: back a few tokens, continue differently
            seq_id = rng.choice(list(outputs))
            if seq_id in sched._seqs and outputs[seq_id] and not any(
                    c.seq_id == seq_id for b in queued or () for c in b.chunks):
                n = rng.randrange(1, len(outputs[seq_id]) + 1)
                ghosts.append(sched.tokens(seq_id))
                due.append((clock + rng.randrange(2, 7), ghosts[-1]))
                sched.rewind(seq_id, n)
                del outputs[seq_id][-n:]
                model.salt[seq_id] = model.salt.get(seq_id, 0) + 1
                rewound.add(seq_id)

    for clock in range(300):
        arrive()
        if not sched.idle or queued:
            step(sched, model, outputs, queued)
    drive(sched, model, outputs, queued=queued)
    for seq_id, r in reqs.items():
        if seq_id in cancelled:
            continue
        if seq_id in rewound:  # continued differently after its rewinds, but to its full length
            assert len(outputs[seq_id]) == r.max_new_tokens
            continue
        assert outputs[seq_id] == alone(r.prompt, r.max_new_tokens), seq_id
    assert pool.available == pool.num_pages
    assert (model.queued_passes > 0 and ahead) or (rewound and not ahead)
