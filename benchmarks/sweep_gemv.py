"""Launch-shape sweep of the small-m stream-K decode-GEMV (CUDA-graph timing) for the kernel-tuning
log in RESULTS.md; each variant is checked against the torch reference first.

    python benchmarks/sweep_gemv.py [--bits 2,4,8] [--m 1,16] [--configs 8x8,4x4,4x4x3]

A config is TAxWARPSxSTAGES[xPROGRAMS_PER_SM][d|p]: tile rows per iteration, warps, pipeline stages of the
FMA kernel's trellis loads, (optionally) programs per SM instead of the count the compiled kernel's
resources allow, and d = per-thread ("direct") loads of the words, p = direct loads with the next
iteration's words prefetched in registers (m = 1 only), e.g. 16x4x1d, 16x4x1p, 8x2x1d. A config `tc` is the
tensor-core kernel of kernels/exl3_tc.py (its default tile rows per iteration), `tc4` / `tc8` with 4 / 8,
`tc8x2` with 2 programs per SM instead of the resident count, `tc8p` / `tc4p` with the next iteration's
words and x rows loaded before the current ones are decoded (`q`: the same in two alternating register
sets; `n`: without; none: the default for m); `c` after the prefetch letter (`tcc`, `tc4nc`): x rows by
16-byte loads, moved into the mma operand through shared memory, `d` there (`tcd`): x rows loaded in the
operand layout by every warp (without either: the default for m).
"""

from __future__ import annotations

import argparse
import json
import math
import re

import torch

from bench_gemm import make_layers, time_graph
from trellm.kernels.exl3_gemv import _RESIDENT, exl3_gemv, exl3_gemv_ref
from trellm.kernels.hadamard import had_in


def report(k, n, bits, m, config, fn, layers, ref, probe) -> None:
    """Check one variant against the reference, time it under graph replay, print one JSON line."""
    try:
        err = ((fn(layers[0]).float() - ref).abs().max() / ref.abs().max()).item()
        t = time_graph([lambda lay=lay: fn(lay) for lay in layers])
    except Exception as e:  # a config the shape cannot take (e.g. TA not dividing the tile rows)
        print(json.dumps({"k": k, "n": n, "bits": bits, "m": m, "variant": config, "error": str(e)[:200]}),
              flush=True)
        return
    print(json.dumps({"k": k, "n": n, "bits": bits, "m": m, "variant": config, "probe": probe, "us": round(t, 2),
                      "err": round(err, 5)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="2,4,8")
    ap.add_argument("--m", default="1")
    ap.add_argument("--shapes", default="4096x14336,14336x4096,4096x4096")
    ap.add_argument("--configs", default="16x4x2,16x4x1,16x4x1d,16x4x1p,8x2x1d,8x2x1p")
    ap.add_argument("--probe", type=int, default=0, help="1: load floor, 2: decode floor (m = 1; wrong results)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        for bits in map(int, args.bits.split(",")):
            layers = make_layers(k, n, bits, max(2, math.ceil(150e6 / (k * n * bits / 8))), dev)
            for m in map(int, args.m.split(",")):
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                xh, xs = had_in(x, layers[0].suh)
                ref = exl3_gemv_ref(xh, xs, layers[0].trellis, layers[0].svh, None, "mul1", n, torch.float32)
                for config in args.configs.split(","):
                    if config.startswith("tc"):
                        from trellm.kernels.exl3_tc import exl3_gemv_tc

                        ta_s, pf, xc, per_sm_s = re.fullmatch(r"tc(\d*)([pnq]?)([cd]?)(?:x(\d+))?", config).groups()

                        def fn(lay, ta=int(ta_s) if ta_s else None, per_sm=int(per_sm_s) if per_sm_s else None,
                               prefetch={"p": True, "q": True, "n": False}.get(pf), pingpong=pf == "q",
                               xc={"c": True, "d": False}.get(xc)):
                            return exl3_gemv_tc(xh, xs, lay.trellis, lay.svh, None, lay.codebook, n, torch.bfloat16,
                                                ta=ta, per_sm=per_sm, prefetch=prefetch, pingpong=pingpong,
                                                x_coalesced=xc)
                        report(k, n, bits, m, config, fn, layers, ref, args.probe)
                        continue
                    loads = config[-1] if config[-1] in "dp" else ""
                    ta, nw, stages, *per_sm = map(int, config.rstrip("dp").split("x"))

                    def fn(lay, ta=ta, nw=nw, stages=stages, per_sm=per_sm[0] if per_sm else None, loads=loads):
                        return exl3_gemv(xh, xs, lay.trellis, lay.svh, None, lay.codebook, n, torch.bfloat16, ta=ta,
                                         num_warps=nw, per_sm=per_sm, stages=stages, probe=args.probe,
                                         direct=loads == "d", prefetch=loads == "p")

                    report(k, n, bits, m, config, fn, layers, ref, args.probe)
    for key, per_sm in _RESIDENT.items():
        print("resident per SM", per_sm, {k: v for k, v in key[1]
                                           if k in ("K", "TA", "FMA", "num_warps", "STAGES", "DIRECT", "PREFETCH")})


if __name__ == "__main__":
    main()
