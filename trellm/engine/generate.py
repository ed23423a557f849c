"""The simple generate path: one prompt (or a few of equal length) at a time, contiguous KV cache.

The generator of a later milestone (paged cache, continuous batching) replaces this
for serving; this path stays as the reference it is tested against.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from trellm.cache.contiguous import ContiguousKVCache
from trellm.engine.sampling import SamplingParams, sample
from trellm.errors import GenerationError
from trellm.models.decoder import DecoderModel


@dataclass(slots=True)
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = ""  # "stop" (a stop token) or "length"

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first over the time spent producing them."""
        n = self.completion_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


@dataclass(slots=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: Sequence[int] = ()


def generate_tokens(
    model: DecoderModel, request: GenerationRequest, stats: GenerationStats | None = None
) -> Iterator[int]:
    """Yield generated token ids one by one (the stop token, if hit, is yielded last)."""
    prompt = list(request.prompt_ids)
    ctx = model.config.max_position_embeddings
    if not prompt:
        raise GenerationError("the prompt is empty: give at least one token")
    if len(prompt) >= ctx:
        raise GenerationError(
            f"the prompt has {len(prompt)} tokens but the model's context is {ctx}; shorten the prompt"
        )
    if request.max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
    vocab = model.config.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise GenerationError(f"prompt token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
    max_new = min(request.max_new_tokens, ctx - len(prompt))
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt)
    device = model.device
    cache = ContiguousKVCache(model.config, batch_size=1, max_len=len(prompt) + max_new, device=device,
                              dtype=model.dtype)
    gen = None
    if request.sampling.seed is not None and not request.sampling.greedy:
        gen = torch.Generator().manual_seed(request.sampling.seed)  # CPU: one key per step (sampling.py)
    stop = set(request.stop_token_ids)
    switch = model.config.rope_switch_length()
    tokens = list(prompt)

    t0 = time.perf_counter()
    ids = torch.tensor([prompt], device=device)  # [1, T]
    positions = torch.arange(len(prompt), device=device)[None]  # [1, T]
    for i in range(max_new):
        if switch is not None and cache.length <= switch < cache.length + ids.shape[1] and cache.length:
            # Crossing longrope's switch point: recompute every key with the long factors.
            cache.reset()
            ids = torch.tensor([tokens], device=device)
            positions = torch.arange(len(tokens), device=device)[None]
        logits = model(ids, positions, cache.step(ids.shape[1]), max_seq_len=cache.length, last_only=True)
        history = ([tokens], [tokens[len(prompt):]]) if request.sampling.uses_history else (None, None)
        token = sample(logits[:, -1], request.sampling, gen, *history)  # [1]
        tok = int(token.item())  # the host needs the token to stream it, so this sync is inherent
        now = time.perf_counter()
        if i == 0:
            stats.prefill_seconds = now - t0
            t_first = now
        else:
            stats.decode_seconds = now - t_first
        stats.completion_tokens = i + 1
        tokens.append(tok)
        if tok in stop:
            # Set before yielding: a consumer that stops at the stop token never resumes us.
            stats.finish_reason = "stop"
            yield tok
            return
        if i == max_new - 1:
            stats.finish_reason = "length"
        yield tok
        ids = token[:, None]
        positions = torch.tensor([[cache.length]], device=device)
