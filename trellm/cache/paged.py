"""Paged KV tensors and the attention backend of a continuously batched forward pass.

Every layer's keys and values live in one preallocated tensor of pages
[num_pages + 1, page_size, num_kv_heads, head_dim]; which pages hold which sequence is the
page pool's business (cache/pages.py). The extra last page is scratch: rows that only pad a
batch (the fixed-size batches of captured CUDA graphs) write there and read from there.

One forward pass computes a flat batch: the chunks of several sequences (prompt pieces and
single decode tokens) concatenated along the token axis, B = 1. A `PagedStep` describes that
batch with device tensors — each token's cache slot, each sequence's page row, first position
and query rows — so that the same step object can live inside a CUDA graph. For each layer it
writes the new keys and values into their slots (or, on GPUs, lets the layer's RoPE kernel write
them: `kv_destination`) and attends over every sequence's prefix: the Triton kernel
(kernels/paged_attention.py) on GPUs, the torch reference elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trellm.layers.attention import AttentionParams, KVDestination, attention_mask, attention_ref
from trellm.layers.linear import Rotated
from trellm.models.config import ModelConfig

# Whether decode steps with key splits hand o_proj its input transform from the attention kernel
# (attend_rotated); TRELLM_ATTN_ROTATE=0 leaves it to o_proj's own had_in launch, for A/B timing.
ATTN_ROTATE = os.environ.get("TRELLM_ATTN_ROTATE", "1") == "1"


@dataclass(slots=True)
class Segment:
    """One sequence's tokens in a flat batch: rows [offset, offset + length) of the batch hold its
    positions start .. start + length - 1; `pages` hold positions 0 .. start + length - 1."""

    offset: int
    start: int
    length: int
    pages: Sequence[int]


class PagedKVCache:
    def __init__(self, cfg: ModelConfig, *, num_pages: int, page_size: int, device: torch.device | str,
                 dtype: torch.dtype):
        self.num_pages, self.page_size = num_pages, page_size
        self.scratch = num_pages  # index of the padding rows' page (outside the pool)
        self.device = torch.device(device)
        if self.device.type == "cuda" and page_size % 16:
            raise ValueError(f"page_size={page_size}: the CUDA attention kernel reads keys in blocks of at least 16 "
                             "tokens within a page; use a multiple of 16 (the generator's default is 256)")
        shape = (num_pages + 1, page_size, cfg.num_kv_heads, cfg.head_dim)  # [pages + scratch, page_size, Hkv, D]
        self.k = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(cfg.num_layers)]

    @staticmethod
    def pages_for_memory(cfg: ModelConfig, num_bytes: int, page_size: int, dtype: torch.dtype) -> int:
        """How many pages `num_bytes` of KV memory hold (the scratch page included)."""
        per_page = 2 * cfg.num_layers * page_size * cfg.num_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
        return num_bytes // per_page - 1

    def copy_pages(self, copies: Sequence[tuple[int, int]]) -> None:
        """Copy whole pages (source, destination) in every layer (forked sequences)."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for k, v in zip(self.k, self.v):
            k[dst] = k[src]
            v[dst] = v[src]

    def step(self, segments: Sequence[Segment]) -> PagedStep:
        """The backend for one forward pass over these segments."""
        ps = self.page_size
        slots: list[int] = []
        for s in segments:
            assert len(s.pages) * ps >= s.start + s.length, "a segment's pages do not reach its last position"
            slots += (s.pages[p // ps] * ps + p % ps for p in range(s.start, s.start + s.length))
        width = max(len(s.pages) for s in segments)
        table = [list(s.pages) + [self.scratch] * (width - len(s.pages)) for s in segments]
        offsets = [0]
        for s in segments:
            offsets.append(offsets[-1] + s.length)
        dev = self.device
        return PagedStep(
            self,
            slots=torch.tensor(slots, dtype=torch.long, device=dev),
            block_table=torch.tensor(table, dtype=torch.int32, device=dev),
            q_start=torch.tensor([s.start for s in segments], dtype=torch.int32, device=dev),
            q_offsets=torch.tensor(offsets, dtype=torch.int32, device=dev),
            max_q_len=max(s.length for s in segments),
            segments=segments,
        )


class PagedStep:
    """Where one flat batch's tokens go and what each attends to, as device tensors:
    slots [T] (page · page_size + offset of each token), block_table [N, W] int32 (each sequence's
    pages, padded with the scratch page), q_start [N] int32 (first position), q_offsets [N+1] int32
    (query rows). max_q_len and splits are launch constants. `segments` (the same as host lists) are
    what the torch reference runs on: required off the GPU (the CUDA graphs' steps have none)."""

    def __init__(self, cache: PagedKVCache, *, slots: torch.Tensor, block_table: torch.Tensor, q_start: torch.Tensor,
                 q_offsets: torch.Tensor, max_q_len: int, splits: int | None = None,
                 segments: Sequence[Segment] | None = None):
        self.cache, self.slots, self.block_table = cache, slots, block_table
        self.q_start, self.q_offsets, self.max_q_len = q_start, q_offsets, max_q_len
        self.segments = list(segments) if segments is not None else None
        self.use_kernel = cache.device.type == "cuda"
        if splits is None:
            splits = 1
            if self.use_kernel and max_q_len == 1:
                from trellm.kernels.paged_attention import decode_splits

                splits = decode_splits(q_start.shape[0], cache.k[0].shape[2], cache.device)
        self.splits = splits
        # Off the GPU (torch reference, needs `segments`): masks per (segment, window) and each segment's
        # key slots, made by the first layer and reused by the others.
        self._masks: dict[tuple[int, int | None], torch.Tensor | None] = {}
        self._reads: list[torch.Tensor] = []

    def kv_destination(self, layer_idx: int) -> KVDestination:
        """The layer's caches as rows [pages · page_size, Hkv, D] and each token's row (its slot)."""
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]  # [pages, page_size, Hkv, D]
        return KVDestination(kc.view(-1, *kc.shape[2:]), vc.view(-1, *vc.shape[2:]), self.slots)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               params: AttentionParams, *, kv_stored: bool = False) -> torch.Tensor:
        """q [1, T, H, D], k/v [1, T, Hkv, D] of the flat batch -> [1, T, H, D]; kv_stored: the caller
        already wrote k and v to kv_destination(layer_idx)."""
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]  # [pages, page_size, Hkv, D]
        if not kv_stored:
            kc.view(-1, *k.shape[2:]).index_copy_(0, self.slots, k[0])
            vc.view(-1, *v.shape[2:]).index_copy_(0, self.slots, v[0])
        if self.use_kernel:
            from trellm.kernels.paged_attention import paged_attention

            return paged_attention(q[0], kc, vc, self.block_table, self.q_start, self.q_offsets, params,
                                   max_q_len=self.max_q_len, splits=self.splits)[None]
        return segment_attention(q, kc, vc, self.segments, params, self._reads, self._masks)

    def attend_rotated(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       params: AttentionParams, rotate: torch.Tensor) -> tuple[torch.Tensor, Rotated | None]:
        """attend (k and v already stored) and, where the kernel can (kernels/paged_attention.can_rotate),
        the consuming linears' input transform of the output for their suh `rotate` [G, H·D]:
        (out, (x' [G, T, H·D], block sums)) or (out, None)."""
        if self.use_kernel and ATTN_ROTATE:
            from trellm.kernels.paged_attention import can_rotate, paged_attention

            if can_rotate(q.shape[2], q.shape[3], self.splits, rotate):
                kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]
                out, rotated = paged_attention(q[0], kc, vc, self.block_table, self.q_start, self.q_offsets, params,
                                               max_q_len=self.max_q_len, splits=self.splits, rotate=rotate)
                return out[None], rotated
        return self.attend(layer_idx, q, k, v, params, kv_stored=True), None


def segment_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, segments: Sequence[Segment],
                      params: AttentionParams, reads: list[torch.Tensor] | None = None,
                      masks: dict[tuple[int, int | None], torch.Tensor | None] | None = None) -> torch.Tensor:
    """The torch reference of paged attention: q [1, T, H, D] of a flat batch, caches [pages, page_size,
    Hkv, D] already holding this pass's keys and values -> [1, T, H, D]; each segment attends over its
    prefix read back from its pages. `reads` (key slots per segment) and `masks` are filled on first use
    and may be passed again for the next layer of the same pass."""
    ps = k_cache.shape[1]
    kf, vf = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
    reads = reads if reads is not None else []
    masks = masks if masks is not None else {}
    if not reads:
        for s in segments:
            pos = torch.arange(s.start + s.length)
            pages = torch.as_tensor(list(s.pages), dtype=torch.long)
            reads.append((pages[pos // ps] * ps + pos % ps).to(k_cache.device))
    out = []
    for i, s in enumerate(segments):
        keys, values = kf[reads[i]][None], vf[reads[i]][None]  # [1, end, Hkv, D]
        key = (i, params.window)
        if key not in masks:
            masks[key] = attention_mask(s.start, s.length, s.start + s.length, params.window, q.device)
        out.append(attention_ref(q[:, s.offset : s.offset + s.length], keys, values, s.start, params, masks[key]))
    return torch.cat(out, dim=1)
