"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of a batch-1 8B model is over a thousand small kernels; launched one by one from
Python they take longer than the GPU needs to run them. Captured once into a CUDA graph per bucket
(1, 2, 4, 8, 16, 24, 32, ...), a step is one host→device copy of the packed inputs and one replay.

Everything the step reads lives in one static int64 buffer per bucket: token ids, positions, cache
slots, first positions and the page table; the graph itself casts and slices it, so a step copies
one tensor. Rows beyond the live batch pad with token 0 at position 0 in the cache's scratch page,
which no sequence owns. Graphs are captured lazily, the first time a bucket is needed (after two
eager warm-up passes that compile the Triton kernels), and share one memory pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trellm.cache.paged import PagedKVCache, PagedStep
from trellm.models.decoder import DecoderModel

BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass(slots=True)
class _Captured:
    graph: torch.cuda.CUDAGraph
    packed: torch.Tensor  # int64 [B * 4 + B * width] on the device: the graph's only input
    staging: torch.Tensor  # the same, pinned on the host
    logits: torch.Tensor  # float32 [B, vocab]: the graph's output
    copied: torch.cuda.Event  # the last copy out of `staging` is done (it may be refilled)


class DecodeGraphs:
    def __init__(self, model: DecoderModel, cache: PagedKVCache, *, max_seq_len: int, max_seqs: int):
        self.model, self.cache, self.max_seq_len = model, cache, max_seq_len
        self.width = -(-max_seq_len // cache.page_size)  # page-table columns: a full-length sequence
        self.buckets = [b for b in BUCKETS if b < max_seqs] + [max_seqs]
        self._graphs: dict[int, _Captured] = {}
        self._pool = None

    def bucket(self, n: int) -> int | None:
        """The smallest captured batch size that holds n sequences, or None (run eagerly)."""
        return next((b for b in self.buckets if b >= n), None)

    def run(self, tokens: Sequence[int], positions: Sequence[int], pages: Sequence[Sequence[int]],
            device_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """One decode token per sequence -> float32 logits [n, vocab]. The result is the graph's output
        buffer: valid until the next run. device_tokens (int64 [n] on the device, e.g. the tokens the
        previous step sampled, not yet seen by the host) replaces `tokens`."""
        n = len(tokens)
        b = self.bucket(n)
        assert b is not None, "batch larger than the largest bucket"
        cap = self._graphs.get(b) or self._capture(b)
        # Normally long done: the copy ran before the previous replay of this bucket, which the host
        # has waited for or (a step queued ahead) which the GPU has at least begun.
        cap.copied.synchronize()
        cap.staging.copy_(torch.tensor(self._pack(tokens, positions, pages, b), dtype=torch.int64))
        cap.packed.copy_(cap.staging, non_blocking=True)
        cap.copied.record()
        if device_tokens is not None:
            cap.packed[:n].copy_(device_tokens)
        cap.graph.replay()
        return cap.logits[:n]

    def capture_all(self) -> None:
        """Capture every bucket's graph now (a server's start) instead of on first use."""
        for b in self.buckets:
            if b not in self._graphs:
                self._capture(b)

    def _pack(self, tokens: Sequence[int], positions: Sequence[int], pages: Sequence[Sequence[int]],
              b: int) -> list[int]:
        """The packed input of bucket b: ids, positions, slots, first positions [b] each, then the page
        table [b, width]; rows past the live ones are padding in the scratch page."""
        ps, scratch, w = self.cache.page_size, self.cache.scratch, self.width
        slots = [p[pos // ps] * ps + pos % ps for p, pos in zip(pages, positions)]
        table: list[int] = []
        for p in pages:
            table += p
            table += [scratch] * (w - len(p))
        pad = b - len(tokens)
        return [*tokens, *[0] * pad, *positions, *[0] * pad, *slots, *[scratch * ps] * pad,
                *positions, *[0] * pad, *table, *[scratch] * (pad * w)]

    def _forward(self, packed: torch.Tensor, b: int) -> torch.Tensor:
        """The captured work: unpack the inputs, run the model (flat batch of b decode tokens)."""
        ids, pos, slots, starts = packed[:b], packed[b : 2 * b], packed[2 * b : 3 * b], packed[3 * b : 4 * b]
        table = packed[4 * b :].view(b, self.width).to(torch.int32)
        offsets = torch.arange(b + 1, device=packed.device, dtype=torch.int32)
        step = PagedStep(self.cache, slots=slots, block_table=table, q_start=starts.to(torch.int32),
                         q_offsets=offsets, max_q_len=1)
        return self.model(ids[None], pos[None], step, max_seq_len=self.max_seq_len)[0]

    def _capture(self, b: int) -> _Captured:
        dev = self.cache.device
        # Until the first real step fills it, the buffer describes b padding rows (scratch page only).
        packed = torch.tensor(self._pack([], [], [], b), dtype=torch.int64, device=dev)
        staging = torch.empty(packed.shape, dtype=torch.int64, pin_memory=True)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # compile kernels, build launch plans, grow tables outside the capture
                self._forward(packed, b)
        torch.cuda.current_stream(dev).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(packed, b)
        done = torch.cuda.Event()
        done.record()
        cap = self._graphs[b] = _Captured(graph, packed, staging, logits, done)
        return cap
