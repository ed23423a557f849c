"""Decode and prefill speed of the simple generate path on a model folder.

    python benchmarks/bench_generate.py MODEL_DIR [--device cuda] [--dtype bfloat16] [--new 128] [--prompt-len 64]

Prints a table and writes JSON (--json-out). Decode speed is tokens after the first
over the time spent producing them, batch 1, greedy, contiguous KV cache.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from trellm.engine.generate import GenerationRequest, GenerationStats, generate_tokens
from trellm.models.loader import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json-out")
    args = ap.parse_args()

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, model.config.vocab_size - 100, (args.prompt_len,), generator=g).tolist()
    runs = []
    for i in range(args.repeats + 1):  # the first run warms up (allocator, kernels)
        stats = GenerationStats()
        list(generate_tokens(model, GenerationRequest(prompt, max_new_tokens=args.new), stats))
        if i:
            runs.append(stats)
    decode = statistics.median(s.tokens_per_second for s in runs)
    prefill = statistics.median(s.prompt_tokens / s.prefill_seconds for s in runs)
    dev = torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu"
    result = {"model": args.model, "device": dev, "dtype": str(model.dtype), "prompt_tokens": args.prompt_len,
              "new_tokens": args.new, "decode_tokens_per_s": round(decode, 1),
              "prefill_tokens_per_s": round(prefill, 1)}
    print(f"{'device':<22}{'dtype':<16}{'prompt':>8}{'new':>6}{'decode tok/s':>14}{'prefill tok/s':>15}")
    print(f"{dev[:21]:<22}{str(model.dtype):<16}{args.prompt_len:>8}{args.new:>6}{decode:>14.1f}{prefill:>15.1f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
