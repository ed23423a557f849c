"""Load generator for `trellm serve` (issue 6): concurrency levels, time to first token, inter-token
latency, throughput.

    python benchmarks/bench_server.py --serve /tmp/l3-exl3 --make 8b       # write the model, serve it, load it
    python benchmarks/bench_server.py --url http://127.0.0.1:5000 --model NAME [--api-key KEY]

At each concurrency level C, C clients each send requests back to back (--requests per client) to
POST /v1/completions with streaming on: a prompt of exactly --prompt-tokens token ids and
--max-tokens new tokens (min_tokens equal, so random-weight models do not stop early). Per level:
TTFT (request sent -> first streamed token) p50/p90, inter-token latency (gaps between streamed
tokens) p50/p90, output tokens/s over the level's wall time, requests/s, errors. Prints a table and
one JSON object.

The client is plain asyncio over HTTP/1.1 (chunked SSE), so the machine running it needs nothing but
the standard library. `--make 8b` writes the random-weight Llama-3-8B-shaped EXL3 model of
bench_e2e.py plus a word-level tokenizer of its 128,256-token vocabulary and a ChatML template, which
a server needs to turn tokens into text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_word_tokenizer(folder: Path, vocab_size: int, eos_id: int) -> None:
    """A word-level tokenizer whose tokens are w0 .. w{V-1} (decoded space-separated); the EOS id gets
    the ChatML end marker. Enough for a server to render random-weight outputs as text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size)}
    vocab.pop(f"w{eos_id}")
    vocab["<|im_end|>"] = eos_id
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE}))


def make_model(out: Path, preset: str) -> None:
    from bench_e2e import PRESETS
    from trellm.quant.exl3_writer import write_random_exl3_model

    cfg = PRESETS[preset]
    if not (out / "config.json").is_file():
        write_random_exl3_model(cfg, out, bits=4, head_bits=6, shard_bytes=4 * 2**30)
    if not (out / "tokenizer.json").is_file():
        eos = cfg["eos_token_id"]
        write_word_tokenizer(out, cfg["vocab_size"], eos if isinstance(eos, int) else eos[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def stream_completion(host: str, port: int, headers: dict, body: dict) -> dict:
    """One streamed completion over a fresh connection: status, time to first token, token arrival times."""
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(host, port)
    head = ["POST /v1/completions HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
            f"Content-Length: {len(payload)}", "Connection: close", *[f"{k}: {v}" for k, v in headers.items()]]
    t0 = time.perf_counter()
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    while (await reader.readline()) not in (b"\r\n", b""):
        pass  # response headers
    arrivals, usage, buf = [], None, b""
    try:
        if status != 200:
            return {"status": status, "error": (await reader.read()).decode(errors="replace")[:300]}
        while True:
            size_line = await reader.readline()  # chunked transfer encoding
            if not size_line:
                break
            size = int(size_line.strip() or b"0", 16)
            if size == 0:
                break
            buf += (await reader.readexactly(size)).replace(b"\r\n", b"\n")  # sse-starlette ends lines with CRLF
            await reader.readexactly(2)
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    msg = json.loads(line[6:])
                    if msg.get("usage"):
                        usage = msg["usage"]
                    if msg.get("choices") and msg["choices"][0].get("text"):
                        arrivals.append(time.perf_counter())
    finally:
        writer.close()
    if not arrivals:
        return {"status": status, "error": "no tokens streamed"}
    return {"status": status, "start": t0, "arrivals": arrivals,
            "tokens": usage["completion_tokens"] if usage else len(arrivals)}


async def run_level(host: str, port: int, headers: dict, model: str, concurrency: int, per_client: int,
                    prompt_tokens: int, max_tokens: int, vocab: int, seed: int) -> dict:
    rng = random.Random(seed)

    async def client() -> list[dict]:
        out = []
        for _ in range(per_client):
            prompt = [rng.randrange(10, vocab) for _ in range(prompt_tokens)]  # distinct: no prefix reuse
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            out.append(await stream_completion(host, port, headers, body))
        return out

    t0 = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(client() for _ in range(concurrency))) for r in rs]
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200 and "error" not in r]
    ttft = sorted(r["arrivals"][0] - r["start"] for r in ok)
    gaps = sorted(b - a for r in ok for a, b in zip(r["arrivals"], r["arrivals"][1:]))

    def pct(xs: list[float], q: float) -> float:
        return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 2) if xs else float("nan")

    return {"concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
            "error_sample": next((r.get("error") for r in results if "error" in r), None),
            "ttft_ms_p50": pct(ttft, 0.5), "ttft_ms_p90": pct(ttft, 0.9),
            "itl_ms_p50": pct(gaps, 0.5), "itl_ms_p90": pct(gaps, 0.9),
            "itl_ms_mean": round(1000 * statistics.fmean(gaps), 2) if gaps else float("nan"),
            "output_tok_s": round(sum(r["tokens"] for r in ok) / wall, 1), "requests_s": round(len(ok) / wall, 2),
            "wall_s": round(wall, 2)}


def wait_ready(host: str, port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                s.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                if b" 200 " in s.recv(100):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server did not answer /health within {timeout:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server (else --serve starts one)")
    ap.add_argument("--serve", help="model folder to serve with `trellm serve` for the benchmark")
    ap.add_argument("--make", choices=("8b", "tiny"), help="write the random model (+ tokenizer) to --serve first")
    ap.add_argument("--model", help="model id (default: the served folder's name)")
    ap.add_argument("--api-key", default=os.environ.get("TRELLM_API_KEY"))
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per level")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--vocab", type=int, help="token ids drawn below this (default: the model's vocabulary)")
    ap.add_argument("--serve-args", default="", help="extra arguments for trellm serve")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    if not args.url and not args.serve:
        ap.error("give --url of a running server or --serve MODEL_FOLDER")
    proc = None
    if args.serve:
        folder = Path(args.serve)
        if args.make:
            make_model(folder, "llama3-8b" if args.make == "8b" else "tiny")
        port = free_port()
        levels = [int(c) for c in args.concurrency.split(",")]
        cmd = [sys.executable, "-m", "trellm.cli.main", "serve", "-m", str(folder), "--port", str(port),
               "--max-batch", str(max(levels)), *args.serve_args.split()]
        proc = subprocess.Popen(cmd)
        host = "127.0.0.1"
        wait_ready(host, port, proc, args.startup_timeout)
        model = args.model or folder.name
        vocab = args.vocab or json.loads((folder / "config.json").read_text())["vocab_size"]
    else:
        u = urlparse(args.url)
        host, port = u.hostname, u.port or 80
        if not args.model:
            ap.error("--model is needed with --url")
        model, vocab = args.model, args.vocab or 1000
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        asyncio.run(run_level(host, port, headers, model, 1, 1, 8, 4, vocab, 0))  # warm-up (compiles, graphs)
        rows = [asyncio.run(run_level(host, port, headers, model, c, args.requests, args.prompt_tokens,
                                      args.max_tokens, vocab, c)) for c in (int(x) for x in args.concurrency.split(","))]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    print(f"{'conc':>5} {'reqs':>5} {'err':>4} {'TTFT p50':>9} {'p90':>7} {'ITL p50':>8} {'p90':>7} "
          f"{'out tok/s':>10} {'req/s':>6}")
    for r in rows:
        print(f"{r['concurrency']:>5} {r['requests']:>5} {r['errors']:>4} {r['ttft_ms_p50']:>9} {r['ttft_ms_p90']:>7} "
              f"{r['itl_ms_p50']:>8} {r['itl_ms_p90']:>7} {r['output_tok_s']:>10} {r['requests_s']:>6}")
    result = {"prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "rows": rows}
    try:
        import torch

        result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except ImportError:
        pass
    print(json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
