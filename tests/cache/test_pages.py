"""The KV page pool: allocation, prefix sharing, LRU eviction, forks, and a randomized stress test
that simulates the KV contents to prove a reused page always holds the right tokens."""

from __future__ import annotations

import random

import pytest

from trellm.cache.pages import OutOfPages, PagePool


def test_open_grow_close_returns_every_page():
    pool = PagePool(8, page_size=4)
    a = pool.open(list(range(6)), reserve=10)  # 10 tokens -> 3 pages
    assert len(a.pages) == 3 and a.capacity == 12 and a.cached_tokens == 0
    pool.grow(a, 12)  # room already
    assert len(a.pages) == 3
    pool.grow(a, 13)
    assert len(a.pages) == 4 and pool.available == 4
    pool.check()
    pool.close(a)
    assert pool.available == 8 and a.pages == []
    pool.check()


def test_a_committed_prefix_is_shared_and_counted():
    pool = PagePool(16, page_size=4)
    prompt = list(range(100, 111))  # 11 tokens: 2 full pages + 3
    a = pool.open(prompt)
    pool.commit(a, prompt)  # the model computed all 11
    assert len(a.digests) == 2
    b = pool.open(prompt[:9] + [7, 7])  # shares the first 2 pages (8 tokens), differs after
    assert b.pages[:2] == a.pages[:2] and b.pages[2] != a.pages[2] and b.cached_tokens == 8
    assert pool.reused_tokens == 8
    pool.close(a)
    pool.check()
    assert pool.cached == 0  # b still uses the shared pages
    pool.close(b)
    assert pool.cached == 2 and pool.available == 16
    c = pool.open(prompt)  # after both left, the prefix still serves
    assert c.cached_tokens == 8
    pool.check()


def test_equal_pages_after_different_prefixes_are_not_confused():
    pool = PagePool(16, page_size=2)
    x, y = [1, 1, 5, 5, 9], [2, 2, 5, 5, 9]  # the same second page after different first pages
    a = pool.open(x)
    pool.commit(a, x)
    b = pool.open(y)
    assert b.cached_tokens == 0
    pool.commit(b, y)
    c = pool.open([2, 2, 5, 5, 7])
    assert c.pages[:2] == b.pages[:2] and c.cached_tokens == 4  # y's pages, never x's second page


def test_the_last_prompt_token_is_always_computed():
    pool = PagePool(8, page_size=4)
    prompt = list(range(8))  # exactly 2 pages
    a = pool.open(prompt)
    pool.commit(a, prompt)
    pool.close(a)
    b = pool.open(prompt)
    assert b.cached_tokens == 4  # page 2 is recomputed so the last token's logits exist
    assert pool.match(prompt + [9]) != []  # a longer prompt may use both
    assert len(pool.match(prompt + [9])) == 2


def test_out_of_pages_changes_nothing():
    pool = PagePool(4, page_size=4)
    a = pool.open(list(range(10)))  # 3 pages
    with pytest.raises(OutOfPages, match="2 pages needed, 1 available"):
        pool.open(list(range(50, 55)))
    with pytest.raises(OutOfPages):
        pool.grow(a, 17)  # needs 2 more
    assert len(a.pages) == 3 and pool.available == 1
    pool.check()


def test_lru_evicts_least_recently_released_and_deepest_first():
    pool = PagePool(6, page_size=2)
    p = [1, 2, 3, 4, 5, 6, 7]  # 3 full pages + 1
    a = pool.open(p)
    pool.commit(a, p)
    pool.close(a)  # 3 cached pages + 3 free
    assert pool.cached == 3
    b = pool.open([9] * 7)  # 4 pages: 3 free + evicts one cached page, the deepest
    assert pool.cached == 2
    assert len(pool.match(p)) == 2  # the first two pages of the prefix survive
    pool.close(b)
    pool.clear_cache()
    assert pool.cached == 0 and pool.available == 6 and pool.match(p) == []
    pool.check()


def test_fork_shares_committed_pages_and_copies_the_partial_one():
    pool = PagePool(8, page_size=4)
    prompt = list(range(10))
    a = pool.open(prompt)
    pool.commit(a, prompt)
    b, copies = pool.fork(a)
    assert b.pages[:2] == a.pages[:2] and copies == [(a.pages[2], b.pages[2])]
    pool.close(a)
    pool.check()
    pool.close(b)
    assert pool.available == 8
    pool.check()


def test_truncate_copies_a_shared_committed_page_and_releases_the_rest():
    """Rewinding into a committed page must not write into it (another sequence shares it): the
    sequence continues on a private copy; pages past the cut are released; later commits work."""
    pool = PagePool(12, page_size=4)
    tokens = list(range(50, 61))  # 11 tokens: pages 0, 1 full, page 2 partial
    a = pool.open(tokens)
    pool.commit(a, tokens)
    b = pool.open(tokens[:8] + [1, 2])  # shares a's two committed pages
    shared = list(a.pages[:2])
    copies = pool.truncate(a, 6)  # keep 6 tokens: the cut is inside committed page 1
    assert len(copies) == 1 and copies[0][0] == shared[1]
    assert a.pages == [shared[0], copies[0][1]] and a.digests == [a.digests[0]] and a.capacity == 8
    assert b.pages[:2] == shared  # b untouched
    pool.check()
    pool.grow(a, 11)
    new_tokens = tokens[:6] + [9, 9, 9, 9, 9]
    pool.commit(a, new_tokens)  # page 1 now holds other tokens: a new digest, not the shared page's
    assert len(a.digests) == 2 and pool.match(tokens[:9]) == shared
    assert pool.match(new_tokens[:9]) == a.pages[:2]
    # a cut on a page boundary copies nothing; an uncommitted page is cut in place
    assert pool.truncate(a, 8) == [] and len(a.pages) == 2
    pool.check()
    pool.close(a)
    pool.close(b)
    assert pool.available == 12
    pool.check()


def test_bad_pool_size():
    with pytest.raises(ValueError, match="at least one page"):
        PagePool(0)


@pytest.mark.parametrize("seed", range(6))
def test_randomized_stress_reused_pages_hold_the_right_tokens(seed):
    """Random opens (prompts from a few shared stems), decode steps, commits, forks and closes on a
    small pool. The KV contents are simulated (slot -> the token prefix it was computed from): whenever
    a page is reused, its contents must be exactly what the new sequence would have computed there."""
    rng = random.Random(seed)
    ps = 4
    pool = PagePool(24, page_size=ps)
    kv: dict[tuple[int, int], tuple[int, ...]] = {}  # (page, slot) -> what was computed there
    # Stems are made of a few page-sized blocks, so equal pages often follow different prefixes.
    blocks = [[rng.randrange(50) for _ in range(ps)] for _ in range(3)]
    stems = [sum((rng.choice(blocks) for _ in range(rng.randrange(1, 4))), []) + [rng.randrange(50)]
             for _ in range(6)]
    live: list[tuple[list[int], object]] = []  # (tokens so far, table)

    # A slot's KV depends on its token and on every token before it: simulate it as the whole prefix.
    def write(table, tokens, start):
        for i in range(start, len(tokens)):
            kv[(table.pages[i // ps], i % ps)] = tuple(tokens[: i + 1])

    def verify(table, tokens, upto):
        for i in range(upto):
            assert kv[(table.pages[i // ps], i % ps)] == tuple(tokens[: i + 1]), "a page holds another prefix's KV"

    for _ in range(400):
        op = rng.random()
        if op < 0.35 or not live:
            tokens = rng.choice(stems) + [rng.randrange(50) for _ in range(rng.randrange(1, 9))]
            if not pool.can_open(tokens, len(tokens) + 2):
                with pytest.raises(OutOfPages):
                    pool.open(tokens, reserve=len(tokens) + 2)
                continue
            table = pool.open(tokens, reserve=len(tokens) + 2)
            verify(table, tokens, table.cached_tokens)  # the reused prefix is right
            write(table, tokens, table.cached_tokens)  # prefill computes the rest
            pool.commit(table, tokens)
            live.append((tokens, table))
        elif op < 0.75:
            tokens, table = rng.choice(live)  # one decode step
            try:
                pool.grow(table, len(tokens) + 1)
            except OutOfPages:
                continue  # a scheduler would preempt; here the sequence just waits
            tokens.append(rng.randrange(50))
            write(table, tokens, len(tokens) - 1)
            pool.commit(table, tokens)
        elif op < 0.85:
            tokens, table = rng.choice(live)
            try:
                twin, copies = pool.fork(table)
            except OutOfPages:
                continue
            for src, dst in copies:
                for slot in range(ps):
                    if (src, slot) in kv:
                        kv[(dst, slot)] = kv[(src, slot)]
            verify(twin, tokens, len(tokens))
            live.append((list(tokens), twin))
        else:
            tokens, table = live.pop(rng.randrange(len(live)))
            verify(table, tokens, len(tokens))
            pool.close(table)
        pool.check()
    for tokens, table in live:
        verify(table, tokens, len(tokens))
        pool.close(table)
    pool.check()
    assert pool.available == pool.num_pages  # every page back
    pool.clear_cache()
    assert pool.cached == 0
    pool.check()
