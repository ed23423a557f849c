"""The continuously batched generator: many jobs of any length in one stream of forward passes.

    gen = Generator(model)
    job_id = gen.enqueue(Job(prompt_ids, max_new_tokens=64, sampling=SamplingParams(...)))
    while gen.busy:
        for result in gen.iterate():      # one forward pass; incremental results
            ... result.new_token_ids, result.finished, result.finish_reason ...

Each `iterate()` asks the scheduler (engine/scheduler.py) for the next batch (decode tokens
of running jobs + prompt chunks, within the token budget), runs it as one flat forward pass
through the paged KV cache (cache/paged.py), samples a token for every job whose chunk
reached its end, and reports it. Jobs join and leave between passes; shared prompt prefixes
are computed once (cache/pages.py). On a GPU decode-only passes replay CUDA graphs
(engine/cuda_graphs.py) and attention runs through the Triton paged kernel; elsewhere the same
passes run the torch references.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from trellm.cache.paged import PagedKVCache, Segment
from trellm.cache.pages import PAGE_SIZE, PagePool
from trellm.engine.constraints import Constraint, ConstraintCompiler, Matcher
from trellm.engine.sampling import SamplingParams, sample_batch
from trellm.engine.scheduler import Batch, Request, Scheduler, SchedulerConfig
from trellm.errors import GenerationError
from trellm.io.tokenizer import IncrementalDetokenizer, Tokenizer
from trellm.models.decoder import DecoderModel

CPU_CACHE_TOKENS = 65536  # KV cache of a CPU generator unless told (GPUs size it from free memory)
GPU_MEMORY_FRACTION = 0.85  # of the free device memory the KV cache takes by default
# Whether a GPU generator queues each decode pass before reading the previous pass's tokens (Generator's
# overlap; see iterate). Off until it has run on a GPU (its logic is tested on the CPU): TRELLM_OVERLAP=1.
OVERLAP = os.environ.get("TRELLM_OVERLAP", "0") == "1"


@dataclass(slots=True)
class Job:
    prompt_ids: Sequence[int]
    max_new_tokens: int = 256  # capped to what the context leaves after the prompt
    min_new_tokens: int = 0  # stop tokens are banned until this many tokens exist
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()  # needs the generator's tokenizer; the text is cut before the match
    # Strings the output must never contain (needs the tokenizer): when one appears, the job goes back to
    # the token where it began and samples again with that token banned there. Tokens and text that may
    # still become one are held back until they cannot.
    banned_strings: Sequence[str] = ()
    logprobs: int = 0  # also return the log-probabilities of the sampled token and of the top `logprobs`
    constraint: Constraint | None = None  # JSON schema / regex / Lark grammar the output must follow
    identifier: Any = None  # returned with every result


@dataclass(slots=True)
class JobResult:
    job_id: int
    identifier: Any
    new_token_ids: list[int]  # tokens since the last result (the stop token included, if hit)
    text: str = ""  # new text (with a tokenizer): held back while it may be the start of a stop string
    finished: bool = False
    finish_reason: str | None = None  # "stop" (stop token or string) or "length" (max_new_tokens)
    # Per new token, with Job.logprobs: (its log-probability, [(token, log-probability)] of the most
    # likely tokens), from the model's distribution before any sampling filter.
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    cached_tokens: int | None = None  # on a job's first result: prompt tokens reused from the prefix cache


@dataclass(slots=True)
class _Running:
    job: Job
    rng: torch.Generator | None
    stop: frozenset[int]
    detok: IncrementalDetokenizer | None
    matcher: Matcher | None = None
    generated: list[int] = field(default_factory=list)
    pending: str = ""  # decoded text not yet returned (a stop string may be starting)
    # With banned strings: (token, its text, its logprobs) not yet returned, and the tokens banned at
    # a position of `generated` after rewinds.
    held: list[tuple[int, str, Any]] = field(default_factory=list)
    banned_at: dict[int, set[int]] = field(default_factory=dict)
    cached: int | None = None  # prompt tokens from the prefix cache, for the first returned result
    returned: int = 0  # tokens returned so far


@dataclass(slots=True)
class _Pass:
    """A forward pass whose tokens are sampled (or queued to be) but not yet recorded."""
    batch: Batch
    samplers: list[int]  # the job of each token
    tokens: torch.Tensor | None  # int64 [len(samplers)] on the model's device
    host: torch.Tensor | None  # their copy on the host, complete once `ready` is; (no event:) or `tokens`
    ready: torch.cuda.Event | None
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # host: chosen [n], top ids / values [n, k]


def _to_host(t: torch.Tensor, pinned: bool) -> torch.Tensor:
    """Queue a copy of a device tensor into pinned host memory (no wait); as it is without `pinned` (the
    caller's .tolist() then waits for it) or on a CPU."""
    if not (pinned and t.is_cuda):
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def first_match(text: str, strings: Sequence[str]) -> int:
    """Where the earliest of `strings` begins in text, or -1."""
    return min((i for i in (text.find(s) for s in strings) if i >= 0), default=-1)


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (may still become one)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class Generator:
    def __init__(self, model: DecoderModel, *, tokenizer: Tokenizer | None = None, max_seq_len: int | None = None,
                 cache_tokens: int | None = None, page_size: int = PAGE_SIZE, max_batch_tokens: int = 2048,
                 max_seqs: int = 64, cuda_graphs: bool = True, overlap: bool | None = None):
        cfg = model.config
        self.model, self.tokenizer = model, tokenizer
        limit = cfg.max_position_embeddings
        switch = cfg.rope_switch_length()
        if switch is not None:
            # Longrope picks its factors from the sequence length; a flat batch has one length for
            # all its sequences, so keep every sequence on the short side of the switch.
            limit = min(limit, switch)
        self.max_seq_len = min(max_seq_len or limit, limit)
        if cache_tokens is None:
            if model.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(model.device)
                pages = PagedKVCache.pages_for_memory(cfg, int(free * GPU_MEMORY_FRACTION), page_size, model.dtype)
            else:
                pages = -(-CPU_CACHE_TOKENS // page_size)
        else:
            pages = -(-cache_tokens // page_size)
        pages = max(pages, -(-self.max_seq_len // page_size))  # at least one full-length sequence
        self.pool = PagePool(pages, page_size)
        self.cache = PagedKVCache(cfg, num_pages=pages, page_size=page_size, device=model.device, dtype=model.dtype)
        self.scheduler = Scheduler(SchedulerConfig(self.max_seq_len, max_batch_tokens, max_seqs), self.pool)
        # Decode-only passes replay captured CUDA graphs (engine/cuda_graphs.py); the rest run eagerly.
        self.graphs = None
        if cuda_graphs and model.device.type == "cuda":
            from trellm.engine.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, self.cache, max_seq_len=self.max_seq_len, max_seqs=max_seqs)
        self._jobs: dict[int, _Running] = {}
        # Queue decode passes ahead of the host (iterate): by default on a GPU where OVERLAP says so (the
        # host's work of a step otherwise leaves the GPU idle); a CPU computes the passes in turn either way.
        self.overlap = OVERLAP and model.device.type == "cuda" if overlap is None else overlap
        self._inflight: _Pass | None = None  # a pass queued ahead, recorded by the next iterate
        self.passes_ahead = 0  # passes queued before the previous pass's tokens were read (overlap)
        self._ids = itertools.count()
        self._compiler: ConstraintCompiler | None = None  # made on the first constrained job
        self.cancelled = 0  # jobs cancelled before they finished
        self.rewinds = 0  # times a banned string sent a job back

    # -- jobs ------------------------------------------------------------------------------------

    def enqueue(self, job: Job) -> int:
        """Queue a job; returns its id. Raises GenerationError (and queues nothing) for a bad job."""
        prompt = list(job.prompt_ids)
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"prompt token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
        if len(prompt) >= self.max_seq_len:
            raise GenerationError(f"the prompt has {len(prompt)} tokens but the context is {self.max_seq_len}; "
                                  "shorten the prompt")
        if job.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {job.max_new_tokens}")
        if not 0 <= job.min_new_tokens <= job.max_new_tokens:
            raise GenerationError(f"min_new_tokens must be in [0, max_new_tokens], got {job.min_new_tokens}")
        if job.stop_strings and self.tokenizer is None:
            raise GenerationError("stop strings need text: create the Generator with tokenizer=...")
        if any(not stop for stop in job.stop_strings):
            raise GenerationError("stop strings must not be empty")
        if job.banned_strings and self.tokenizer is None:
            raise GenerationError("banned strings need text: create the Generator with tokenizer=...")
        if any(not b for b in job.banned_strings):
            raise GenerationError("banned strings must not be empty")
        if not 0 <= job.logprobs <= 20:
            raise GenerationError(f"logprobs must be in [0, 20], got {job.logprobs}")
        matcher = None
        if job.constraint is not None:
            if self.tokenizer is None:
                raise GenerationError("constrained output needs text: create the Generator with tokenizer=...")
            if self._compiler is None:
                self._compiler = ConstraintCompiler(self.tokenizer, self.model.config.vocab_size,
                                                    sorted(set(job.stop_token_ids)))
            matcher = self._compiler.matcher(job.constraint)
        job_id = next(self._ids)
        max_new = min(job.max_new_tokens, self.max_seq_len - len(prompt))
        self.scheduler.add(Request(job_id, prompt, max_new))
        rng = None
        if job.sampling.seed is not None and not job.sampling.greedy:
            rng = torch.Generator().manual_seed(job.sampling.seed)  # CPU: one key per step (sampling.py)
        detok = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
        self._jobs[job_id] = _Running(job, rng, frozenset(job.stop_token_ids), detok, matcher)
        return job_id

    def warmup(self) -> None:
        """Compile the GPU kernels and capture every decode graph now rather than in the first requests'
        time to first token (a new prompt length class, e.g. a multiple of 16, compiles its own kernel
        variants: ~2 s of an 8B model's first 128-token request on an H200). No-op on the CPU; run it
        while no other job is queued."""
        if self.model.device.type != "cuda":
            return
        vocab = self.model.config.vocab_size
        for n in (1, 2, 9, 16, 17, 64, 200):  # decode, the small-batch GEMV range, both sides of 16, prefill
            if n < self.max_seq_len:
                self.generate([Job([i % vocab for i in range(n)], max_new_tokens=2)])
        if self.graphs is not None:
            self.graphs.capture_all()

    def cancel(self, job_id: int) -> None:
        """Drop a job (queued or running) and free its pages; unknown ids are ignored."""
        self.scheduler.cancel(job_id)
        if self._jobs.pop(job_id, None) is not None:
            self.cancelled += 1

    @property
    def busy(self) -> bool:
        return bool(self._jobs)

    # -- work ------------------------------------------------------------------------------------

    @torch.no_grad()
    def iterate(self, lock: AbstractContextManager | None = None) -> list[JobResult]:
        """One forward pass; a result for every job that got a token. With a lock (the asyncio front
        end's), the scheduler and the jobs are touched only while holding it — not while a scheduled
        pass computes nor while the host waits for sampled tokens — so jobs can be added or cancelled
        meanwhile.

        With `overlap`, a decode pass is queued on the GPU before the host reads the tokens of the pass
        before it (their ids go from the sampler's output to the next pass's input on the device), so
        the host's work of a step — waiting, results, stop conditions, scheduling, the graph launch —
        runs while the GPU computes. A job that stops on a token (not by length) has then one pass
        computed after its end, whose token is dropped. Passes with anything the host must see first
        (new or waiting requests, prompt chunks, grammars, banned strings, penalties that read the
        history) are scheduled as without overlap."""
        lock = lock if lock is not None else nullcontext()
        with lock:
            done, self._inflight = self._inflight, None
            if done is None:
                batch = self.scheduler.schedule()
                if batch is None:
                    return []
                self.cache.copy_pages(batch.copies)
                ids, positions, segments, rows, samplers = [], [], [], [], []
                for chunk in batch.chunks:
                    offset = len(ids)
                    ids += chunk.tokens
                    positions += range(chunk.start, chunk.start + len(chunk.tokens))
                    segments.append(Segment(offset, chunk.start, len(chunk.tokens), chunk.pages))
                    if chunk.samples:
                        rows.append(len(ids) - 1)
                        samplers.append(chunk.seq_id)
        if done is None:
            logits = self._forward(ids, positions, segments, rows)  # [len(rows), vocab]
            with lock:
                done = self._sample(batch, logits, samplers)
        with lock:
            if self.overlap:
                self._inflight = self._launch_ahead(done)
        if done.ready is not None:
            done.ready.synchronize()  # the pass's tokens are on the host
        with lock:
            return self._finish_pass(done)

    def _forward(self, ids: list[int], positions: list[int], segments: list[Segment], rows: list[int],
                 device_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the flat batch's rows `rows`: a CUDA-graph replay when every segment is one decode
        token and a bucket holds them, else an eager pass. device_ids (on the model's device) replaces
        `ids`."""
        if self.graphs is not None and len(ids) == len(segments) and self.graphs.bucket(len(ids)) is not None:
            logits = self.graphs.run(ids, positions, [s.pages for s in segments], device_ids)
            return logits if len(rows) == len(ids) else logits[rows]
        dev = self.model.device
        ids_t = device_ids[None] if device_ids is not None else torch.tensor([ids], device=dev)
        return self.model(ids_t, torch.tensor([positions], device=dev),
                          self.cache.step(segments), max_seq_len=max(positions) + 1,
                          select=torch.tensor(rows, device=dev, dtype=torch.long))[0]

    def _sample(self, batch: Batch, logits: torch.Tensor, samplers: list[int], ahead: int = 0) -> _Pass:
        """Queue the sampling of a pass's logits (one row per job in `samplers`) and the copy of its tokens
        (and log-probabilities) to the host; nothing waits. ahead = 1 for a pass queued before the
        previous pass's tokens were recorded (each job has one token more than `generated` holds)."""
        live = [j for j, job_id in enumerate(samplers) if job_id in self._jobs]  # some may be cancelled by now
        if len(live) < len(samplers):
            logits, samplers = logits[live], [samplers[j] for j in live]
        if not samplers:
            return _Pass(batch, [], None, None, None, None)
        runs = [self._jobs[job_id] for job_id in samplers]
        if any(r.matcher is not None for r in runs):
            masked = logits.float().clone()  # the raw logits stay for logprobs
            for j, r in enumerate(runs):
                if r.matcher is not None:
                    r.matcher.apply(masked[j])
        else:
            masked = logits
        # min_new_tokens bans the stop tokens; a grammar decides for itself when it may end.
        params = []
        for r in runs:
            n = len(r.generated) + ahead
            bans = [] if n >= r.job.min_new_tokens or r.matcher else list(r.stop)
            bans += r.banned_at.get(n, ())  # tokens that began a banned string here
            params.append(replace(r.job.sampling, banned_tokens=[*r.job.sampling.banned_tokens, *bans]) if bans
                          else r.job.sampling)
        # Token histories only for the penalties that read them (copying them is O(length) per step).
        contexts = [self.scheduler.tokens(job_id) for job_id in samplers] if any(
            p.uses_history for p in params) else None
        tokens = sample_batch(masked, params, [r.rng for r in runs], contexts, [r.generated for r in runs])
        logprobs = None
        want = max((r.job.logprobs for r in runs), default=0)
        if want:
            logp = logits.float().log_softmax(-1)
            top = logp.topk(want, dim=-1)
            logprobs = tuple(_to_host(t, self.overlap) for t in (logp.gather(-1, tokens[:, None])[:, 0],
                                                                 top.indices, top.values))
        host = _to_host(tokens, self.overlap)
        ready = None
        if self.overlap and tokens.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        return _Pass(batch, samplers, tokens, host, ready, logprobs)

    def _launch_ahead(self, done: _Pass) -> _Pass | None:
        """Queue the decode pass after `done` (scheduler.lookahead) with `done`'s tokens fed on the device,
        or None where that pass must wait for the host (see iterate)."""
        if not done.samplers or len(done.samplers) < len(done.batch.chunks):
            return None  # a chunk without a token (mid-prompt), or a job gone
        for job_id in done.samplers:
            r = self._jobs.get(job_id)  # (None: cancelled since it was sampled)
            if r is None or r.matcher is not None or r.job.banned_strings or r.job.sampling.uses_history:
                return None
        planned = self.scheduler.lookahead(done.batch)
        if planned is None:
            return None
        batch, rows = planned
        dev_ids = done.tokens
        if len(rows) < len(done.samplers):  # (the index through pinned memory: a pageable copy may wait for the GPU)
            idx = torch.tensor(rows, dtype=torch.long)
            dev_ids = dev_ids[(idx.pin_memory() if dev_ids.is_cuda else idx).to(dev_ids.device, non_blocking=True)]
        chunks = batch.chunks
        segments = [Segment(j, c.start, 1, c.pages) for j, c in enumerate(chunks)]
        every = list(range(len(chunks)))
        logits = self._forward([0] * len(chunks), [c.start for c in chunks], segments, every, dev_ids)
        self.passes_ahead += 1
        return self._sample(batch, logits, [c.seq_id for c in chunks], ahead=1)

    def _finish_pass(self, done: _Pass) -> list[JobResult]:
        """Record a pass whose tokens are on the host: the scheduler's state, then each job's result."""
        batch = done.batch
        live = [j for j, job_id in enumerate(done.samplers) if job_id in self._jobs]  # stopped or cancelled since
        if not live:
            self.scheduler.update(batch, {})
            return []
        tokens = done.host.tolist()
        samplers = [done.samplers[j] for j in live]
        runs = [self._jobs[job_id] for job_id in samplers]
        sampled = {done.samplers[j]: tokens[j] for j in live}
        if done.logprobs is not None:
            chosen, top_ids, top_lp = ([c[j] for j in live] for c in (t.tolist() for t in done.logprobs))
        first = {job_id: self.scheduler.cached_tokens(job_id) for job_id, r in zip(samplers, runs) if not r.generated}
        at_limit = set(self.scheduler.update(batch, sampled))
        results = []
        for j, (job_id, tok) in enumerate(sampled.items()):
            run = self._jobs[job_id]
            run.generated.append(tok)
            lp = None
            if run.job.logprobs:
                n = run.job.logprobs
                lp = (chosen[j], list(zip(top_ids[j][:n], top_lp[j][:n])))
            if run.job.banned_strings:
                result = self._step_with_bans(job_id, run, tok, lp, job_id in at_limit, first.get(job_id))
                if result is not None:
                    results.append(result)
                continue
            result = JobResult(job_id, run.job.identifier, [tok], cached_tokens=first.get(job_id))
            if lp is not None:
                result.logprobs.append(lp)
            if self._consume(run, tok):
                result.finished, result.finish_reason = True, "stop"
            elif job_id in at_limit:
                result.finished, result.finish_reason = True, "length"
            if run.detok is not None:
                if tok not in run.stop:
                    run.pending += run.detok.add(tok)
                if result.finished:
                    run.pending += run.detok.flush()
                cut = first_match(run.pending, run.job.stop_strings)
                if cut >= 0:  # a stop string: the text ends before it
                    result.text, run.pending = run.pending[:cut], ""
                    result.finished, result.finish_reason = True, "stop"
                else:
                    keep = 0 if result.finished else held_back(run.pending, run.job.stop_strings)
                    split = len(run.pending) - keep
                    result.text, run.pending = run.pending[:split], run.pending[split:]
            if result.finished:
                self._retire(job_id, job_id in at_limit)
            results.append(result)
        return results

    def _step_with_bans(self, job_id: int, run: _Running, tok: int, lp: Any, at_limit: bool,
                        cached: int | None) -> JobResult | None:
        """A job with banned strings got a token. Tokens are returned only with their whole text, once no
        banned (or stop) string can start in it; a banned string that appears sends the job back to the
        token where it began (that token is banned there). None when nothing can be returned yet."""
        job = run.job
        if cached is not None:
            run.cached = cached
        stopped = self._consume(run, tok)
        run.held.append((tok, run.detok.add(tok) if tok not in run.stop else "", lp))
        if stopped or at_limit:
            last, piece, last_lp = run.held[-1]
            run.held[-1] = (last, piece + run.detok.flush(), last_lp)
        text = "".join(piece for _, piece, _ in run.held)
        hit, stop_at = first_match(text, job.banned_strings), first_match(text, job.stop_strings)
        if 0 <= stop_at <= hit:
            hit = -1  # the text ends before the banned string
        release, reason, cut = len(run.held), None, len(text)
        if hit >= 0:
            k, start = 0, 0  # the held token whose text contains the banned string's first character
            while start + len(run.held[k][1]) <= hit:
                start += len(run.held[k][1])
                k += 1
            if not at_limit:  # rewind (the scheduler still has the sequence) and try again
                drop = len(run.held) - k
                self.scheduler.rewind(job_id, drop)
                self.rewinds += 1
                pos = len(run.generated) - drop
                for later in [p for p in run.banned_at if p > pos]:  # bans made for a context now gone
                    del run.banned_at[later]
                run.banned_at.setdefault(pos, set()).add(run.held[k][0])
                if run.matcher is not None:
                    run.matcher.rollback(sum(1 for t, _, _ in run.held[k:] if t not in run.stop))
                del run.generated[-drop:], run.held[k:]
                run.detok = IncrementalDetokenizer(self.tokenizer)
                for t in run.generated:  # the detokenizer's state at the kept tokens
                    if t not in run.stop:
                        run.detok.add(t)
                return None
            release, reason, cut = k, "length", start  # out of tokens: end before the banned string
        elif stop_at >= 0:
            reason, cut = "stop", stop_at
        elif stopped or at_limit:
            reason = "stop" if stopped else "length"
        else:  # return whole tokens that end before anything that may start a banned or stop string
            boundary = len(text) - held_back(text, [*job.banned_strings, *job.stop_strings])
            release, end = 0, 0
            while release < len(run.held) and end + len(run.held[release][1]) <= boundary:
                end += len(run.held[release][1])
                release += 1
            cut = end
        out, run.held = run.held[:release], run.held[release:]
        if not out and reason is None:
            return None
        result = JobResult(job_id, job.identifier, [t for t, _, _ in out], text=text[:cut],
                           cached_tokens=run.cached if run.returned == 0 else None)
        result.logprobs = [lp for _, _, lp in out if lp is not None]
        run.returned += len(out)
        if reason is not None:
            result.finished, result.finish_reason = True, reason
            self._retire(job_id, at_limit)
        return result

    @staticmethod
    def _consume(run: _Running, tok: int) -> bool:
        """Advance the job's grammar by its new token; whether the job stops here (a stop token, or a
        complete grammar, which allows nothing more)."""
        if run.matcher is not None and tok not in run.stop:
            run.matcher.consume(tok)
        return tok in run.stop or (run.matcher is not None and run.matcher.done)

    def _retire(self, job_id: int, at_limit: bool) -> None:
        """A job finished: release it (the scheduler already did when it hit max_new_tokens)."""
        if not at_limit:
            self.scheduler.finish(job_id)
        del self._jobs[job_id]

    def stream(self) -> Iterator[JobResult]:
        """Results until every queued job has finished."""
        while self.busy:
            yield from self.iterate()

    def generate(self, jobs: Sequence[Job]) -> list[list[int]]:
        """Run jobs to the end together; the generated token ids of each, in job order."""
        ids: list[int] = []
        try:
            for job in jobs:
                ids.append(self.enqueue(job))
        except GenerationError:
            for i in ids:  # all or nothing
                self.cancel(i)
            raise
        out: dict[int, list[int]] = {i: [] for i in ids}
        for result in self.stream():
            if result.job_id in out:  # jobs queued earlier by someone else run along
                out[result.job_id] += result.new_token_ids
        return [out[i] for i in ids]
