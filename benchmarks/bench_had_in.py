"""had_in's two forms timed under CUDA-graph replay: "dot" (one tensor-core product with the 128×128
Sylvester matrix per [16, 128] block) and "fwht" (butterflies in fp32, blocks of min(16, m) rows).

    python benchmarks/bench_had_in.py [--k 4096,14336] [--groups 1,3] [--m 1,16]

The matmul input transform runs once per EXL3 linear group (129 calls per token of an 8B model), so at
batch 1 its few microseconds are ~9 % of a decode step (benchmarks/RESULTS.md).
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


if __name__ == "__main__":
    main()
