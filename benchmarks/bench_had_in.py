"""The EXL3 input transform timed under CUDA-graph replay: had_in's two forms, "dot" (one tensor-core
product with the 128×128 Sylvester matrix per [16, 128] block) and "fwht" (butterflies in fp32, blocks of
min(16, m) rows); then what it adds to the kernels that apply it while producing x in a model (the norm
before q/k/v and gate/up, act·mul before down: kernels/fused.py *_rotated) against those kernels alone.

    python benchmarks/bench_had_in.py [--k 4096,14336] [--groups 1,3] [--m 1,16] [--producer-m 1,16,64]

As its own launch the transform ran once per EXL3 linear group (129 calls per token of an 8B model, ~9 %
of a batch-1 decode step); inside the producers only o_proj's 32 launches remain (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse

import torch

from bench_gemm import time_graph
from trellm.kernels import hadamard


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", default="4096,14336")
    ap.add_argument("--groups", default="1,3")
    ap.add_argument("--m", default="1,16")
    ap.add_argument("--producer-m", default="1,16,64")
    args = ap.parse_args()
    print("| k | groups | m | dot µs | fwht µs | max difference (fp16 ulps of the block maximum) |")
    print("|---|---|---|---|---|---|")
    for k in map(int, args.k.split(",")):
        for groups in map(int, args.groups.split(",")):
            for m in map(int, args.m.split(",")):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                suh = torch.randn(groups, k, device="cuda").half()
                times, outs = {}, {}
                for form in ("dot", "fwht"):
                    hadamard.HAD_IN = form
                    outs[form] = hadamard.had_in(x, suh)[0].float()
                    times[form] = time_graph([lambda: hadamard.had_in(x, suh)])
                ref = hadamard.had_in_ref(x, suh[0])[0].float()
                ulp = ref.abs().max().item() * 2.0**-10
                diff = max((outs[f][0] - ref).abs().max().item() for f in outs) / ulp
                print(f"| {k} | {groups} | {m} | {times['dot']:.2f} | {times['fwht']:.2f} | {diff:.1f} |", flush=True)
    hadamard.HAD_IN = "dot"
    producers([int(m) for m in args.producer_m.split(",")])


def producers(rows: list[int], hidden: int = 4096, inter: int = 14336) -> None:
    """Each producer with and without the transform of its consumers (Llama-3-8B widths)."""
    from trellm.kernels.fused import act_mul, act_mul_rotated, add_rms_norm, rms_norm_rotated

    print("\n| producer | m | alone µs | with the transform µs | added µs | had_in alone µs |")
    print("|---|---|---|---|---|---|")
    w = torch.rand(hidden, device="cuda", dtype=torch.bfloat16)
    for m in rows:
        h = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16)
        gate = torch.randn(m, inter, device="cuda", dtype=torch.bfloat16)
        up = torch.randn(m, inter, device="cuda", dtype=torch.bfloat16)
        cases = [(f"residual + RMSNorm → q/k/v (G = 3, k {hidden})", hidden, 3,
                  lambda: add_rms_norm(h, x, w, 1e-5, 0.0, False),
                  lambda suh: rms_norm_rotated(h, x, w, 1e-5, 0.0, False, suh), x),
                 (f"residual + RMSNorm → gate/up (G = 2, k {hidden})", hidden, 2,
                  lambda: add_rms_norm(h, x, w, 1e-5, 0.0, False),
                  lambda suh: rms_norm_rotated(h, x, w, 1e-5, 0.0, False, suh), x),
                 (f"silu(gate)·up → down (G = 1, k {inter})", inter, 1,
                  lambda: act_mul("silu", gate, up),
                  lambda suh: act_mul_rotated("silu", gate, up, suh), gate)]
        for name, k, groups, alone, rotated, src in cases:
            suh = torch.randn(groups, k, device="cuda").half()
            t0 = time_graph([alone])
            t1 = time_graph([lambda: rotated(suh)])
            t2 = time_graph([lambda: hadamard.had_in(src, suh)])
            print(f"| {name} | {m} | {t0:.2f} | {t1:.2f} | {t1 - t0:.2f} | {t2:.2f} |", flush=True)


if __name__ == "__main__":
    main()
