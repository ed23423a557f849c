"""`trellm serve` in a real subprocess on loopback, driven by the official openai client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("llguidance")

KEY = "sk-test-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_chat_model):
    port = _free_port()
    env = {**os.environ, "TRELLM_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "trellm.cli.main", "serve", "-m", str(tiny_chat_model), "--name",
                             "tiny", "--port", str(port), "--device", "cpu", "--max-seq-len", "256",
                             "--cache-tokens", "4096"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            with urllib.request.urlopen(base + "/health", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode())
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("server did not start")
    yield base
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


MSG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def test_chat_plain_and_streamed_agree_and_count_tokens(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, temperature=0)
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_n_seed_stop_and_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, temperature=1.0, n=3, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    again = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, temperature=1.0, n=3, seed=5)
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]
    free = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=20, temperature=0)
    text = free.choices[0].message.content
    if len(text) > 4:
        stop = text[2:4]
        r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=20, temperature=0, stop=[stop])
        assert r.choices[0].message.content == text[: text.find(stop)] and r.choices[0].finish_reason == "stop"
        banned = text[1:4]  # extra body field: the answer avoids it, streamed or not
        r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=20, temperature=0,
                                           extra_body={"banned_strings": [banned]})
        assert banned not in r.choices[0].message.content and r.usage.completion_tokens == 20
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="tiny", messages=MSG, max_tokens=20, temperature=0, stream=True,
            extra_body={"banned_strings": [banned]}) if c.choices)
        assert streamed == r.choices[0].message.content
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2 and item.logprob <= 0
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)  # greedy: the best one was taken


def test_json_schema_output_parses_and_validates(client):
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "n": {"enum": [1, 2]}},
              "required": ["color", "n"], "additionalProperties": False}
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=40, temperature=0.7, seed=1,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": schema}})
    value = json.loads(r.choices[0].message.content)
    assert value["color"] in ("red", "green") and value["n"] in (1, 2) and set(value) == {"color", "n"}


def test_completions_with_echo_and_token_endpoints(client, server):
    r = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=5, temperature=0, echo=True,
                                  logprobs=1)
    assert r.choices[0].text.startswith("The quick brown")
    assert len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens
    chunks = list(client.completions.create(model="tiny", prompt="The quick brown", max_tokens=5, temperature=0,
                                            stream=True, logprobs=1, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert "The quick brown" + streamed == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens and not chunks[-1].choices
    streamed_lp = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed_lp == r.choices[0].logprobs.tokens
    assert [m.id for m in client.models.list().data] == ["tiny"]
    req = urllib.request.Request(server + "/v1/token/encode", data=json.dumps({"text": "hello"}).encode(),
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as resp:
        ids = json.loads(resp.read())["tokens"]
    req = urllib.request.Request(server + "/v1/token/decode", data=json.dumps({"tokens": ids}).encode(),
                                 headers={"x-api-key": KEY, "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as resp:
        assert "hello" in json.loads(resp.read())["text"]


def _error(call):
    with pytest.raises(openai.APIStatusError) as info:
        call()
    body = info.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return info.value.status_code, body["error"]


def test_errors_are_openai_envelopes_with_4xx(client, server):
    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    status, err = _error(lambda: bad.chat.completions.create(model="tiny", messages=MSG))
    assert status == 401 and err["code"] == "invalid_api_key"
    status, err = _error(lambda: client.chat.completions.create(model="nope", messages=MSG))
    assert status == 400 and err["code"] == "model_not_found" and err["param"] == "model"
    status, err = _error(lambda: client.chat.completions.create(model="tiny", messages=MSG, temperature=5))
    assert status == 400 and err["param"] == "temperature"
    status, err = _error(lambda: client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "word " * 400}]))
    assert status == 400 and err["code"] == "context_length_exceeded"
    status, err = _error(lambda: client.chat.completions.create(
        model="tiny", messages=MSG, response_format={"type": "json_schema", "json_schema": {"name": "x"}}))
    assert status == 400 and err["param"] == "response_format"
    status, err = _error(lambda: client.completions.create(model="tiny", prompt=[10**7]))
    assert status == 400 and err["param"] == "prompt"
    status, err = _error(lambda: client.chat.completions.create(model="tiny", messages=[]))
    assert status == 400 and err["param"] == "messages"
    req = urllib.request.Request(server + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req)
    assert info.value.code == 404 and "error" in json.loads(info.value.read())


def test_refuses_to_serve_off_loopback_without_a_key(tmp_path, tiny_chat_model):
    env = {k: v for k, v in os.environ.items() if k != "TRELLM_API_KEY"}
    proc = subprocess.run([sys.executable, "-m", "trellm.cli.main", "serve", "-m", str(tiny_chat_model), "--host",
                           "0.0.0.0", "--device", "cpu"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "without an API key" in proc.stderr


def _metrics(server) -> dict[str, float]:
    with urllib.request.urlopen(server + "/metrics") as r:
        text = r.read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}


def test_concurrent_streams_with_disconnects_leave_no_pages_and_no_5xx(server):
    import asyncio
    import random

    rng = random.Random(0)

    async def one(i, client):
        quit_after = rng.choice([1, 3, 10**9])
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"Story number {i}"}],
            max_tokens=200 if quit_after < 10 else 30, temperature=0.9, seed=i, stream=True)
        got = 0
        async for chunk in stream:
            got += 1
            if got >= quit_after:
                await stream.close()  # the client goes away mid-stream
                return "left"
        return "done"

    async def main():
        client = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
        return await asyncio.gather(*(one(i, client) for i in range(64)))

    outcomes = asyncio.run(main())
    assert "left" in outcomes and "done" in outcomes
    for _ in range(100):  # the server notices the disconnects and cancels those jobs
        m = _metrics(server)
        if m["trellm_running_sequences"] == 0 and m["trellm_cache_pages_free"] == m["trellm_cache_pages"]:
            break
        time.sleep(0.1)
    assert m["trellm_running_sequences"] == 0 and m["trellm_queue_depth"] == 0
    assert m["trellm_cache_pages_free"] == m["trellm_cache_pages"]
    assert not any(k.startswith("trellm_requests_total") and 'status="5' in k for k in m)
    assert m["trellm_completion_tokens_total"] > 0
    assert m["trellm_cancelled_jobs_total"] >= 1  # left streams were cancelled, not run to their 200 tokens


def test_a_full_queue_answers_429(tiny_chat_model):
    from fastapi.testclient import TestClient

    from trellm.engine.llm import LLM
    from trellm.server.app import ServerState, create_app

    state = ServerState(LLM(tiny_chat_model, device="cpu"), name="tiny", max_seq_len=128, cache_tokens=512,
                        max_queue=2)
    with TestClient(create_app(state)) as http:
        r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, "n": 3, "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, "n": 2, "max_tokens": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
                   "additionalProperties": False}}},
         {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {},
                                                                        "additionalProperties": False}}}]


def test_tool_call_round_trip_plain_and_streamed(client):
    forced = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS, tool_choice=forced, max_tokens=150)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    history = MSG + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"}]
    r2 = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=6, temperature=0)
    assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls")
    chunks = list(client.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS, tool_choice="required",
                                                 max_tokens=150, stream=True))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].function.name in ("get_weather", "noop")
    json.loads(deltas[0].function.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    status, err = _error(lambda: client.chat.completions.create(
        model="tiny", messages=MSG, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}))
    assert status == 400 and err["param"] == "tool_choice"


def test_tool_calls_are_found_in_tagged_and_json_answers():
    from trellm.server.tools import parse_calls

    specs = [t["function"] for t in TOOLS]
    content, calls = parse_calls('Sure.<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
                                 '<tool_call>{"name": "noop", "arguments": {}}</tool_call>', specs)
    assert content == "Sure." and [c["function"]["name"] for c in calls] == ["get_weather", "noop"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"}
    content, calls = parse_calls('{"name": "get_weather", "parameters": {"city": "Paris"}}', specs)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    for text in ('{"name": "unknown", "arguments": {}}', "<tool_call>not json</tool_call>", "hello", "[1, 2]"):
        assert parse_calls(text, specs) == (text, [])


def test_streamed_answers_with_tools_hold_back_only_what_may_be_a_call():
    """Text streams at once; from a <tool_call> tag on (even one split across pieces), or an answer that
    opens with '{', is held until the end and comes back as calls (or as content if it was none)."""
    import random

    from trellm.server.tools import CallStream

    specs = [t["function"] for t in TOOLS]
    rng = random.Random(0)

    def run(answer: str) -> tuple[list[str], str, list]:
        stream, sent, i = CallStream(specs), [], 0
        while i < len(answer):
            j = i + rng.randrange(1, 5)
            sent.append(stream.feed(answer[i:j]))
            i = j
        rest, calls = stream.finish()
        return sent, rest, calls

    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    for _ in range(20):
        sent, rest, calls = run("Let me check the weather. " + call)
        assert "".join(sent) == "Let me check the weather. " and rest == "" and len(calls) == 1
        assert "<" not in "".join(sent)  # no piece of the tag ever went out
        sent, rest, calls = run('  {"name": "noop", "arguments": {}}')
        assert "".join(sent) == "" and rest == "" and calls[0]["function"]["name"] == "noop"
        sent, rest, calls = run("a <tool is not a tag, and {braces} mid-answer are text")
        assert "".join(sent) + rest == "a <tool is not a tag, and {braces} mid-answer are text" and calls == []
        sent, rest, calls = run("<tool_call>not json</tool_call>")  # not a call after all: content
        assert "".join(sent) + rest == "<tool_call>not json</tool_call>" and calls == []
    sent, _, _ = run("Plain words stream as they come, piece by piece.")
    assert sum(1 for s in sent if s) >= len(sent) // 2  # most pieces went out at once


def test_admin_load_and_unload_only_from_the_model_directory(tmp_path, tiny_chat_model):
    import shutil

    from fastapi.testclient import TestClient

    from trellm.server.app import ServerState, create_app

    models = tmp_path / "models"
    shutil.copytree(tiny_chat_model, models / "tiny-a")
    (tmp_path / "outside").mkdir()
    state = ServerState(None, api_key="user", admin_key="admin", model_dir=models, max_seq_len=128,
                        cache_tokens=512, load_options={"device": "cpu"})
    user, adm = {"Authorization": "Bearer user"}, {"Authorization": "Bearer admin"}
    with TestClient(create_app(state)) as http:
        r = http.post("/v1/chat/completions", json={"model": "tiny-a", "messages": MSG}, headers=user)
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_found"
        assert http.get("/v1/models", headers=user).json()["data"] == []
        r = http.post("/v1/model/load", json={"model": "tiny-a"}, headers=user)
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_key_required"
        assert http.post("/v1/model/load", json={"model": "tiny-a"}).status_code == 401
        for bad in ("../outside", "/etc", "nope", "tiny-a/.."):
            r = http.post("/v1/model/load", json={"model": bad}, headers=adm)
            assert r.status_code == 404 and r.json()["error"]["param"] == "model", bad
        r = http.post("/v1/model/load", json={"model": "tiny-a"}, headers=adm)
        assert r.status_code == 200 and r.json()["model"] == "tiny-a"
        r = http.post("/v1/chat/completions", json={"model": "tiny-a", "messages": MSG, "max_tokens": 3},
                      headers=user)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
        assert http.post("/v1/model/unload", headers=adm).json() == {"status": "unloaded", "model": "tiny-a"}
        r = http.post("/v1/chat/completions", json={"model": "tiny-a", "messages": MSG}, headers=user)
        assert r.status_code == 400
        assert "trellm_model_loaded 0" in http.get("/metrics").text


def test_the_load_generator_runs_against_a_server(tiny_chat_model, tmp_path):
    """benchmarks/bench_server.py starts `trellm serve`, drives it at two concurrency levels and reports
    TTFT, inter-token latency and throughput with no errors (a CPU smoke run of the GPU benchmark)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.path.join(root, "benchmarks")]))
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_server.py"), "--serve",
                           str(tiny_chat_model), "--concurrency", "1,3", "--requests", "2", "--prompt-tokens", "8",
                           "--max-tokens", "5", "--serve-args", "--device cpu", "--json-out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["concurrency"] for r in rows] == [1, 3] and [r["requests"] for r in rows] == [2, 6]
    for r in rows:
        assert r["errors"] == 0 and r["output_tok_s"] > 0 and 0 < r["ttft_ms_p50"] <= r["ttft_ms_p90"]
        assert 0 < r["itl_ms_p50"] <= r["itl_ms_p90"]
