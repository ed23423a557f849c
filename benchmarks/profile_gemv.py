"""One EXL3 decode-GEMV launch to profile under Nsight Compute:

    ncu --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
        -k regex:_exl3_ python benchmarks/profile_gemv.py --bits 4 [--kernel tc]

(--kernel tc: the tensor-core kernel of kernels/exl3_tc.py, kernel name _exl3_tc_kernel.)
"""

from __future__ import annotations

import argparse

import torch

from bench_gemm import one_layer_input
from trellm.kernels.exl3_gemv import exl3_gemv


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ta", type=int, default=None)
    ap.add_argument("--warps", type=int, default=None)
    ap.add_argument("--kernel", choices=("fma", "tc"), default="fma")
    args, lay, xh, xs = one_layer_input(ap)
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
