"""End-to-end check of issue 3: a Llama-3-8B-shaped EXL3 model (random codes, 4 bpw layers, 6-bit head)
written by trellm's own writer, loaded by the normal loader and run through the simple generate path.

    python benchmarks/bench_e2e_exl3.py --out /tmp/llama3-8b-exl3 [--bits 4] [--head-bits 6] [--new 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from trellm.engine.generate import GenerationRequest, GenerationStats, generate_tokens
from trellm.models.loader import load_model
from trellm.quant.exl3_writer import write_random_exl3_model

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "bos_token_id": 128000,
    "eos_token_id": 128001,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--head-bits", type=int, default=6)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    cfg = {**LLAMA3_8B, "num_hidden_layers": args.layers}
    t0 = time.perf_counter()
    write_random_exl3_model(cfg, args.out, bits=args.bits, head_bits=args.head_bits, shard_bytes=4 * 2**30)
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = load_model(args.out, device="cuda", dtype="bfloat16")
    t_load = time.perf_counter() - t0
    prompt = torch.randint(1000, 100000, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    runs = []
    for i in range(3):
        stats = GenerationStats()
        toks = list(generate_tokens(model, GenerationRequest(prompt, max_new_tokens=args.new), stats))
        if i:
            runs.append(stats)
    result = {
        "device": torch.cuda.get_device_name(), "layers": args.layers, "bits": args.bits, "head_bits": args.head_bits,
        "write_s": round(t_write, 1), "load_s": round(t_load, 1),
        "decode_tok_s": round(statistics.median(s.tokens_per_second for s in runs), 1),
        "prefill_tok_s": round(statistics.median(s.prompt_tokens / s.prefill_seconds for s in runs), 1),
        "gpu_mem_GB": round(torch.cuda.max_memory_allocated() / 1e9, 2), "finite": len(toks) == args.new,
    }
    print(json.dumps(result))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
