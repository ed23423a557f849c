"""End-to-end speed of the continuously batched generator (issue 5): a random-weight model of the
Llama-3-8B shape, EXL3 (4.0 bpw layers, 6-bit head) or bf16, written by trellm's writer and loaded by the
normal loader.

    python benchmarks/bench_e2e.py --out /tmp/l3-exl3 [--format exl3|bf16] [--batches 1,4,16,64]
    python benchmarks/bench_e2e.py --preset tiny --out /tmp/tiny --device cpu     # a CPU smoke run
    python benchmarks/bench_e2e.py --out /tmp/l3-exl3 --batches 1,16 --variants "base|TRELLM_PDL=0" --rounds 2

Per batch size B: B jobs with 128-token prompts and 256 new tokens each; decode tokens/s = B·(new - 1) over
the time from the last job's first token to the end; time to first token = until every job has one. Then
three 4096-token prompts (distinct, none served from the prefix cache) for prefill tokens/s, the median.
At batch 1 on a GPU also the bytes a decode step reads against the card's copy bandwidth (measured as
bench_gemm.py does) and its datasheet's. Prints a table and one JSON object.

--variants A/B-times the kernel switches (environment variables the kernels read at import; `base` = as
started) in one process: the model loads once, each variant gets a fresh generator (plans, compiled
kernels and captured graphs of its own) and the variants run in turn, `--rounds` times: decode and prefill.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from trellm.engine.generator import Generator, Job
from trellm.models.loader import load_model
from trellm.quant.exl3_writer import write_random_exl3_model

PRESETS = {
    "llama3-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    "tiny": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 256,
        "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 8192, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "bos_token_id": 1,
        "eos_token_id": 2,
    },
}


def run_batch(gen: Generator, batch: int, prompt_len: int, new: int, vocab: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    jobs = [Job(torch.randint(10, vocab, (prompt_len,), generator=g).tolist(), max_new_tokens=new) for _ in range(batch)]
    t0 = time.perf_counter()
    ids = [gen.enqueue(j) for j in jobs]
    first: dict[int, float] = {}
    tokens = 0
    for r in gen.stream():
        now = time.perf_counter()
        first.setdefault(r.job_id, now)
        tokens += len(r.new_token_ids)
    end = time.perf_counter()
    last_first = max(first[i] for i in ids)
    decode_tokens = tokens - batch
    return {"batch": batch, "ttft_s": round(last_first - t0, 4),
            "decode_tok_s": round(decode_tokens / max(end - last_first, 1e-9), 1), "tokens": tokens}


def measure_prefill(gen: Generator, length: int, vocab: int, rounds: int, seed: int) -> float:
    """Median tokens/s of `rounds` one-token jobs with distinct random prompts of `length` tokens, each
    checked to reuse nothing from the prefix cache (a repeated prompt would be served from it)."""
    g = torch.Generator().manual_seed(seed)
    speeds = []
    for _ in range(rounds):
        job = Job(torch.randint(10, vocab, (length,), generator=g).tolist(), max_new_tokens=1)
        t0 = time.perf_counter()
        gen.enqueue(job)
        results = list(gen.stream())
        speeds.append(length / (time.perf_counter() - t0))
        cached = results[0].cached_tokens
        assert not cached, f"the prefill prompt reused {cached} cached tokens"
    return sorted(speeds)[len(speeds) // 2]


# Datasheet memory bandwidth, TB/s, by a substring of torch.cuda.get_device_name().
DATASHEET_TB_S = {"H100 80GB HBM3": 3.35, "H100 PCIe": 2.0, "H200": 4.8, "H100 NVL": 3.9}


def bandwidth_report(model, row: dict, copy_bw: float) -> dict:
    """What a batch-1 decode step reads (every tensor of the model on the GPU once, except the embedding
    table, of which it reads one row — a tied head holds the same storage and counts it) against the card's
    measured copy bandwidth (`copy_bw`, bytes/s read + written: bench_gemm.copy_bandwidth) and its datasheet's.
    The KV cache read (a few hundred tokens) is left out: < 0.1 % here."""
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None or t.device.type != "cuda" or t.data_ptr() in seen or name.endswith("embed_weight"):
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    per_s = total * row["decode_tok_s"]
    name = torch.cuda.get_device_name()
    sheet = next((v for k, v in DATASHEET_TB_S.items() if k in name), None)
    return {"GB_per_token": total / 1e9, "TB_s": per_s / 1e12, "copy_TB_s": copy_bw / 1e12,
            "of_copy_bw": per_s / copy_bw, "of_datasheet": per_s / 1e12 / sheet if sheet else None}


SWITCH_DEFAULTS = {"TRELLM_PDL": "1", "TRELLM_PDL_PREFETCH": "0", "TRELLM_PDL_EARLY": "1", "TRELLM_SMALL_M": "tc",
                   "TRELLM_TC_MAX_M": "64", "TRELLM_TC_XCOAL_M": "2", "TRELLM_OVERLAP": "0", "TRELLM_ATTN_ROTATE": "1",
                   "TRELLM_LARGE_M": "scratch", "TRELLM_LARGE_M_OVERLAP": "0"}


def set_switch(name: str, value: str) -> None:
    """Set one of the kernels' import-time switches in the running process."""
    import trellm.kernels as kernels
    from trellm.kernels import exl3_dispatch, exl3_gemv, exl3_tc

    if name == "TRELLM_PDL":
        kernels.PDL = value == "1"
        kernels.pdl_on.cache_clear()
    elif name == "TRELLM_PDL_PREFETCH":  # imported by name into both GEMV modules
        kernels.PDL_PREFETCH = exl3_gemv.PDL_PREFETCH = exl3_tc.PDL_PREFETCH = int(value)
    elif name == "TRELLM_PDL_EARLY":  # imported by name into exl3_tc
        kernels.PDL_EARLY = exl3_tc.PDL_EARLY = value == "1"
    elif name == "TRELLM_SMALL_M":
        exl3_dispatch.SMALL_M_KERNEL = value
    elif name == "TRELLM_TC_MAX_M":
        exl3_dispatch.TC_MAX_M = int(value)
    elif name == "TRELLM_TC_XCOAL_M":
        exl3_tc.XCOAL_M = int(value)
    elif name == "TRELLM_ATTN_ROTATE":  # read at each decode step
        from trellm.cache import paged

        paged.ATTN_ROTATE = value == "1"
    elif name == "TRELLM_LARGE_M":  # read at each large-batch matmul
        exl3_dispatch.LARGE_M = value
    elif name == "TRELLM_LARGE_M_OVERLAP":
        exl3_dispatch.EFFECTIVE_OVERLAP = int(value)
    elif name == "TRELLM_OVERLAP":  # read when a Generator is made (each variant makes its own)
        from trellm.engine import generator

        generator.OVERLAP = value == "1"
    else:
        raise SystemExit(f"--variants: {name} is not a switch this script can set ({', '.join(SWITCH_DEFAULTS)})")
    exl3_gemv._PLANS.clear()
    exl3_tc._PLANS.clear()


def run_variants(model, args, cfg: dict, batches: list[int]) -> None:
    """Each variant on a fresh generator, in turn, args.rounds times: decode tok/s per batch, and the prefill
    tok/s of args.prefill-token prompts (measure_prefill) where args.prefill > 0."""
    variants = args.variants.split("|")
    # Each variant starts from the switches as this process started (environment or the kernels' defaults).
    started = {name: os.environ.get(name, default) for name, default in SWITCH_DEFAULTS.items()}
    table = {v: [] for v in variants}
    for rnd in range(args.rounds):
        for v in variants:
            for name, value in started.items():
                set_switch(name, value)
            for assign in filter(None, v.split(",")):
                if assign != "base":
                    set_switch(*assign.split("=", 1))
            gen = Generator(model, max_batch_tokens=max(2048, args.prefill), max_seqs=max(batches))
            gen.warmup()
            for b in batches:
                run_batch(gen, b, args.prompt, 3, cfg["vocab_size"], 0)
            rows = [run_batch(gen, b, args.prompt, args.new, cfg["vocab_size"], b + rnd) for b in batches]
            prefill = measure_prefill(gen, args.prefill, cfg["vocab_size"], 3, 2000 + rnd) if args.prefill else 0.0
            table[v].append([r["decode_tok_s"] for r in rows] + [prefill])
            print(json.dumps({"round": rnd, "variant": v, "rows": rows, "prefill_tok_s": prefill}), flush=True)
            del gen
            torch.cuda.empty_cache()
    heads = [f"batch {b}" for b in batches] + [f"prefill {args.prefill}"]
    print(f"{'variant':<40}" + "".join(f"{h:>16}" for h in heads))
    for v, runs in table.items():
        print(f"{v:<40}" + "".join(f"{' / '.join(f'{r[i]:.0f}' for r in runs):>16}" for i in range(len(heads))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="model folder (written if missing)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    ap.add_argument("--format", choices=("exl3", "bf16"), default="exl3")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--head-bits", type=int, default=6)
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prefill", type=int, default=4096)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json-out")
    ap.add_argument("--variants",
                    help="'|'-separated variants, each 'base' or NAME=VALUE[,NAME=VALUE] (kernel switches)")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    cfg = PRESETS[args.preset]
    out = Path(args.out)
    if not (out / "config.json").is_file():
        write_random_exl3_model(cfg, out, bits=args.bits if args.format == "exl3" else None,
                                head_bits=args.head_bits, shard_bytes=4 * 2**30)
    dtype = "bfloat16" if args.device != "cpu" else "float32"
    model = load_model(out, device=args.device, dtype=dtype)
    weights_gb = torch.cuda.memory_allocated() / 1e9 if args.device != "cpu" else None
    copy_bw = None
    if args.device != "cpu" and not args.variants:  # before the generator sizes its KV pool from free memory
        from bench_gemm import copy_bandwidth

        copy_bw = copy_bandwidth(torch.device(args.device))
        torch.cuda.empty_cache()  # its 2 GiB go back before the pool is sized
    batches = [int(b) for b in args.batches.split(",")]
    if args.variants:
        run_variants(model, args, cfg, batches)
        return
    gen = Generator(model, max_batch_tokens=max(2048, args.prefill), max_seqs=max(batches))
    # Warm-up: Generator.warmup compiles the kernels of every batch-size class and captures every decode
    # graph (a batch of B jobs with few new tokens rarely decodes all B at once, so its own pass left the
    # largest buckets to be captured — and their kernels compiled — inside the timed run: batch 64 measured
    # 545 instead of ~4,400 tok/s on an H100); then one short run per batch size.
    gen.warmup()
    for b in batches:
        run_batch(gen, b, args.prompt, 3, cfg["vocab_size"], 0)
    measure_prefill(gen, args.prefill, cfg["vocab_size"], rounds=1, seed=999)
    rows = [run_batch(gen, b, args.prompt, args.new, cfg["vocab_size"], b) for b in batches]
    prefill = measure_prefill(gen, args.prefill, cfg["vocab_size"], rounds=3, seed=1000)
    result = {"device": torch.cuda.get_device_name() if args.device != "cpu" else "cpu", "preset": args.preset,
              "format": args.format, "bits": args.bits if args.format == "exl3" else 16, "rows": rows,
              "prefill_tok_s": round(prefill, 1),
              "bandwidth": bandwidth_report(model, rows[0], copy_bw) if copy_bw and batches[0] == 1 else None,
              "weights_GB": round(weights_gb, 2) if weights_gb is not None else None,
              "kv_cache_tokens": gen.pool.num_pages * gen.pool.page_size,
              "gpu_mem_GB": round(torch.cuda.max_memory_allocated() / 1e9, 2) if args.device != "cpu" else None}
    print(f"{'batch':>6} {'TTFT s':>8} {'decode tok/s':>13}")
    for r in rows:
        print(f"{r['batch']:>6} {r['ttft_s']:>8.3f} {r['decode_tok_s']:>13.1f}")
    print(f"prefill {args.prefill} tokens: {prefill:.0f} tok/s (median of 3 distinct prompts)")
    if result["bandwidth"]:
        bw = result["bandwidth"]
        sheet = f", {bw['of_datasheet']:.1%} of its datasheet's" if bw["of_datasheet"] else ""
        print(f"batch 1 reads {bw['GB_per_token']:.2f} GB per token: {bw['TB_s']:.2f} TB/s = "
              f"{bw['of_copy_bw']:.1%} of this card's measured copy bandwidth "
              f"({bw['copy_TB_s']:.2f} TB/s){sheet}")
    print(json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
