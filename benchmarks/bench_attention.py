"""Paged attention kernel speed (issue 5): decode batches and a long prefill, Llama-3-8B heads
(32 query heads, 8 KV heads, head dim 128, bf16, 256-token pages scattered over the pool).

    python benchmarks/bench_attention.py [--layers-note]

Decode: B sequences of C cached tokens, one query each; prints µs per call, the KV bytes read per µs
(GB/s) and that as a fraction of the card's measured copy bandwidth, beside torch SDPA on the same keys
laid out contiguously (what a non-paged cache would cost). Prefill: one T-token prompt, causal, against
torch SDPA (flash) on contiguous keys; prints TFLOP/s (causal: half the square counted).
Times: medians of CUDA-event timings under CUDA-graph replay.
"""

from __future__ import annotations

import argparse
import json
import random

import torch
import torch.nn.functional as F

from bench_gemm import time_graph
from trellm.kernels.paged_attention import decode_splits, paged_attention
from trellm.layers.attention import AttentionParams

H, HKV, D, PAGE = 32, 8, 128, 256


def graph_time(fn, reps: int = 50) -> float:
    """Median µs of fn() replayed from a CUDA graph (bench_gemm's timer)."""
    return time_graph([fn], reps=reps)


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write counted)."""
    a = torch.empty(2**29, device="cuda", dtype=torch.float16)
    b = torch.empty_like(a)
    us = graph_time(lambda: b.copy_(a), reps=20)
    return 2 * a.numel() * 2 / us / 1e3


def paged_setup(batch: int, ctx: int, q_len: int):
    need = -(-(ctx + q_len) // PAGE)
    pages = list(range(batch * need + 1))
    random.Random(0).shuffle(pages)
    kc = torch.randn(len(pages), PAGE, HKV, D, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    table = torch.tensor([pages[i * need : (i + 1) * need] for i in range(batch)], dtype=torch.int32, device="cuda")
    q = torch.randn(batch * q_len, H, D, device="cuda", dtype=torch.bfloat16)
    starts = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    offsets = torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32, device="cuda")
    return q, kc, vc, table, starts, offsets


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json-out")
    ap.add_argument("--prefill-tiles", default="",
                    help="also time prefill with these tiles, e.g. 64x64x4,128x64x8,128x32x4 (query rows x keys x warps)")
    args = ap.parse_args()
    params = AttentionParams(scale=D**-0.5, window=None, softcap=None)
    bw = copy_bandwidth()
    rows = []
    for batch, ctx in [(1, 512), (1, 4096), (16, 512), (16, 4096), (64, 512), (64, 4096)]:
        q, kc, vc, table, starts, offsets = paged_setup(batch, ctx, 1)
        splits = decode_splits(batch, HKV, q.device)
        us = graph_time(lambda: paged_attention(q, kc, vc, table, starts, offsets, params, max_q_len=1,
                                                splits=splits))
        kvbytes = 2 * batch * (ctx + 1) * HKV * D * 2
        kk = torch.randn(batch, HKV, ctx + 1, D, device="cuda", dtype=torch.bfloat16)
        vv = torch.randn_like(kk)
        qq = q.view(batch, 1, H, D).transpose(1, 2)
        sdpa = graph_time(lambda: F.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True))
        rows.append({"kind": "decode", "batch": batch, "ctx": ctx, "splits": splits, "us": round(us, 1),
                     "GB_s": round(kvbytes / us / 1e3), "of_copy_bw": round(kvbytes / us / 1e3 / bw, 2),
                     "sdpa_us": round(sdpa, 1)})
    for t in (1024, 4096):
        q, kc, vc, table, starts, offsets = paged_setup(1, 0, t)
        us = graph_time(lambda: paged_attention(q, kc, vc, table, starts, offsets, params, max_q_len=t), reps=20)
        qq = q.view(1, t, H, D).transpose(1, 2)
        kk = torch.randn(1, HKV, t, D, device="cuda", dtype=torch.bfloat16)
        vv = torch.randn_like(kk)
        sdpa = graph_time(lambda: F.scaled_dot_product_attention(qq, kk.repeat_interleave(H // HKV, 1),
                                                                 vv.repeat_interleave(H // HKV, 1), is_causal=True),
                          reps=20)
        flops = 4 * t * t / 2 * H * D
        rows.append({"kind": "prefill", "batch": 1, "ctx": t, "us": round(us, 1),
                     "TFLOP_s": round(flops / us / 1e6, 1), "sdpa_us": round(sdpa, 1)})
        for spec in filter(None, args.prefill_tiles.split(",")):
            tile = tuple(int(v) for v in spec.split("x"))
            us = graph_time(lambda: paged_attention(q, kc, vc, table, starts, offsets, params, max_q_len=t,
                                                    tile=tile), reps=20)
            rows.append({"kind": f"prefill {spec}", "batch": 1, "ctx": t, "us": round(us, 1),
                         "TFLOP_s": round(flops / us / 1e6, 1), "sdpa_us": round(sdpa, 1)})
    print(f"card: {torch.cuda.get_device_name()}  copy bandwidth {bw:.0f} GB/s")
    print(f"{'kind':>8} {'B':>3} {'ctx':>5} {'µs':>8} {'GB/s|TF/s':>10} {'of bw':>6} {'sdpa µs':>8}")
    for r in rows:
        rate = r.get("GB_s", r.get("TFLOP_s"))
        print(f"{r['kind']:>8} {r['batch']:>3} {r['ctx']:>5} {r['us']:>8.1f} {rate:>10} "
              f"{r.get('of_copy_bw', ''):>6} {r['sdpa_us']:>8.1f}")
    out = {"device": torch.cuda.get_device_name(), "copy_GB_s": round(bw), "rows": rows}
    print(json.dumps(out))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
