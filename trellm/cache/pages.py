"""The KV page pool: which physical pages of the preallocated KV tensors each sequence uses.

Pure Python (no torch): the generator's scheduler asks it for pages and the model runner
receives plain page lists. Every layer's K and V tensors are cut into `num_pages` pages of
`page_size` token slots; a sequence's tokens live in the pages of its `PageTable`, in order.

Prefix caching. A page whose `page_size` tokens have all been computed is *committed*: it
gets a digest that chains the digest of the page before it with its own tokens, so equal
digests mean equal token prefixes and therefore equal KV contents. A new sequence reuses the
committed pages of its longest matching prefix (reference counts) and computes only the
rest. When the last user of a committed page goes away the page keeps its contents and its
digest and waits in an LRU list; allocation takes never-used or uncommitted free pages first
and evicts the least recently released cached page only when none is left.

Fragmentation cannot build up: every page is the same size and any free page serves any
sequence (the page tables are the indirection), so the pool never needs defragmenting.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from trellm.errors import TrellmError

PAGE_SIZE = 256  # tokens per page


class OutOfPages(TrellmError):
    """The pool has too few free pages for a request (the scheduler queues or preempts)."""


@dataclass(slots=True)
class PageTable:
    """One sequence's pages: token i lives in slot i % page_size of pages[i // page_size]."""

    pages: list[int] = field(default_factory=list)
    capacity: int = 0  # token slots the pages hold (len(pages) · page_size)
    cached_tokens: int = 0  # leading tokens whose KV came from the prefix cache (not recomputed)
    digests: list[bytes] = field(default_factory=list)  # digest of each committed leading page


def page_digest(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Digest of a full page given the digest of the page before it (b"" for the first)."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class PagePool:
    def __init__(self, num_pages: int, page_size: int = PAGE_SIZE):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"a page pool needs at least one page of at least one token, got {num_pages} × "
                             f"{page_size}")
        self.num_pages, self.page_size = num_pages, page_size
        self._refs = [0] * num_pages
        self._digest: list[bytes | None] = [None] * num_pages  # committed pages only
        self._by_digest: dict[bytes, int] = {}
        self._free = list(range(num_pages - 1, -1, -1))  # uncommitted, unreferenced; pop() gives page 0 first
        self._lru: OrderedDict[int, None] = OrderedDict()  # committed, unreferenced; oldest first
        self.reused_tokens = 0  # prefix-cache hits since creation (tokens not recomputed)

    # -- queries ---------------------------------------------------------------------------------

    @property
    def available(self) -> int:
        """Pages that an allocation may take now (free + evictable cached)."""
        return len(self._free) + len(self._lru)

    @property
    def cached(self) -> int:
        """Unreferenced pages that still hold a reusable prefix."""
        return len(self._lru)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def match(self, tokens: Sequence[int]) -> list[int]:
        """Committed pages holding the longest cached prefix of `tokens`, never all of them: the last
        prompt token is always computed, because its logits are what the sequence needs next."""
        pages, parent = [], b""
        for i in range((len(tokens) - 1) // self.page_size):
            parent = page_digest(parent, tokens[i * self.page_size : (i + 1) * self.page_size])
            page = self._by_digest.get(parent)
            if page is None:
                break
            pages.append(page)
        return pages

    def can_open(self, tokens: Sequence[int], reserve: int) -> bool:
        return self._fits(self.match(tokens), len(tokens), reserve)

    def _fits(self, matched: list[int], num_tokens: int, reserve: int) -> bool:
        idle_matched = sum(1 for p in matched if self._refs[p] == 0)  # counted in `available` today
        return self.pages_for(max(reserve, num_tokens)) - len(matched) <= self.available - idle_matched

    # -- sequences -------------------------------------------------------------------------------

    def open(self, tokens: Sequence[int], reserve: int = 0) -> PageTable:
        """A page table for a new sequence whose prompt is `tokens`, with room for max(reserve,
        len(tokens)) tokens; its cached prefix pages are shared (table.cached_tokens says how many
        tokens need no computing). Raises OutOfPages, changing nothing, when the pool is short."""
        matched = self.match(tokens)  # hashes the prompt's pages: once per open
        if not self._fits(matched, len(tokens), reserve):
            raise OutOfPages(f"{self.pages_for(max(reserve, len(tokens)))} pages needed, {self.available} available")
        table = PageTable()
        for page in matched:
            self._ref(page)
            table.digests.append(self._digest[page])
        table.pages = list(matched)
        table.capacity = len(matched) * self.page_size
        table.cached_tokens = table.capacity
        self.reused_tokens += table.cached_tokens
        self.grow(table, max(reserve, len(tokens)))
        return table

    def grow(self, table: PageTable, num_tokens: int) -> None:
        """Make room for `num_tokens` tokens in all (no-op if there is room). OutOfPages changes nothing."""
        need = self.pages_for(num_tokens) - len(table.pages)
        if need <= 0:
            return
        if need > self.available:
            raise OutOfPages(f"{need} more pages needed, {self.available} available")
        for _ in range(need):
            table.pages.append(self._take())
        table.capacity = len(table.pages) * self.page_size

    def commit(self, table: PageTable, tokens: Sequence[int]) -> None:
        """Publish the pages that `tokens` (the sequence so far, all computed) fills completely, so
        later sequences with the same prefix can share them."""
        full = min(len(tokens) // self.page_size, len(table.pages))
        for i in range(len(table.digests), full):
            parent = table.digests[-1] if table.digests else b""
            digest = page_digest(parent, tokens[i * self.page_size : (i + 1) * self.page_size])
            page = table.pages[i]
            if digest not in self._by_digest:  # else another sequence published the same prefix first
                self._by_digest[digest] = page
                self._digest[page] = digest
            table.digests.append(digest)

    def fork(self, table: PageTable) -> tuple[PageTable, list[tuple[int, int]]]:
        """A second sequence continuing from the same tokens (e.g. n > 1 samples): pages are shared
        except a partly filled last page, which is copied. Returns the table and the (source,
        destination) page copies the KV tensors must make before the fork writes."""
        shared = len(table.digests)  # committed pages never change again
        copies = len(table.pages) - shared
        if copies > self.available:
            raise OutOfPages(f"{copies} pages needed to fork, {self.available} available")
        twin = PageTable(pages=list(table.pages[:shared]), capacity=table.capacity,
                         cached_tokens=table.cached_tokens, digests=list(table.digests))
        for page in twin.pages:
            self._ref(page)
        moves = []
        for page in table.pages[shared:]:
            new = self._take()
            twin.pages.append(new)
            moves.append((page, new))
        return twin, moves

    def truncate(self, table: PageTable, num_tokens: int) -> list[tuple[int, int]]:
        """Cut a sequence back to its first `num_tokens` tokens, which it keeps; the next ones will be
        written again (a rewind). Pages past the cut are released. A committed page that holds the
        cut may be shared, so the sequence continues on a private copy of it: returns the (source,
        destination) page copies to make before the next write. OutOfPages (nothing changed) when no
        page is free for that copy."""
        keep = self.pages_for(num_tokens)  # pages holding kept tokens
        copies = []
        if len(table.digests) > num_tokens // self.page_size:
            # the page with the cut is committed (its full contents are published): copy it
            cut = num_tokens // self.page_size
            if cut < keep:
                if self.available == 0:
                    raise OutOfPages("a page is needed to rewind a sequence; none is free")
                new = self._take()
                copies.append((table.pages[cut], new))
                self._release(table.pages[cut])
                table.pages[cut] = new
            del table.digests[cut:]
        for page in reversed(table.pages[keep:]):
            self._release(page)
        del table.pages[keep:]
        table.capacity = len(table.pages) * self.page_size
        return copies

    def _release(self, page: int) -> None:
        self._refs[page] -= 1
        assert self._refs[page] >= 0, f"page {page} released twice"
        if self._refs[page] == 0:
            if self._digest[page] is None:
                self._free.append(page)
            else:
                self._lru[page] = None  # most recently released last

    def close(self, table: PageTable) -> None:
        """Release a finished or cancelled sequence's pages (committed ones stay cached)."""
        # Last page first: the LRU then evicts the deepest pages of a prefix before its first ones,
        # which more sequences share (a page is unreachable once any page before it is gone).
        for page in reversed(table.pages):
            self._release(page)
        table.pages, table.capacity, table.digests = [], 0, []

    def clear_cache(self) -> None:
        """Forget every cached prefix that no sequence uses."""
        while self._lru:
            page, _ = self._lru.popitem(last=False)
            self._forget(page)
            self._free.append(page)

    # -- internals -------------------------------------------------------------------------------

    def _ref(self, page: int) -> None:
        if self._refs[page] == 0:
            self._lru.pop(page, None)
        self._refs[page] += 1

    def _take(self) -> int:
        if self._free:
            page = self._free.pop()
        else:
            page, _ = self._lru.popitem(last=False)  # evict the least recently released prefix page
            self._forget(page)
        self._refs[page] = 1
        return page

    def _forget(self, page: int) -> None:
        del self._by_digest[self._digest[page]]
        self._digest[page] = None

    def check(self) -> None:
        """Internal consistency (tests): every page is free, cached or referenced, exactly once."""
        free, lru = set(self._free), set(self._lru)
        assert len(free) == len(self._free) and not free & lru
        for page in range(self.num_pages):
            refs = self._refs[page]
            assert refs >= 0
            assert (page in free) + (page in lru) + (refs > 0) == 1, page
            assert page not in free or self._digest[page] is None
            assert page not in lru or self._digest[page] is not None
        for digest, page in self._by_digest.items():
            assert self._digest[page] == digest
        assert sum(d is not None for d in self._digest) == len(self._by_digest)
