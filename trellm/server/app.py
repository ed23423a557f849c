"""The OpenAI-compatible HTTP API over the continuously batched generator.

    app = create_app(ServerState(LLM("model"), name="model", api_key="sk-..."))

Endpoints: POST /v1/chat/completions and /v1/completions (streamed as server-sent events
ending in `data: [DONE]`, or whole), GET /v1/models, POST /v1/token/encode and
/v1/token/decode, GET /health. Every error is OpenAI's envelope
{"error": {"message", "type", "param", "code"}} with a 4xx status; a bad request is
never a 500. A client that goes away mid-stream cancels its jobs (their pages are freed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from trellm.engine.async_generator import AsyncGenerator
from trellm.engine.constraints import Constraint
from trellm.engine.generator import Generator, Job, JobResult
from trellm.engine.llm import LLM
from trellm.engine.sampling import SamplingParams
from trellm.errors import ChatTemplateError, GenerationError
from trellm.server import tools
from trellm.server.schemas import (
    ChatCompletionRequest, CompletionRequest, DecodeRequest, EncodeRequest, LoadRequest, _Sampling,
)


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def _envelope(status: int, message: str, type: str, param: str | None, code: str | None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status_code=status)


class ServerState:
    """The served model (swappable through the admin routes) and the server's counters."""

    def __init__(self, llm: LLM | None, *, name: str | None = None, api_key: str | None = None,
                 admin_key: str | None = None, model_dir: str | Path | None = None, max_seq_len: int | None = None,
                 cache_tokens: int | None = None, max_batch: int = 64, max_queue: int = 256,
                 load_options: dict[str, Any] | None = None):
        self.api_key, self.admin_key, self.max_queue = api_key, admin_key, max_queue
        self.model_dir = Path(model_dir).resolve() if model_dir is not None else None
        self.engine_options = {"max_seq_len": max_seq_len, "cache_tokens": cache_tokens, "max_seqs": max_batch}
        self.load_options = load_options or {}
        self._llm: LLM | None = None
        self.name = ""
        if llm is not None:
            self.attach(llm, name or llm.path.name)
        self.created = int(time.time())
        self.requests: dict[tuple[str, int], int] = {}  # (path, status) -> count
        self.latency = [0.0, 0]  # seconds, requests (whole responses, streams included)
        self.tokens = {"prompt": 0, "completion": 0}

    def attach(self, llm: LLM, name: str) -> None:
        self._llm, self.name = llm, name
        self.generator = Generator(llm.model, tokenizer=llm.tokenizer, **self.engine_options)
        self.generator.warmup()  # kernels compiled and decode graphs captured before the first request
        self.engine = AsyncGenerator(self.generator)

    async def detach(self) -> None:
        """Stop serving the current model: its running jobs are cancelled and its memory freed."""
        if self._llm is None:
            return
        await self.engine.close()
        self._llm, self.name = None, ""
        del self.generator, self.engine
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def llm(self) -> LLM:
        if self._llm is None:
            raise ApiError(400, "no model is loaded: POST /v1/model/load first", param="model",
                           code="model_not_found")
        return self._llm

    def metrics(self) -> str:
        """Prometheus text format."""
        if self._llm is None:
            return "# no model loaded\ntrellm_model_loaded 0\n"
        pool, sched = self.generator.pool, self.generator.scheduler
        lines = ["# TYPE trellm_requests_total counter"]
        lines += [f'trellm_requests_total{{path="{path}",status="{status}"}} {n}'
                  for (path, status), n in sorted(self.requests.items())]
        lines += [
            "# TYPE trellm_request_seconds summary",
            f"trellm_request_seconds_sum {self.latency[0]:.6f}", f"trellm_request_seconds_count {self.latency[1]}",
            "# TYPE trellm_prompt_tokens_total counter", f"trellm_prompt_tokens_total {self.tokens['prompt']}",
            "# TYPE trellm_completion_tokens_total counter",
            f"trellm_completion_tokens_total {self.tokens['completion']}",
            "# TYPE trellm_cancelled_jobs_total counter", f"trellm_cancelled_jobs_total {self.generator.cancelled}",
            "# TYPE trellm_queue_depth gauge", f"trellm_queue_depth {sched.num_waiting}",
            "# TYPE trellm_running_sequences gauge", f"trellm_running_sequences {sched.num_running}",
            "# TYPE trellm_cache_pages gauge", f"trellm_cache_pages {pool.num_pages}",
            "# TYPE trellm_cache_pages_free gauge", f"trellm_cache_pages_free {pool.available}",
            "# TYPE trellm_cache_pages_cached gauge", f"trellm_cache_pages_cached {pool.cached}",
            "# TYPE trellm_prefix_reused_tokens_total counter",
            f"trellm_prefix_reused_tokens_total {pool.reused_tokens}",
        ]
        return "\n".join(lines) + "\n"


def create_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await state.detach()

    app = FastAPI(title="trellm", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return _envelope(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return _envelope(400, f"{param + ': ' if param else ''}{err.get('msg')}", "invalid_request_error", param,
                         "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return _envelope(e.status_code, str(e.detail), "invalid_request_error", None,
                         "not_found" if e.status_code == 404 else None)

    @app.exception_handler(GenerationError)
    async def _generation(_: Request, e: GenerationError) -> JSONResponse:
        return _envelope(400, str(e), "invalid_request_error", None, "invalid_value")

    @app.middleware("http")
    async def count(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        key = (request.url.path, response.status_code)
        state.requests[key] = state.requests.get(key, 0) + 1
        state.latency[0] += time.perf_counter() - t0
        state.latency[1] += 1
        return response

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics())

    def _key(request: Request) -> str:
        header = request.headers.get("authorization", "")
        return header[7:] if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")

    def _same(a: str, b: str) -> bool:
        return bool(a) and hmac.compare_digest(a.encode(), b.encode())

    async def auth(request: Request) -> None:
        key = _key(request)
        if state.api_key is None or _same(key, state.api_key) or (state.admin_key and _same(key, state.admin_key)):
            return
        raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                       code="invalid_api_key")

    async def admin(request: Request) -> None:
        """Admin routes take the admin key; without one configured, whatever the other routes take."""
        if state.admin_key is None:
            return await auth(request)
        key = _key(request)
        if _same(key, state.admin_key):
            return
        if state.api_key is None or _same(key, state.api_key):
            raise ApiError(403, "this route needs the admin key", code="admin_key_required")
        raise ApiError(401, "invalid or missing API key", code="invalid_api_key")

    @app.post("/v1/model/load", dependencies=[Depends(admin)])
    async def load(body: LoadRequest) -> dict:
        if state.model_dir is None:
            raise ApiError(400, "this server has no model directory (--model-dir) to load from", param="model")
        folder = (state.model_dir / body.model).resolve()
        if folder.parent != state.model_dir or not (folder / "config.json").is_file():
            raise ApiError(404, f"no model named {body.model!r} in the model directory", param="model",
                           code="model_not_found")
        await state.detach()
        llm = await asyncio.to_thread(LLM, folder, **state.load_options)
        state.attach(llm, body.model)
        return {"status": "loaded", "model": state.name}

    @app.post("/v1/model/unload", dependencies=[Depends(admin)])
    async def unload() -> dict:
        name = state.name
        await state.detach()
        return {"status": "unloaded", "model": name or None}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": state.name or None}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models() -> dict:
        data = [{"id": state.name, "object": "model", "created": state.created, "owned_by": "trellm"}]
        return {"object": "list", "data": data if state.name else []}

    @app.post("/v1/token/encode", dependencies=[Depends(auth)])
    async def encode(req: EncodeRequest) -> dict:
        if (req.text is None) == (req.messages is None):
            raise ApiError(400, "give exactly one of 'text' and 'messages'", param="text")
        if req.messages is not None:
            ids = _chat_ids(state, [_message(m) for m in req.messages], None)
        else:
            ids = state.llm.tokenizer.encode(req.text, add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "length": len(ids)}

    @app.post("/v1/token/decode", dependencies=[Depends(auth)])
    async def decode(req: DecodeRequest) -> dict:
        vocab = state.llm.config.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise ApiError(400, f"token ids must be in 0..{vocab - 1}", param="tokens")
        return {"text": state.llm.tokenizer.decode(req.tokens, skip_special_tokens=req.skip_special_tokens)}

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat(req: ChatCompletionRequest, request: Request):
        _check_model(state, req.model)
        try:
            specs = tools.check_tools(req.tools, req.tool_choice)
        except ValueError as e:
            raise ApiError(400, str(e), param="tools" if "tool_choice" not in str(e) else "tool_choice") from e
        use_tools = bool(specs) and req.tool_choice != "none"
        prompt = _chat_ids(state, [_message(m) for m in req.messages], req.chat_template_kwargs,
                           req.tools if use_tools else None)
        max_new = req.max_completion_tokens or req.max_tokens
        top = (req.top_logprobs or 1) if req.logprobs else 0
        constraint = tools.forced_call(specs, req.tool_choice) if use_tools else None
        if constraint is not None and req.response_format and req.response_format.get("type") != "text":
            raise ApiError(400, "response_format cannot be combined with a forced tool call", param="response_format")
        jobs = _jobs(state, req, prompt, max_new, top, constraint or _constraint(req.response_format))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            streams = state.engine.submit_many(jobs)  # errors are 400s before the stream starts
            return EventSourceResponse(_chat_events(state, jobs, streams, rid, created, len(prompt), req.include_usage,
                                                    req.logprobs, specs if use_tools else []), ping=15)
        streams = state.engine.submit_many(jobs)
        outs = await asyncio.gather(*(_collect(state, stream, job) for stream, job in zip(streams, jobs)))
        choices = []
        for i, out in enumerate(outs):
            message: dict[str, Any] = {"role": "assistant", "content": out["text"]}
            reason = out["finish_reason"]
            if use_tools:
                content, calls = tools.parse_calls(out["text"], specs)
                if calls:
                    message, reason = {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
            choice = {"index": i, "message": message,
                      "logprobs": {"content": _chat_logprobs(state, out["tokens"], out["logprobs"])}
                      if req.logprobs else None, "finish_reason": reason}
            choices.append(choice)
        return {"id": rid, "object": "chat.completion", "created": created, "model": state.name, "choices": choices,
                "usage": _outs_usage(len(prompt), outs)}

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(req: CompletionRequest):
        _check_model(state, req.model)
        prompts = _completion_prompts(state, req.prompt)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        top = req.logprobs or 0
        if req.stream:
            if len(prompts) > 1:
                raise ApiError(400, "streaming takes one prompt", param="prompt")
            jobs = _jobs(state, req, prompts[0], req.max_tokens, top if req.logprobs is not None else 0, None)
            streams = state.engine.submit_many(jobs)
            return EventSourceResponse(_completion_events(state, jobs, streams, rid, created, prompts[0], req.echo,
                                                          req.include_usage, req.logprobs is not None), ping=15)
        choices, all_outs, total_prompt = [], [], 0
        for p in prompts:
            jobs = _jobs(state, req, p, req.max_tokens, top if req.logprobs is not None else 0, None)
            outs = await asyncio.gather(*(_collect(state, stream, job)
                                          for stream, job in zip(state.engine.submit_many(jobs), jobs)))
            total_prompt += len(p)
            for out in outs:
                text = (state.llm.tokenizer.decode(p) if req.echo else "") + out["text"]
                lp = _completion_logprobs(state, out["tokens"], out["logprobs"]) if req.logprobs is not None else None
                choices.append({"index": len(choices), "text": text, "logprobs": lp,
                                "finish_reason": out["finish_reason"]})
            all_outs += outs
        usage = _outs_usage(total_prompt, all_outs)
        return {"id": rid, "object": "text_completion", "created": created, "model": state.name, "choices": choices,
                "usage": usage}

    return app


# -- helpers ---------------------------------------------------------------------------------------


def _check_model(state: ServerState, model: str) -> None:
    state.llm  # noqa: B018  (raises a 400 when no model is loaded)
    if model != state.name:
        raise ApiError(400, f"model {model!r} is not served here; GET /v1/models lists {state.name!r}",
                       param="model", code="model_not_found")


def _message(m) -> dict[str, Any]:
    d = m.model_dump(exclude_none=True)
    for call in d.get("tool_calls") or []:  # templates expect arguments as objects, clients send JSON text
        fn = call.get("function", {})
        if isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except json.JSONDecodeError:
                pass
    if isinstance(d.get("content"), list):  # content parts: the text ones, joined
        d["content"] = "".join(part.get("text", "") for part in d["content"] if part.get("type") == "text")
    if d["role"] == "developer":
        d["role"] = "system"
    return d


def _chat_ids(state: ServerState, messages: list[dict], kwargs: dict | None,
              tool_specs: list[dict] | None = None) -> list[int]:
    try:
        return state.llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       chat_template_kwargs=kwargs, tools=tool_specs)
    except ChatTemplateError as e:
        raise ApiError(400, f"the chat template could not render these messages: {e}", param="messages") from e


def _completion_prompts(state: ServerState, prompt) -> list[list[int]]:
    tok, vocab = state.llm.tokenizer, state.llm.config.vocab_size
    if isinstance(prompt, str):
        prompts = [tok.encode(prompt, add_special_tokens=True)]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [tok.encode(p, add_special_tokens=True) for p in prompt]
    elif prompt and all(isinstance(p, list) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise ApiError(400, "prompt must be a string, a list of strings, or token ids", param="prompt")
    for p in prompts:
        if not p:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if any(not 0 <= t < vocab for t in p):
            raise ApiError(400, f"prompt token ids must be in 0..{vocab - 1}", param="prompt")
    return prompts


def _constraint(fmt: dict | None) -> Constraint | None:
    if not fmt or fmt.get("type") in (None, "text"):
        return None
    if fmt["type"] == "json_object":
        return Constraint.json_object()
    if fmt["type"] == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format.json_schema.schema must be a JSON schema object",
                           param="response_format")
        return Constraint.json_schema(schema)
    raise ApiError(400, f"unknown response_format type {fmt['type']!r} (text, json_object, json_schema)",
                   param="response_format")


def _jobs(state: ServerState, req: _Sampling, prompt: list[int], max_new: int | None, logprobs: int,
          constraint: Constraint | None) -> list[Job]:
    if state.generator.scheduler.num_waiting + req.n > state.max_queue:
        raise ApiError(429, f"the server's queue is full ({state.max_queue} waiting sequences); retry shortly",
                       type="rate_limit_exceeded", code="queue_full")
    limit = state.generator.max_seq_len
    state.tokens["prompt"] += len(prompt)
    if len(prompt) >= limit:
        raise ApiError(400, f"the prompt has {len(prompt)} tokens but the context is {limit}; shorten it",
                       param="messages", code="context_length_exceeded")
    vocab = state.llm.config.vocab_size
    try:
        bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
    except ValueError as e:
        raise ApiError(400, "logit_bias keys must be token ids", param="logit_bias") from e
    if any(not 0 <= t < vocab for t in bias):
        raise ApiError(400, f"logit_bias token ids must be in 0..{vocab - 1}", param="logit_bias")
    default = state.llm.default_sampling()
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop takes up to 4 non-empty strings", param="stop")
    jobs = []
    for i in range(req.n):
        try:
            sampling = SamplingParams(
                temperature=req.temperature if req.temperature is not None else (
                    default.temperature if req.top_p is None else 1.0),
                top_p=req.top_p if req.top_p is not None else default.top_p, top_k=req.top_k, min_p=req.min_p,
                typical_p=req.typical_p, repetition_penalty=req.repetition_penalty,
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, logit_bias=bias,
                xtc_threshold=req.xtc_threshold, xtc_probability=req.xtc_probability,
                dry_multiplier=req.dry_multiplier, dry_base=req.dry_base, dry_allowed_length=req.dry_allowed_length,
                seed=None if req.seed is None else req.seed + i)
        except GenerationError as e:
            raise ApiError(400, str(e)) from e
        jobs.append(Job(prompt, max_new_tokens=max_new or limit - len(prompt), min_new_tokens=req.min_tokens,
                        sampling=sampling, stop_token_ids=state.llm.stop_token_ids, stop_strings=stops,
                        banned_strings=req.banned_strings, logprobs=logprobs, constraint=constraint, identifier=i))
    return jobs


def _answer_tokens(r: JobResult, job: Job) -> list[int]:
    """A result's new tokens without the stop token that ended the job: it is not part of the answer."""
    if r.finish_reason == "stop" and r.new_token_ids and r.new_token_ids[-1] in job.stop_token_ids:
        return r.new_token_ids[:-1]
    return r.new_token_ids


async def _collect(state: ServerState, stream: AsyncIterator[JobResult], job: Job) -> dict:
    text, tokens, logprobs, reason, cached = [], [], [], None, 0
    async for r in stream:
        new = _answer_tokens(r, job)
        text.append(r.text)
        tokens += new
        logprobs += r.logprobs[: len(new)]
        cached = r.cached_tokens if r.cached_tokens is not None else cached
        reason = r.finish_reason if r.finished else reason
    state.tokens["completion"] += len(tokens)
    return {"text": "".join(text), "tokens": tokens, "logprobs": logprobs, "finish_reason": reason, "cached": cached}


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _outs_usage(prompt_tokens: int, outs: list[dict]) -> dict:
    """Usage of whole answers (from _collect)."""
    return _usage(prompt_tokens, sum(len(o["tokens"]) for o in outs), max((o["cached"] for o in outs), default=0))


def _token_text(state: ServerState, t: int) -> str:
    return state.llm.tokenizer.decode([t])


def _chat_logprobs(state: ServerState, tokens: list[int], logprobs: list) -> list[dict]:
    out = []
    for t, (lp, top) in zip(tokens, logprobs):
        s = _token_text(state, t)
        out.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                    "top_logprobs": [{"token": _token_text(state, u), "logprob": v,
                                      "bytes": list(_token_text(state, u).encode())} for u, v in top]})
    return out


def _completion_logprobs(state: ServerState, tokens: list[int], logprobs: list) -> dict:
    texts = [_token_text(state, t) for t in tokens]
    offsets, pos = [], 0
    for s in texts:
        offsets.append(pos)
        pos += len(s)
    return {"tokens": texts, "token_logprobs": [lp for lp, _ in logprobs],
            "top_logprobs": [{_token_text(state, u): v for u, v in top} for _, top in logprobs],
            "text_offset": offsets}


async def _merged(streams: list[AsyncIterator[JobResult]]) -> AsyncIterator[tuple[int, JobResult]]:
    """Results of several job streams as they come, tagged with the stream's index."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[JobResult]) -> None:
        try:
            async for r in stream:
                await queue.put((i, r))
        finally:
            await stream.aclose()  # cancels the job if it did not finish
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_ = len(tasks)
        while open_:
            i, r = await queue.get()
            if r is None:
                open_ -= 1
            else:
                yield i, r
    finally:
        for task in tasks:  # the client went away (or we are done): stop every stream, cancelling its job
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:  # a stream whose task never ran still holds a queued job
            await stream.aclose()


async def _chat_events(state: ServerState, jobs: list[Job], streams: list, rid: str, created: int,
                       prompt_tokens: int, include_usage: bool, logprobs: bool,
                       tool_specs: list[dict]) -> AsyncIterator[str]:
    """With tools in play, text that may be a call is held (tools.CallStream) until the answer ends,
    then sent as tool_calls deltas or as content; the rest streams as usual."""
    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.name,
                "choices": choices}
        if include_usage:
            body["usage"] = usage
        return json.dumps(body, ensure_ascii=False)

    for i in range(len(jobs)):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    counts, cached = [0] * len(jobs), 0
    calls = [tools.CallStream(tool_specs) for _ in jobs]
    async for i, r in _merged(streams):
        toks = _answer_tokens(r, jobs[i])
        counts[i] += len(toks)
        state.tokens["completion"] += len(toks)
        cached = max(cached, r.cached_tokens or 0)
        lp = {"content": _chat_logprobs(state, toks, r.logprobs[: len(toks)])} if logprobs else None
        text, reason = r.text, r.finish_reason if r.finished else None
        if tool_specs:
            text = calls[i].feed(text)
            if r.finished:
                rest, found = calls[i].finish()
                if found:
                    if text:
                        yield chunk([{"index": i, "delta": {"content": text}, "logprobs": None,
                                      "finish_reason": None}])
                    deltas = [{"index": k, **call} for k, call in enumerate(found)]
                    yield chunk([{"index": i, "delta": {"tool_calls": deltas}, "logprobs": None,
                                  "finish_reason": None}])
                    text, reason = rest, "tool_calls"
                else:
                    text += rest
        if text or r.finished or lp:
            yield chunk([{"index": i, "delta": {"content": text} if text else {}, "logprobs": lp,
                          "finish_reason": reason}])
    if include_usage:
        done = sum(counts)
        yield chunk([], _usage(prompt_tokens, done, cached))
    yield "[DONE]"


async def _completion_events(state: ServerState, jobs: list[Job], streams: list, rid: str, created: int,
                             prompt: list[int], echo: bool, include_usage: bool, logprobs: bool) -> AsyncIterator[str]:
    def chunk(i: int, text: str, reason: str | None, lp: dict | None = None) -> str:
        body = {"id": rid, "object": "text_completion", "created": created, "model": state.name,
                "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": reason}]}
        if include_usage:
            body["usage"] = None
        return json.dumps(body, ensure_ascii=False)

    if echo:
        for i in range(len(streams)):
            yield chunk(i, state.llm.tokenizer.decode(prompt), None)
    done, cached = 0, 0
    async for i, r in _merged(streams):
        toks = _answer_tokens(r, jobs[i])
        done += len(toks)
        state.tokens["completion"] += len(toks)
        cached = max(cached, r.cached_tokens or 0)
        lp = _completion_logprobs(state, toks, r.logprobs[: len(toks)]) if logprobs and toks else None
        if r.text or r.finished or lp:
            yield chunk(i, r.text, r.finish_reason if r.finished else None, lp)
    if include_usage:
        yield json.dumps({"id": rid, "object": "text_completion", "created": created, "model": state.name,
                          "choices": [], "usage": _usage(len(prompt), done, cached)})
    yield "[DONE]"
