"""One EXL3 decode-GEMV launch to profile under Nsight Compute:

    ncu --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
        -k regex:_exl3_ python benchmarks/profile_gemv.py --bits 4 [--kernel tc]

(--kernel tc: the tensor-core kernel of kernels/exl3_tc.py, kernel name _exl3_tc_kernel.)
"""

from __future__ import annotations

import argparse

import torch

from bench_gemm import make_layers
from trellm.kernels.exl3_gemv import exl3_gemv
from trellm.kernels.hadamard import had_in


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=14336)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--ta", type=int, default=None)
    ap.add_argument("--warps", type=int, default=None)
    ap.add_argument("--kernel", choices=("fma", "tc"), default="fma")
    args = ap.parse_args()
    lay = make_layers(args.k, args.n, args.bits, 1, torch.device("cuda"))[0]
    x = torch.randn(args.m, args.k, device="cuda", dtype=torch.bfloat16)
    xh, xs = had_in(x, lay.suh)
    for _ in range(3):
        if args.kernel == "tc":
            from trellm.kernels.exl3_tc import exl3_gemv_tc

            exl3_gemv_tc(xh, xs, lay.trellis, lay.svh, None, lay.codebook, args.n, torch.bfloat16, ta=args.ta)
        else:
            exl3_gemv(xh, xs, lay.trellis, lay.svh, None, lay.codebook, args.n, torch.bfloat16, ta=args.ta,
                      num_warps=args.warps)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
