"""Where the time of one exl3_tc launch goes, program by program: each program records its SM, the global
timer at its start and end, and its own SM-cycle counts (all, and inside its K-loops). Prints how late the
programs start, how long their K-loops and the rest (segment setup, partial sums, epilogue) take, and how
many programs are alive over the launch — the ramp, the steady state and the tail Nsight Compute only shows
summed (benchmarks/RESULTS.md: SM sub-partitions idle a quarter of the kernel's duration).

    python benchmarks/timeline_tc.py [--k 4096 --n 14336 --bits 4 --m 1] [--prefetch 0|1] [--xcoal 0|1]

A diagnostic build of the kernel (TIMELINE): its timings include the clock reads, a few per program.
"""

from __future__ import annotations

import argparse

import torch

from bench_gemm import one_layer_input
from trellm.kernels.exl3_tc import exl3_gemv_tc


def pct(t: torch.Tensor, q: float) -> float:
    return float(torch.quantile(t.double(), q))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefetch", type=int, default=None)
    ap.add_argument("--xcoal", type=int, default=None, help="x rows through shared memory (default: by m)")
    ap.add_argument("--bins", type=int, default=12)
    args, lay, xh, xs = one_layer_input(ap)
    pf = None if args.prefetch is None else bool(args.prefetch)
    for _ in range(5):  # compile, then let clocks and caches settle; keep the last record
        _, rec = exl3_gemv_tc(xh, xs, lay.trellis, lay.svh, None, lay.codebook, args.n, torch.bfloat16,
                              prefetch=pf, timeline=True,
                              x_coalesced=None if args.xcoal is None else bool(args.xcoal))
    torch.cuda.synchronize()
    rec = rec.cpu()
    sm, t0, t1, cycles_loop, cycles = rec[:, 0], rec[:, 1], rec[:, 2], rec[:, 4], rec[:, 5]
    start, end = t0 - t0.min(), t1 - t0.min()
    span = int(end.max())
    ghz = float((cycles / (t1 - t0).clamp(min=1)).median())  # SM cycles per global-timer ns
    print(f"{args.k}->{args.n} K={args.bits} m={args.m}: {rec.shape[0]} programs on {int(sm.unique().numel())} SMs, "
          f"launch span {span / 1000:.2f} us (global timer), ~{ghz:.2f} cycles/ns")
    print(f"  start offset us: median {pct(start, .5) / 1000:.2f}  p90 {pct(start, .9) / 1000:.2f}  "
          f"max {float(start.max()) / 1000:.2f}")
    print(f"  end offset us:   min {float(end.min()) / 1000:.2f}  median {pct(end, .5) / 1000:.2f}  "
          f"p90 {pct(end, .9) / 1000:.2f}  max {span / 1000:.2f}")
    rest = cycles - cycles_loop
    print(f"  program cycles: median {pct(cycles, .5):.0f} (K-loops {pct(cycles_loop, .5):.0f}, rest "
          f"{pct(rest, .5):.0f}), min {float(cycles.min()):.0f}, max {float(cycles.max()):.0f} "
          f"(K-loops max {float(cycles_loop.max()):.0f}, rest max {float(rest.max()):.0f})")
    edges = torch.linspace(0, span, args.bins + 1)
    alive = [int(((start < hi) & (end > lo)).sum()) for lo, hi in zip(edges[:-1], edges[1:])]
    print("  programs alive per 1/%d of the span: %s" % (args.bins, " ".join(map(str, alive))))
    per_sm = torch.zeros(int(sm.max()) + 1, dtype=torch.int64)
    per_sm.scatter_reduce_(0, sm, end, "amax")
    done = per_sm[per_sm > 0]
    print(f"  last program end per SM us: min {float(done.min()) / 1000:.2f}  median {pct(done, .5) / 1000:.2f}  "
          f"max {float(done.max()) / 1000:.2f}")


if __name__ == "__main__":
    main()
