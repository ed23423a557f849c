"""Continuous-batching scheduler: which tokens of which sequences the next forward pass computes.

Pure Python (no torch), driven by the generator:

    sched.add(Request(...))            # any time; bad requests raise GenerationError at once
    batch = sched.schedule()           # the work of one forward pass (None when idle)
    ... model runs batch.chunks, samples one token for every chunk with `samples` set ...
    sched.update(batch, {seq_id: token, ...})
    sched.finish(seq_id) / sched.cancel(seq_id)   # between steps: stop conditions, departed clients
    ahead, rows = sched.lookahead(batch)  # optional, before update: the next decode pass, tokens unknown

Every step first gives each decoding sequence its next token, then spends the rest of the
token budget (`max_batch_tokens`) on prompt chunks: sequences already prefilling first,
then new ones in arrival order while pages and the sequence limit allow (chunked prefill
interleaved with decode, so a long prompt never stalls the running ones). A sequence is
admitted only when its whole prompt fits in the free pages (minus the pages a cached
prefix lends it), so prefill never runs out of memory. When decoding needs a page and the
pool has none, the most recently admitted sequence is preempted: its pages are released
and it waits at the head of the queue to be recomputed (its committed pages usually
survive in the prefix cache, so little is recomputed). Nothing crashes and no answer
changes: a sequence's tokens depend only on its own prefix.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from trellm.cache.pages import OutOfPages, PagePool, PageTable
from trellm.errors import GenerationError


@dataclass(slots=True)
class SchedulerConfig:
    max_seq_len: int  # prompt + new tokens of one sequence
    max_batch_tokens: int = 2048  # tokens computed per forward pass (decode tokens + prompt chunks)
    max_seqs: int = 64  # sequences running at once

    def __post_init__(self) -> None:
        if self.max_seq_len < 1 or self.max_batch_tokens < 1 or self.max_seqs < 1:
            raise ValueError(f"scheduler limits must be positive: {self}")


@dataclass(slots=True)
class Request:
    seq_id: int | str
    prompt: Sequence[int]
    max_new_tokens: int


class State(Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"


@dataclass(slots=True)
class _Seq:
    request: Request
    tokens: list[int]  # prompt + generated so far
    order: int  # admission order (preemption takes the newest)
    state: State = State.WAITING
    table: PageTable | None = None
    computed: int = 0  # leading tokens whose KV is in the cache
    generated: int = 0
    preemptions: int = 0


@dataclass(slots=True)
class Chunk:
    """Compute tokens[start:end] of one sequence (their KV goes to `pages`); if `samples`, the
    logits of the last one give the sequence's next token."""

    seq_id: int | str
    tokens: list[int]  # the tokens to compute, tokens[start:end] of the sequence
    start: int  # position of the first one
    pages: list[int]  # the sequence's page table (positions 0 .. end-1 live there)
    samples: bool


@dataclass(slots=True)
class Batch:
    chunks: list[Chunk] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # page copies to make first (forks)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: PagePool):
        self.config, self.pool = config, pool
        self._seqs: dict[int | str, _Seq] = {}
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []  # admission order
        self._admitted = 0
        self._copies: list[tuple[int, int]] = []  # page copies the next pass makes first (rewinds)
        self.preemptions = 0

    # -- requests --------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a request; refuse at once (GenerationError) one that could never run."""
        n = len(request.prompt)
        if request.seq_id in self._seqs:
            raise GenerationError(f"sequence id {request.seq_id!r} is already in use")
        if n == 0:
            raise GenerationError("the prompt is empty: give at least one token (e.g. the BOS token)")
        if request.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
        total = n + request.max_new_tokens
        if total > self.config.max_seq_len:
            raise GenerationError(
                f"the prompt ({n} tokens) plus max_new_tokens ({request.max_new_tokens}) exceeds the context of "
                f"{self.config.max_seq_len} tokens: shorten the prompt or ask for fewer tokens")
        if self.pool.pages_for(total) > self.pool.num_pages:
            raise GenerationError(
                f"a sequence of {total} tokens needs {self.pool.pages_for(total)} KV pages but the cache has "
                f"{self.pool.num_pages}: give the cache more memory or ask for fewer tokens")
        seq = _Seq(request, list(request.prompt), order=-1)
        self._seqs[request.seq_id] = seq
        self._waiting.append(seq)

    def finish(self, seq_id: int | str) -> None:
        """The generator saw a stop condition: release the sequence."""
        self._drop(seq_id)

    def cancel(self, seq_id: int | str) -> None:
        """Abandon a sequence in any state (e.g. its client went away); unknown ids are ignored."""
        if seq_id in self._seqs:
            self._drop(seq_id)

    def rewind(self, seq_id: int | str, n: int) -> None:
        """Forget the last n generated tokens of a sequence (a banned string appeared): its next token is
        sampled again after what remains. The last kept token is computed again to get its logits."""
        seq = self._seqs[seq_id]
        if not 0 < n <= seq.generated:
            raise ValueError(f"cannot rewind {n} tokens of a sequence with {seq.generated} generated")
        del seq.tokens[-n:]
        seq.generated -= n
        keep = len(seq.tokens) - 1
        seq.computed = min(seq.computed, keep)
        if seq.table is not None:
            try:
                self._copies += self.pool.truncate(seq.table, keep)
            except OutOfPages:
                self._preempt(seq)  # no page for the copy: recompute it later

    def tokens(self, seq_id: int | str) -> list[int]:
        return list(self._seqs[seq_id].tokens)

    def cached_tokens(self, seq_id: int | str) -> int:
        """Prompt tokens the sequence took from the prefix cache at its (last) admission."""
        table = self._seqs[seq_id].table
        return table.cached_tokens if table is not None else 0

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._running

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    # -- one step --------------------------------------------------------------------------------

    def schedule(self) -> Batch | None:
        """Plan one forward pass; None when there is nothing to do."""
        batch = Batch(copies=self._copies)
        self._copies = []
        budget = self.config.max_batch_tokens
        # 1. one token for every decoding sequence, preempting the newest when pages run out.
        for seq in sorted((s for s in self._running if s.state is State.DECODE), key=lambda s: s.order):
            if budget == 0:
                break
            if seq.state is not State.DECODE:  # preempted earlier in this loop
                continue
            if not self._grow(seq, seq.computed + 1):
                continue  # this sequence itself was preempted
            batch.chunks.append(self._chunk(seq, seq.computed, seq.computed + 1))
            budget -= 1
        # 2. prompt chunks of sequences already prefilling, oldest first.
        for seq in sorted((s for s in self._running if s.state is State.PREFILL), key=lambda s: s.order):
            if budget == 0:
                break
            end = min(len(seq.tokens), seq.computed + budget)
            batch.chunks.append(self._chunk(seq, seq.computed, end))
            budget -= end - seq.computed
        # 3. admit waiting sequences in order while their whole prompt fits.
        while budget > 0 and self._waiting and len(self._running) < self.config.max_seqs:
            seq = self._waiting[0]
            # Admit only with a page of headroom per running sequence, so the decodes of the next
            # steps do not at once preempt what was just admitted.
            headroom = self.pool.page_size * len(self._running)
            if not self.pool.can_open(seq.tokens, len(seq.tokens) + headroom):
                break  # keep arrival order: later, smaller requests do not overtake
            self._waiting.popleft()
            seq.table = self.pool.open(seq.tokens, len(seq.tokens))
            seq.computed = seq.table.cached_tokens
            seq.state, seq.order = State.PREFILL, self._admitted
            self._admitted += 1
            self._running.append(seq)
            end = min(len(seq.tokens), seq.computed + budget)
            batch.chunks.append(self._chunk(seq, seq.computed, end))
            budget -= end - seq.computed
        if not batch.chunks:
            self._copies = batch.copies  # still to do before the first pass that writes
            return None
        return batch

    def update(self, batch: Batch, sampled: dict[int | str, int]) -> list[int | str]:
        """Record a finished forward pass: every chunk's KV is now cached, and sampling chunks got
        a token (`sampled[seq_id]`). Returns the ids that reached max_new_tokens (released)."""
        done = []
        for chunk in batch.chunks:
            seq = self._seqs.get(chunk.seq_id)
            if seq is None or seq.table is None:
                continue  # cancelled while the pass ran
            seq.computed = chunk.start + len(chunk.tokens)
            if chunk.samples:
                seq.tokens.append(sampled[chunk.seq_id])
                seq.generated += 1
                seq.state = State.DECODE
            self.pool.commit(seq.table, seq.tokens[: seq.computed])
            if seq.generated >= seq.request.max_new_tokens:
                done.append(chunk.seq_id)
                self._drop(chunk.seq_id)
        return done

    def lookahead(self, batch: Batch) -> tuple[Batch, list[int]] | None:
        """The pass after `batch` planned before its tokens are known, so that the generator can queue it
        on the GPU while it reads them: one decode token for every sequence of `batch` that does not end
        with it (max_new_tokens), at the position after its chunk. Returns that batch, whose chunks hold a
        placeholder token 0 (the caller feeds the real ones on the device), and the indices of the chunks
        of `batch` it continues; or None when the next pass must be scheduled normally: requests waiting,
        running sequences outside `batch`, a chunk of it that does not sample, page copies pending, or a
        page missing (a lookahead never preempts). Record `batch` (update) before the lookahead's own
        pass; a sequence finished or cancelled in between is skipped by that update."""
        if self._waiting or self._copies or len(self._running) != len(batch.chunks):
            return None
        ahead, rows = Batch(), []
        for j, chunk in enumerate(batch.chunks):
            seq = self._seqs.get(chunk.seq_id)
            if seq is None or seq.table is None or not chunk.samples:
                return None
            if seq.generated + 1 >= seq.request.max_new_tokens:
                continue  # its token from `batch` is its last
            end = chunk.start + len(chunk.tokens)
            try:
                self.pool.grow(seq.table, end + 1)
            except OutOfPages:
                return None  # (pages already grown stay with their sequences: the next pass needs them)
            ahead.chunks.append(Chunk(seq.request.seq_id, [0], end, list(seq.table.pages), True))
            rows.append(j)
        return (ahead, rows) if ahead.chunks else None

    # -- internals -------------------------------------------------------------------------------

    def _chunk(self, seq: _Seq, start: int, end: int) -> Chunk:
        # Only the chunk that reaches the end of the known tokens yields the next token.
        return Chunk(seq.request.seq_id, seq.tokens[start:end], start, list(seq.table.pages), end == len(seq.tokens))

    def _grow(self, seq: _Seq, num_tokens: int) -> bool:
        """Pages for `num_tokens` tokens of `seq`, preempting the newest sequences as needed; False
        if `seq` itself had to go."""
        while True:
            try:
                self.pool.grow(seq.table, num_tokens)
                return True
            except OutOfPages:
                victim = max(self._running, key=lambda s: s.order)
                self._preempt(victim)
                if victim is seq:
                    return False

    def _preempt(self, seq: _Seq) -> None:
        self.pool.close(seq.table)
        seq.table, seq.computed, seq.state = None, 0, State.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self._running.remove(seq)
        self._waiting.appendleft(seq)  # first to come back; its tokens so far are its new prompt

    def _drop(self, seq_id: int | str) -> None:
        seq = self._seqs.pop(seq_id)
        if seq.table is not None:
            self.pool.close(seq.table)
            seq.table = None
        if seq in self._running:
            self._running.remove(seq)
        elif seq in self._waiting:
            self._waiting.remove(seq)
        seq.state = State.FINISHED
