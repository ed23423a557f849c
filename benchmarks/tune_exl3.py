"""Launch-parameter sweep for the EXL3 kernels (CUDA-graph timing, rotating weight copies).

    python benchmarks/tune_exl3.py [--shapes ...] [--bits 2,4] [--kind fma|mma|dequant]

Prints µs per call for each variant; the fastest settings become the defaults in
kernels/exl3_gemv.py and kernels/exl3_dispatch.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import torch

from bench_gemm import DEFAULT_SHAPES, make_layers, time_graph
from trellm.kernels.exl3_decode import dequantize
from trellm.kernels.exl3_gemv import exl3_gemv
from trellm.kernels.hadamard import had_in


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--bits", default="2,4")
    ap.add_argument("--kind", default="fma")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    out = []
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        for bits in map(int, args.bits.split(",")):
            copies = max(2, math.ceil(3 * l2 / (k * n * bits / 8)))
            layers = make_layers(k, n, bits, copies, dev)
            m = 1 if args.kind == "fma" else 16
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            xh, xs = had_in(x, layers[0].suh)
            t_had = time_graph([lambda lay=lay: had_in(x, lay.suh) for lay in layers])
            out.append({"k": k, "n": n, "bits": bits, "had_in_graph_us": round(t_had, 2)})
            print(json.dumps(out[-1]), flush=True)
            if args.kind == "dequant":
                t = time_graph([lambda lay=lay: dequantize(lay.trellis, lay.codebook, transposed=True)
                                for lay in layers], reps=5)
                out.append({"k": k, "n": n, "bits": bits, "dequant_us": round(t, 2)})
                print(json.dumps(out[-1]), flush=True)
                continue
            grid = itertools.product((2, 4, 8), (4, 8), (True,), (1.0, 2.0, 4.0))
            for ta, nw, pf, sc in grid:
                if args.kind == "mma" and not pf:
                    continue
                try:
                    t = time_graph([lambda lay=lay: exl3_gemv(xh, xs, lay.trellis, lay.svh, None, lay.codebook, n,
                                                              torch.bfloat16, ta=ta, num_warps=nw, prefetch=pf,
                                                              split_scale=sc, fma=args.kind == "fma")
                                    for lay in layers])
                except Exception as e:  # a variant that does not compile (registers, shared memory)
                    print("skip", ta, nw, pf, sc, type(e).__name__, str(e)[:100])
                    continue
                out.append({"k": k, "n": n, "bits": bits, "ta": ta, "nw": nw, "prefetch": pf, "split_scale": sc,
                            "us": round(t, 2)})
                print(json.dumps(out[-1]), flush=True)
            del layers
    best = {}
    for r in out:
        if "us" not in r:
            continue
        key = (r["k"], r["n"], r["bits"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    print("\nbest per shape:")
    for r in best.values():
        print(json.dumps(r))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
