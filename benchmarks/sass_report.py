"""Compile the EXL3 GEMV for sm_90 on a machine without a GPU and summarise its main loop's SASS.

    python benchmarks/sass_report.py --kind fma --bits 4 --ta 8 --warps 8
    python benchmarks/sass_report.py --kind tc --bits 4 --m 1      # kernels/exl3_tc.py (Gluon)

Uses the ptxas/cuobjdump that ship inside the triton wheel, so kernel changes can be checked
(registers, spills, instructions and loads per weight in the K-loop and per stream-K segment) without
device time. The code depends on the Triton version: to see what the GPU machine compiles, run it with
that machine's Triton (3.6) — e.g. a venv with `pip install triton==3.6.0 "numpy<2.4"` and a .pth file
pointing at this project's venv for torch.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from trellm.kernels import exl3_gemv as g
from trellm.kernels.exl3_decode import MUL1_C1, MUL1_C2

SIGNATURE = {
    "x_ptr": "*fp16", "xsum_ptr": "*fp32", "tr_ptr": "*i32", "svh_ptr": "*fp16", "bias_ptr": "*fp16",
    "y_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32", "NT": "i32",
    "stride_xm": "i32", "stride_ym": "i32", "k_blocks": "i32", "CH": "i32", "U": "i32", "P": "i32", "MAXSEG": "i32",
    "GB1": "i32", "GB2": "i32", "stride_xg": "i32", "stride_sg": "i32",
    "K": "constexpr", "CODEBOOK": "constexpr", "TA": "constexpr", "FMA": "constexpr", "HAS_BIAS": "constexpr",
    "USE_ASM": "constexpr", "C1": "constexpr", "C2": "constexpr", "KB_P2": "constexpr", "STAGES": "constexpr",
    "DIRECT": "constexpr", "PREFETCH": "constexpr", "PDL": "constexpr", "PDL_PF": "constexpr",
}
# What a launch on a Llama shape specialises on (multiples of 16; M = 1 becomes a constant for the FMA kind).
DIVISIBLE = ("N", "NT", "stride_xm", "stride_ym", "k_blocks", "CH", "U", "GB1", "GB2", "stride_xg", "stride_sg")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", choices=("fma", "mma", "tc"), default="fma")
    ap.add_argument("--m", type=int, default=1, help="batch rows (tc kind: picks its mma width and tile rows)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--ta", type=int, default=None, help="tile rows per iteration (default: 16, the tc kind its own)")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=None, help="default 2, 1 with --direct / --prefetch (as exl3_gemv)")
    ap.add_argument("--codebook", type=int, default=0, help="0 mul1, 1 mcg, 2 3inst")
    ap.add_argument("--direct", action="store_true", help="per-thread loads of the words (FMA kind)")
    ap.add_argument("--prefetch", action="store_true", help="direct loads, next iteration's words prefetched")
    ap.add_argument("--pdl", type=int, default=-1,
                    help="compile as a dependent launch that asks L2 for this many iterations before it waits")
    ap.add_argument("--early", action="store_true", help="tc kind, with --pdl: the first words' loads before the wait")
    ap.add_argument("--xcoal", choices=("auto", "0", "1"), default="auto",
                    help="tc kind: x rows by 16-byte loads through shared memory (1), in the operand layout (0)")
    ap.add_argument("--out", default="/tmp/exl3_gemv")
    args = ap.parse_args()
    if not triton.__version__.startswith("3.6."):
        print(f"warning: Triton {triton.__version__}; this script follows Triton 3.6's compile API and the GPU "
              "machine runs 3.6 (see the module docstring)", file=sys.stderr)
    if args.stages is None:
        args.stages = 1 if args.direct or args.prefetch else 2
    if args.kind == "tc":
        from trellm.kernels import exl3_tc

        consts = exl3_tc.tc_constexprs(256, 896, 16 * args.bits, ("mul1", "mcg", "3inst")[args.codebook], args.m,
                                       False, False, ta=args.ta, pdl=args.pdl >= 0, pdl_prefetch=max(0, args.pdl),
                                       x_coalesced={"auto": None, "1": True, "0": False}[args.xcoal],
                                       pdl_early=args.early)
        kernel = exl3_tc.compile_for_sm90(consts)
        args.ta = consts["TA"]
        args.warps = exl3_tc.NUM_WARPS
    else:
        args.ta = args.ta or 16
        kernel = compile_gemv(args)
    summarise(kernel, args)


def compile_gemv(args):
    fn = g._exl3_gemv_kernel
    sig = dict(SIGNATURE)
    consts = {"K": args.bits, "CODEBOOK": args.codebook, "TA": args.ta, "FMA": args.kind == "fma", "HAS_BIAS": False,
              "USE_ASM": True, "C1": MUL1_C1, "C2": MUL1_C2, "KB_P2": 32, "STAGES": args.stages,
              "DIRECT": args.direct or args.prefetch, "PREFETCH": args.prefetch,
              "PDL": args.pdl >= 0, "PDL_PF": max(0, args.pdl)}
    if args.kind == "fma":
        sig["M"], consts["M"] = "constexpr", 1
    names = list(sig)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in names if sig[a].startswith("*") or a in DIVISIBLE}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": args.warps})


def summarise(kernel, args) -> None:
    out = Path(args.out)
    out.with_suffix(".cubin").write_bytes(kernel.asm["cubin"])
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    sass = subprocess.run([tools / "cuobjdump", "-sass", out.with_suffix(".cubin")], capture_output=True,
                          text=True, check=True).stdout
    out.with_suffix(".sass").write_text(sass)
    usage = subprocess.run([tools / "cuobjdump", "-res-usage", out.with_suffix(".cubin")], capture_output=True,
                           text=True, check=True).stdout
    print(" ".join(line.strip() for line in usage.splitlines() if "REG" in line), "| dynamic shared:",
          kernel.metadata.shared)
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]+);", sass)]
    loops = []
    for addr, text in ins:
        m = re.search(r"BRA\s+(?:\S+\s+)?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    # The K-loop: the smallest loop that decodes (holds the codebook's dp4a/multiplies); the outer
    # stream-K loop around it also holds the epilogue.
    decode_op = "HMMA" if args.kind == "tc" else ("IDP" if args.codebook == 0 else "HADD2")
    decoding = [(s, e) for s, e in loops if sum(1 for a, t in ins if s <= a <= e and decode_op in t) >= 4]
    start, end = min(decoding, key=lambda r: r[1] - r[0])
    body = [re.sub(r"^@!?U?P\w+\s+", "", t.strip()).split()[0] for a, t in ins if start <= a <= end]
    weights = 256 if args.kind == "fma" else args.ta * 16 * 128 // (args.warps * 32)  # per thread per iteration
    print(f"K-loop: {len(body)} instructions for {weights} weights per thread = {len(body) / weights:.2f} per weight")
    outer = [(s_, e_) for s_, e_ in loops if s_ < start and e_ > end]
    if outer:  # the stream-K loop: one pass per segment (epilogue, partial sums) around the K-loop
        s_, e_ = min(outer, key=lambda r: r[1] - r[0])
        print(f"per segment outside the K-loop: {sum(1 for a, _ in ins if s_ <= a <= e_) - len(body)} instructions")
    print(collections.Counter(op.split(".")[0] for op in body).most_common(20))
    print("memory:", collections.Counter(op for op in body if op.startswith(("LDG", "LDS", "STS", "SHFL", "LDL", "STL"))))


if __name__ == "__main__":
    main()
