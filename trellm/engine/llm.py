"""LLM: a loaded model with its tokenizer and defaults — the simplest way to generate text.

    from trellm import LLM
    llm = LLM("path/to/model")
    print(llm.generate("The capital of France is", max_new_tokens=20))
    for piece in llm.stream([{"role": "user", "content": "Hi!"}]):
        print(piece, end="", flush=True)
    for out in llm.generate_many(["Once upon", "In 1969"], max_new_tokens=50):   # one continuous batch
        print(out.text)
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trellm.cache.pages import PAGE_SIZE
from trellm.engine.generate import GenerationRequest, GenerationStats, generate_tokens
from trellm.engine.generator import Generator, Job
from trellm.engine.sampling import SamplingParams
from trellm.io.hf_folder import read_generation_config
from trellm.io.tokenizer import IncrementalDetokenizer, Tokenizer
from trellm.models.loader import load_model

Prompt = str | list[dict[str, Any]]  # plain text, or chat messages
STREAM_CACHE_TOKENS = 8192  # KV cache of `stream`'s generator (longer requests take the simple loop)


@dataclass(slots=True)
class Completion:
    text: str  # the stop token is not shown
    prompt_tokens: int
    completion_tokens: int  # the stop token included, if hit
    finish_reason: str  # "stop" or "length"
    seconds: float  # from the start of the batch to this completion's last token

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


class LLM:
    def __init__(self, path: str | Path, *, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, engine: str | None = None):
        """engine: "generator" runs `stream` through the batched generator (paged KV, CUDA-graph decode,
        prefix reuse across calls — a chat's earlier turns are not recomputed), "simple" through the
        one-sequence reference loop; default: the generator on CUDA, the simple loop on CPU."""
        self.path = Path(path)
        self.model = load_model(self.path, device=device, dtype=dtype)
        if engine not in (None, "generator", "simple"):
            raise ValueError(f"engine must be 'generator' or 'simple', got {engine!r}")
        self.engine = engine or ("generator" if self.model.device.type == "cuda" else "simple")
        self._generator: Generator | None = None  # made on first use, kept for its KV cache and graphs
        self.tokenizer = Tokenizer.from_folder(self.path)
        self.config = self.model.config
        self.generation_config = read_generation_config(self.path)
        self.stop_token_ids = sorted(set(self.config.eos_token_ids) | (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()))

    def default_sampling(self) -> SamplingParams:
        """The sampling the model's generation_config.json asks for; greedy if it does not ask to sample."""
        g = self.generation_config
        if not g.get("do_sample"):
            return SamplingParams()
        return SamplingParams(temperature=float(g.get("temperature", 1.0)), top_k=int(g.get("top_k") or 0),
                              top_p=float(g.get("top_p") or 1.0))

    def encode_prompt(self, prompt: Prompt, *, chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """Token ids of a plain prompt (with the tokenizer's BOS rules) or of chat messages (through the template)."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return self.tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, chat_template_kwargs=chat_template_kwargs
        )

    def stream(self, prompt: Prompt, *, max_new_tokens: int = 256, sampling: SamplingParams | None = None,
               stats: GenerationStats | None = None, chat_template_kwargs: dict[str, Any] | None = None
               ) -> Iterator[str]:
        """Yield text pieces as they are generated (never a broken UTF-8 character); the stop token is not shown."""
        request = GenerationRequest(
            prompt_ids=self.encode_prompt(prompt, chat_template_kwargs=chat_template_kwargs),
            max_new_tokens=max_new_tokens,
            sampling=sampling if sampling is not None else self.default_sampling(),
            stop_token_ids=self.stop_token_ids,
        )
        if self.engine == "generator":
            gen = self._get_generator()
            n = len(request.prompt_ids)
            # Both paths stop at the model's context; beyond the generator's shorter limit (its cache, or
            # longrope's switch length) the simple loop takes the request.
            if n < gen.max_seq_len and (n + max_new_tokens <= gen.max_seq_len
                                        or gen.max_seq_len == self.config.max_position_embeddings):
                yield from self._stream_generator(gen, request, stats if stats is not None else GenerationStats())
                return
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=False)
        stop = set(self.stop_token_ids)
        for tok in generate_tokens(self.model, request, stats):
            if tok in stop:
                break
            piece = detok.add(tok)
            if piece:
                yield piece
        tail = detok.flush()
        if tail:
            yield tail

    def _get_generator(self) -> Generator:
        if self._generator is None:
            # One sequence at a time, a cache for a long conversation (capped: 128k-token models would
            # otherwise reserve tens of GB); longer requests take the simple loop.
            tokens = min(self.config.max_position_embeddings, STREAM_CACHE_TOKENS)
            self._generator = Generator(self.model, tokenizer=self.tokenizer, max_seq_len=tokens,
                                        cache_tokens=tokens + PAGE_SIZE, max_seqs=1)
        return self._generator

    def _stream_generator(self, gen: Generator, request: GenerationRequest, stats: GenerationStats) -> Iterator[str]:
        job_id = gen.enqueue(Job(request.prompt_ids, max_new_tokens=request.max_new_tokens, sampling=request.sampling,
                                 stop_token_ids=request.stop_token_ids))
        stats.prompt_tokens, stats.completion_tokens = len(request.prompt_ids), 0
        t0, first, finished = time.perf_counter(), None, False
        try:
            while not finished:
                for r in gen.iterate():
                    if r.job_id != job_id:
                        continue
                    now = time.perf_counter()
                    if first is None:
                        first, stats.prefill_seconds = now, now - t0
                    else:
                        stats.decode_seconds = now - first
                    stats.completion_tokens += len(r.new_token_ids)
                    finished = r.finished
                    if finished:
                        stats.finish_reason = r.finish_reason
                    if r.text:
                        yield r.text
        finally:
            if not finished:  # the caller stopped early (Ctrl-C in a chat): free the job's pages
                gen.cancel(job_id)

    def generate(self, prompt: Prompt, **kwargs: Any) -> str:
        return "".join(self.stream(prompt, **kwargs))

    def generate_many(self, prompts: Sequence[Prompt], *, max_new_tokens: int = 256,
                      sampling: SamplingParams | None = None, chat_template_kwargs: dict[str, Any] | None = None,
                      max_batch_tokens: int = 2048) -> list[Completion]:
        """All prompts as one continuous batch (engine/generator.py); completions in prompt order."""
        ids = [self.encode_prompt(p, chat_template_kwargs=chat_template_kwargs) for p in prompts]
        ctx = self.config.max_position_embeddings
        # A KV cache just large enough for the whole batch: no preemption, no idle memory.
        cache_tokens = sum(min(len(p) + max_new_tokens, ctx) for p in ids) + PAGE_SIZE * len(ids)
        gen = Generator(self.model, tokenizer=self.tokenizer, cache_tokens=cache_tokens,
                        max_batch_tokens=max_batch_tokens, max_seqs=max(1, len(ids)))
        sampling = sampling if sampling is not None else self.default_sampling()
        jobs = [Job(p, max_new_tokens=max_new_tokens, sampling=sampling, stop_token_ids=self.stop_token_ids,
                    identifier=i) for i, p in enumerate(ids)]
        texts: list[list[str]] = [[] for _ in ids]  # the generator's text leaves the stop token out
        counts, done = [0] * len(ids), {}
        t0 = time.perf_counter()
        for job in jobs:
            gen.enqueue(job)
        for r in gen.stream():
            texts[r.identifier].append(r.text)
            counts[r.identifier] += len(r.new_token_ids)
            if r.finished:
                done[r.identifier] = (r.finish_reason, time.perf_counter() - t0)
        out = []
        for i, pieces in enumerate(texts):
            reason, seconds = done[i]
            out.append(Completion("".join(pieces), len(ids[i]), counts[i], reason, seconds))
        return out
