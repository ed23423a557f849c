"""`trellm convert`: an unquantized Hugging Face model folder -> an EXL3 folder (resumable)."""

from __future__ import annotations

import argparse
import math
import sys
import time


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="quantize a model to EXL3",
        description="Quantize an unquantized model folder (or an imported GGUF) to EXL3, one layer at a time. "
                    "The job is checkpointed in WORKDIR after every layer; -r continues after a crash or Ctrl-C "
                    "and produces the same output as an uninterrupted run.")
    p.add_argument("-i", "--input", required=True, help="unquantized model folder (config.json + safetensors)")
    p.add_argument("-o", "--output", required=True, help="output folder for the EXL3 model (written at the end)")
    p.add_argument("-w", "--workdir", required=True, help="work folder for the job's checkpoints")
    p.add_argument("-b", "--bpw", type=float, required=True,
                   help="target bits per weight of the decoder layers, 1-8, fractional allowed (e.g. 2.25, 3.5)")
    p.add_argument("-hb", "--head-bits", type=int, default=6, help="bits per weight of the lm_head (default 6)")
    p.add_argument("--codebook", choices=("mul1", "mcg", "3inst"), default="mul1",
                   help="trellis codebook (default mul1, what current EXL3 readers expect)")
    p.add_argument("--calibration", help="text file to calibrate on (default: text the model generates itself, "
                                         "plus random-token rows)")
    p.add_argument("--rows", type=int, default=250, help="calibration rows (default 250)")
    p.add_argument("--cols", type=int, default=2048, help="tokens per calibration row (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--batch", type=int, default=8, help="calibration rows per forward pass (default 8)")
    p.add_argument("-r", "--resume", action="store_true", help="continue the job in WORKDIR")
    p.add_argument("--force-resume", action="store_true",
                   help="with -r: continue even though the arguments differ from the job's")
    p.set_defaults(run=run)


def _progress_printer():
    t0 = time.perf_counter()

    def show(info: dict) -> None:
        n = info["num_layers"]
        elapsed = info.get("elapsed", time.perf_counter() - t0)
        if info["layer"] == "head":
            print(f"head: proxy error {info['proxy']['lm_head']:.4g}  [{elapsed:.0f} s]", file=sys.stderr)
            return
        done = info["layer"] + 1
        remaining = elapsed / done * (n - done)
        proxies = ", ".join(f"{k} {v:.3g}" for k, v in info["proxy"].items())
        bits = sorted(set(info["bits"].values()))
        print(f"layer {done}/{n}: {'/'.join(map(str, bits))} bits, output error {info['rel_error']:.4f} "
              f"(SQNR {-20 * math.log10(max(info['rel_error'], 1e-12)):.1f} dB); proxy {proxies}  "
              f"[{info['seconds']:.1f} s, elapsed {elapsed:.0f} s, ~{remaining:.0f} s left]", file=sys.stderr)

    return show


def run(args: argparse.Namespace) -> int:
    from trellm.quant.convert.job import ConvertArgs, convert

    job = ConvertArgs(input=args.input, output=args.output, workdir=args.workdir, bpw=args.bpw,
                      head_bits=args.head_bits, codebook=args.codebook, calibration=args.calibration,
                      rows=args.rows, cols=args.cols, seed=args.seed)
    out = convert(job, resume=args.resume, force=args.force_resume, device=args.device, batch=args.batch,
                  progress=_progress_printer())
    print(f"wrote {out}", file=sys.stderr)
    return 0
