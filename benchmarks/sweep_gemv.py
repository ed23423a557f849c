"""Quick launch-shape sweep of the m = 1 decode-GEMV (CUDA-graph timing), for the kernel-tuning log.

    python benchmarks/sweep_gemv.py
"""

from __future__ import annotations

import json
import math

import torch

from bench_gemm import make_layers, time_graph
from trellm.kernels.exl3_gemv import exl3_gemv
from trellm.kernels.hadamard import had_in

CONFIGS = [  # (tile rows per iteration, warps, register cap, split scale)
    (2, 4, None, 2.0), (4, 4, None, 2.0), (4, 8, None, 1.0), (8, 8, None, 1.0), (8, 4, None, 1.0), (2, 8, None, 2.0),
]


def main() -> None:
    dev = torch.device("cuda")
    for k, n in [(4096, 14336), (14336, 4096), (4096, 4096)]:
        for bits in (2, 4, 3):
            layers = make_layers(k, n, bits, max(2, math.ceil(150e6 / (k * n * bits / 8))), dev)
            x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
            xh, xs = had_in(x, layers[0].suh)
            for ta, nw, mr, sc in CONFIGS:
                t = time_graph([lambda lay=lay: exl3_gemv(xh, xs, lay.trellis, lay.svh, None, lay.codebook, n,
                                                          torch.bfloat16, ta=ta, num_warps=nw, maxnreg=mr,
                                                          split_scale=sc) for lay in layers])
                print(json.dumps({"k": k, "n": n, "bits": bits, "ta": ta, "nw": nw, "maxnreg": mr, "split": sc,
                                  "us": round(t, 2)}), flush=True)


if __name__ == "__main__":
    main()
