"""Paged KV tensors and the attention backend of a continuously batched forward pass.

Every layer's keys and values live in one preallocated tensor of pages
[num_pages, page_size, num_kv_heads, head_dim]; which pages hold which sequence is the
page pool's business (cache/pages.py). One forward pass computes a flat batch: the
chunks of several sequences (prompt pieces and single decode tokens) concatenated along
the token axis, B = 1. For each chunk the backend writes the new keys and values into
the sequence's pages and attends over the sequence's whole prefix read back from its
pages. This is the torch reference of paged attention (any device); the Triton kernels
of issue 5 replace the gather + attention_ref pair on GPUs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trellm.layers.attention import AttentionParams, attention_mask, attention_ref
from trellm.models.config import ModelConfig


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
        self.device = torch.device(device)
        shape = (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)  # [num_pages, page_size, Hkv, D]
        self.k = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(cfg.num_layers)]

    @staticmethod
    def pages_for_memory(cfg: ModelConfig, num_bytes: int, page_size: int, dtype: torch.dtype) -> int:
        """How many pages `num_bytes` of KV memory hold."""
        per_page = 2 * cfg.num_layers * page_size * cfg.num_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
        return num_bytes // per_page

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
        return PagedStep(self, segments)


class PagedStep:
    def __init__(self, cache: PagedKVCache, segments: Sequence[Segment]):
        self.cache, self.segments = cache, list(segments)
        ps, dev = cache.page_size, cache.device
        self._write, self._read = [], []  # flat slot indices (page · page_size + offset) per segment
        for s in self.segments:
            end = s.start + s.length
            assert len(s.pages) * ps >= end, "a segment's pages do not reach its last position"
            pos = torch.arange(end)
            slots = torch.as_tensor(list(s.pages), dtype=torch.long)[pos // ps] * ps + pos % ps  # [end]
            self._read.append(slots.to(dev))
            self._write.append(slots[s.start :].to(dev))
        self._masks: dict[tuple[int, int | None], torch.Tensor | None] = {}  # (segment, window), shared by layers

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               params: AttentionParams) -> torch.Tensor:
        """q [1, T, H, D], k/v [1, T, Hkv, D] of the flat batch -> [1, T, H, D]."""
        kc = self.cache.k[layer_idx].view(-1, *k.shape[2:])  # [num_pages · page_size, Hkv, D]
        vc = self.cache.v[layer_idx].view(-1, *v.shape[2:])
        out = []
        for i, s in enumerate(self.segments):
            rows = slice(s.offset, s.offset + s.length)
            kc[self._write[i]] = k[0, rows]
            vc[self._write[i]] = v[0, rows]
            keys, values = kc[self._read[i]][None], vc[self._read[i]][None]  # [1, end, Hkv, D]
            key = (i, params.window)
            if key not in self._masks:
                self._masks[key] = attention_mask(s.start, s.length, s.start + s.length, params.window, q.device)
            out.append(attention_ref(q[:, rows], keys, values, s.start, params, self._masks[key]))
        return torch.cat(out, dim=1)
