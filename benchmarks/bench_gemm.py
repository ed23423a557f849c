"""EXL3 matmul speed against torch bf16 F.linear (issue 3).

    python benchmarks/bench_gemm.py [--shapes 4096x14336,...] [--bits 2,3,4,5,6,8] [--m 1,4,16,64,512,4096]
                                    [--graphs] [--check] [--json-out FILE]

Every layer is a random EXL3 linear (random trellis codes, random-sign scales).
Weights are rotated among enough copies to exceed L2, so every call reads its
trellis from DRAM. Times are medians over repeats of CUDA-event-timed loops (and,
with --graphs, of CUDA-graph replays for m <= 16). Reports µs per call, the
effective GB/s of trellis read and its fraction of the card's measured
device-to-device copy bandwidth, and the ratio to bf16.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch
import torch.nn.functional as F

from trellm.kernels.exl3_decode import dequantize, dequantize_effective
from trellm.kernels.exl3_dispatch import exl3_gemm_dequant, exl3_gemm_effective, exl3_matmul, small_m_limit
from trellm.kernels.exl3_gemv import exl3_gemv
from trellm.kernels.hadamard import had_in, had_out
from trellm.quant import exl3_format as fmt
from trellm.quant.exl3 import EXL3Linear
from trellm.quant.exl3_writer import random_linear

DEFAULT_SHAPES = "4096x14336,14336x4096,4096x4096,4096x128256"


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), as the card delivers it."""
    a = torch.empty(2**30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    t = time_calls([lambda: b.copy_(a)], reps=10)
    return 2 * a.numel() / (t * 1e-6)


def time_calls(calls, *, reps: int = 20, repeats: int = 5) -> float:
    """Median µs per call, cycling through `calls` (one per weight copy)."""
    for c in calls[:3]:
        c()
    results = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(reps):
            calls[i % len(calls)]()
        end.record()
        end.synchronize()
        results.append(start.elapsed_time(end) * 1000 / reps)
    return statistics.median(results)


def time_graph(calls, *, reps: int = 20, repeats: int = 5) -> float:
    """Median µs per call when `reps` calls are replayed from one CUDA graph."""
    for c in calls[:3]:
        c()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls[:3]:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            calls[i % len(calls)]()
    graph.replay()
    torch.cuda.synchronize()
    results = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        results.append(start.elapsed_time(end) * 1000 / reps)
    return statistics.median(results)


def one_layer_input(ap) -> tuple:
    """--k --n --bits --m (defaults: the 4096→14336 GEMV at 4 bits, one row) -> parsed args, one layer,
    and its had_in(x) (x', sums), for the one-launch profiling scripts."""
    from trellm.kernels.hadamard import had_in

    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=14336)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--m", type=int, default=1)
    args = ap.parse_args()
    lay = make_layers(args.k, args.n, args.bits, 1, torch.device("cuda"))[0]
    x = torch.randn(args.m, args.k, device="cuda", dtype=torch.bfloat16)
    return args, lay, *had_in(x, lay.suh)


def make_layers(k: int, n: int, bits: int, copies: int, device, codebook: str = "mul1") -> list[EXL3Linear]:
    g = torch.Generator().manual_seed(k * 7 + n * 3 + bits)
    layers = []
    for _ in range(copies):
        lin = EXL3Linear(k, n, False)
        tr, suh, svh = random_linear(k, n, bits, generator=g)
        lin.set_tensors(tr, suh=suh, svh=svh, codebook=codebook, device=device)
        layers.append(lin)
    return layers


def check(layer: EXL3Linear, m: int, device) -> float:
    """Max error of the kernel path relative to max |y| of the fp32 reference."""
    x = torch.randn(m, layer.in_features, device=device, dtype=torch.bfloat16)
    y = exl3_matmul(x, layer).float()
    ref = fmt.exl3_linear_ref(F.pad(x.float(), (0, layer.k_pad - layer.in_features)), layer.trellis, layer.suh,
                              layer.svh, layer.codebook)[:, : layer.out_features]
    return ((y - ref).abs().max() / ref.abs().max()).item()


def large_m_parts(layers: list[EXL3Linear], x: torch.Tensor, n: int) -> dict:
    """µs of each step of the large-m path (exl3_dispatch.exl3_gemm_dequant) alone, cycling through the
    layers like the whole call: had_in of x, the decode of the whole Q^T into one fp16 scratch (the path
    decodes in chunks of SCRATCH_ELEMS, one chunk for the Llama shapes but the head), the fp16 product and
    had_out. Their sum against the whole call shows what the chunking and launches add. Then the same for
    both large-m paths side by side (exl3_dispatch.LARGE_M, whatever the default): "scratch_us" the fp16 path
    whole; "eff_dot_us" / "eff_fwht_us" the effective weight's decode alone (two transforms); "eff_mm_us" the
    product x @ W in x's dtype; "effective_us" exl3_gemm_effective whole (dot transform), "eff_overlap4_us"
    the same in 4 column chunks decoded on a side stream ahead of their products."""
    lay0 = layers[0]
    xh, _ = had_in(x, lay0.suh)
    scratch = torch.empty(lay0.n_pad, lay0.k_pad, device=x.device, dtype=torch.float16)
    q_t = dequantize(lay0.trellis, lay0.codebook, transposed=True, out=scratch)
    y_h = torch.empty(x.shape[0], lay0.n_pad, device=x.device, dtype=torch.float16)
    parts = {
        "had_in_us": [lambda lay=lay: had_in(x, lay.suh) for lay in layers],
        "decode_us": [lambda lay=lay: dequantize(lay.trellis, lay.codebook, transposed=True, out=scratch)
                      for lay in layers],
        "mm_us": [lambda: torch.mm(xh, q_t.t(), out=y_h)],
        "had_out_us": [lambda lay=lay: had_out(y_h, lay.svh, None, n, x.dtype) for lay in layers],
        "scratch_us": [lambda lay=lay: exl3_gemm_dequant(had_in(x, lay.suh)[0], lay, x.dtype) for lay in layers],
        "effective_us": [lambda lay=lay: exl3_gemm_effective(x, lay, overlap=0) for lay in layers],
        "eff_overlap4_us": [lambda lay=lay: exl3_gemm_effective(x, lay, overlap=4) for lay in layers],
    }
    w_t = torch.empty(lay0.n_pad, lay0.k_pad, device=x.device, dtype=x.dtype)
    for form in ("dot", "fwht"):
        parts[f"eff_{form}_us"] = [lambda lay=lay, form=form: dequantize_effective(
            lay.trellis, lay.codebook, lay.suh, lay.svh, transform=form, out=w_t) for lay in layers]
    parts["eff_mm_us"] = [lambda: F.linear(x, w_t[:n, : x.shape[1]])]
    return {name: round(time_calls(calls), 2) for name, calls in parts.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--bits", default="2,3,4,5,6,8")
    ap.add_argument("--m", default="1,4,16,64,512,4096")
    ap.add_argument("--no-graphs", dest="graphs", action="store_false",
                    help="skip CUDA-graph replay timing (done for m <= 16 by default)")
    ap.add_argument("--check", action="store_true", help="compare against the reference before timing")
    ap.add_argument("--parts", action="store_true",
                    help="also time the parts alone: at m = 1 had_in and the GEMV; on the large-m path (fp16 "
                         "scratch + cuBLAS) had_in, the whole matrix's decode, the fp16 product and had_out")
    ap.add_argument("--json-out")
    args = ap.parse_args()

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    bw = copy_bandwidth(dev)
    print(f"# {props.name}, {props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MB, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s (read+write)")
    rows = []
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        w_bytes = k * n * 2
        w_copies = max(2, math.ceil(3 * l2 / w_bytes))
        weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(w_copies)]
        bf16 = {}
        for m in map(int, args.m.split(",")):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            bf16[m] = time_calls([lambda w=w, x=x: F.linear(x, w) for w in weights])
            if args.graphs and m <= 16:
                bf16[(m, "g")] = time_graph([lambda w=w, x=x: F.linear(x, w) for w in weights])
        del weights
        for bits in map(int, args.bits.split(",")):
            tr_bytes = k * n * bits / 8
            copies = max(2, math.ceil(3 * l2 / tr_bytes))
            layers = make_layers(k, n, bits, copies, dev)
            errs = {m: check(layers[0], m, dev) for m in (1, 5, 16, 64, 100)} if args.check else {}
            if errs:
                print(json.dumps({"k": k, "n": n, "bits": bits, "max_rel_err": errs}), flush=True)
            for m in map(int, args.m.split(",")):
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                calls = [lambda lay=lay, x=x: exl3_matmul(x, lay) for lay in layers]
                t = time_calls(calls)
                row = {"k": k, "n": n, "bits": bits, "m": m, "us": round(t, 2), "bf16_us": round(bf16[m], 2),
                       "speedup": round(bf16[m] / t, 2), "trellis_GBps": round(tr_bytes / (t * 1e-6) / 1e9, 1),
                       "frac_copy_bw": round(tr_bytes / (t * 1e-6) / (bw / 2), 3)}
                if args.graphs and m <= 16:
                    tg = time_graph(calls)
                    row |= {"graph_us": round(tg, 2), "bf16_graph_us": round(bf16[(m, "g")], 2)}
                if args.parts and m == 1:
                    xh, xs = had_in(x, layers[0].suh)
                    row["had_in_us"] = round(time_calls([lambda lay=lay: had_in(x, lay.suh) for lay in layers]), 2)
                    row["gemv_us"] = round(time_calls([lambda lay=lay: exl3_gemv(
                        xh, xs, lay.trellis, lay.svh, None, lay.codebook, n, torch.bfloat16) for lay in layers]), 2)
                if args.parts and m > small_m_limit(dev):
                    row |= large_m_parts(layers, x, n)
                if m in errs:
                    row["max_rel_err"] = round(errs[m], 5)
                rows.append(row)
                print(json.dumps(row), flush=True)
            del layers
            torch.cuda.empty_cache()
    print()
    print(f"{'shape':>14} {'K':>2} {'m':>5} {'exl3 µs':>9} {'bf16 µs':>9} {'x bf16':>7} {'GB/s':>7} {'%copy':>6}"
          f" {'graph':>7} {'bf16 g':>7}")
    for r in rows:
        print(f"{r['k']:>6}x{r['n']:<7} {r['bits']:>2} {r['m']:>5} {r['us']:>9.2f} {r['bf16_us']:>9.2f} "
              f"{r['speedup']:>7.2f} {r['trellis_GBps']:>7.0f} {100 * r['frac_copy_bw']:>5.0f}%"
              + (f" {r['graph_us']:>7.2f} {r['bf16_graph_us']:>7.2f}" if "graph_us" in r else ""))
    split = [r for r in rows if "decode_us" in r]
    if split:
        print(f"\n{'shape':>14} {'K':>2} {'m':>5} {'exl3 µs':>9} {'had_in':>7} {'decode':>7} {'mm':>7} {'had_out':>7}"
              f" {'sum':>7} {'bf16 µs':>9}")
        for r in split:
            total = r["had_in_us"] + r["decode_us"] + r["mm_us"] + r["had_out_us"]
            print(f"{r['k']:>6}x{r['n']:<7} {r['bits']:>2} {r['m']:>5} {r['us']:>9.2f} {r['had_in_us']:>7.1f} "
                  f"{r['decode_us']:>7.1f} {r['mm_us']:>7.1f} {r['had_out_us']:>7.1f} {total:>7.1f} "
                  f"{r['bf16_us']:>9.2f}")
        print(f"\n{'shape':>14} {'K':>2} {'m':>5} {'scratch':>8} {'effect.':>8} {'eff ovl4':>8} {'eff dot':>8}"
              f" {'eff fwht':>8} {'eff mm':>8} {'bf16 µs':>9} {'x bf16':>7}")
        for r in split:
            best = min(r["effective_us"], r["eff_overlap4_us"])
            print(f"{r['k']:>6}x{r['n']:<7} {r['bits']:>2} {r['m']:>5} {r['scratch_us']:>8.1f} "
                  f"{r['effective_us']:>8.1f} {r['eff_overlap4_us']:>8.1f} {r['eff_dot_us']:>8.1f} "
                  f"{r['eff_fwht_us']:>8.1f} {r['eff_mm_us']:>8.1f} {r['bf16_us']:>9.2f} {r['bf16_us'] / best:>7.2f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"device": props.name, "copy_bw": bw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
