"""A simple contiguous KV cache: one [B, Hkv, max_len, D] tensor pair per layer.

Enough for one batch of sequences that advance together (same length); the paged,
batched cache of the generator replaces it behind the same AttentionBackend interface.
"""

from __future__ import annotations

import torch

from trellm.errors import GenerationError
from trellm.layers.attention import AttentionParams, attention_mask, attention_ref
from trellm.models.config import ModelConfig


class ContiguousKVCache:
    def __init__(self, cfg: ModelConfig, *, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)  # [B, Hkv, max_len, D]
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.batch_size, self.max_len = batch_size, max_len
        self.length = 0  # tokens stored per sequence

    def step(self, num_tokens: int) -> _Step:
        """Reserve the next `num_tokens` positions; the returned backend serves one forward pass."""
        if self.length + num_tokens > self.max_len:
            raise GenerationError(
                f"KV cache full: {self.length} + {num_tokens} tokens exceed its {self.max_len} positions"
            )
        start = self.length
        self.length += num_tokens
        return _Step(self, start, num_tokens)

    def reset(self) -> None:
        self.length = 0


class _Step:
    def __init__(self, cache: ContiguousKVCache, start: int, num_tokens: int):
        self.cache, self.start, self.end = cache, start, start + num_tokens
        self._masks: dict[int | None, torch.Tensor | None] = {}  # by window: shared by all layers of the step

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: AttentionParams
    ) -> torch.Tensor:
        ck, cv = self.cache.k[layer_idx], self.cache.v[layer_idx]
        ck[:, :, self.start : self.end] = k.transpose(1, 2)
        cv[:, :, self.start : self.end] = v.transpose(1, 2)
        keys = ck[:, :, : self.end].transpose(1, 2)  # [B, S, Hkv, D]
        values = cv[:, :, : self.end].transpose(1, 2)
        if params.window not in self._masks:
            self._masks[params.window] = attention_mask(self.start, self.end - self.start, self.end, params.window,
                                                        q.device)
        return attention_ref(q, keys, values, self.start, params, self._masks[params.window])
