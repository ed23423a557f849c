"""Quality of `trellm convert` on a real model (issue 4): convert at several bit widths, compare each
result with the original on fixed windows of a text, print a markdown table.

    python benchmarks/kl_table.py --model ~/.cache/trellm/models/SmolLM2-135M-Instruct \
        --text wiki_en.txt --calibration calib.txt --bpw 2,3,4,5,6 [--head-bits 6] [--windows 40] \
        [--channel-scales columns] [--codebook mul1] [--rows 120 --cols 2048] [--work /tmp/kl-table]

The RESULTS.md tables use the first 40 windows × 2,048 tokens of ../shared/data/wiki_en.txt and, as
calibration, the same file from character 500,000 on (120 rows × 2,048 tokens, disjoint from the
windows). Both models are evaluated in float32; the original is loaded once. Each conversion's folders
are deleted after its evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from trellm.engine.evaluate import evaluate, windows_of
from trellm.io.tokenizer import Tokenizer
from trellm.models.loader import load_model
from trellm.quant.convert.job import ConvertArgs, convert


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="the unquantized model folder")
    ap.add_argument("--text", required=True, help="evaluation text (tokenized whole, no special tokens)")
    ap.add_argument("--calibration", help="calibration text file (default: the model's own generated rows)")
    ap.add_argument("--bpw", default="2,3,4,5,6", help="comma-separated bits per weight")
    ap.add_argument("--head-bits", type=int, default=6)
    ap.add_argument("--codebook", default="mul1")
    ap.add_argument("--channel-scales", default="both")
    ap.add_argument("--allocation", default="measured", choices=("measured", "heuristic"))
    ap.add_argument("--rows", type=int, default=120)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--work", default="/tmp/kl-table")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    text = Path(args.text).read_text(encoding="utf-8")
    windows = windows_of(Tokenizer.from_folder(args.model).encode(text, add_special_tokens=False), args.window,
                         args.windows)
    reference = load_model(args.model, device=args.device, dtype="float32")
    work = Path(args.work)
    rows = []
    for bpw in (float(b) for b in args.bpw.split(",")):
        out, job = work / f"exl3-{bpw:g}", work / f"job-{bpw:g}"
        for d in (out, job):
            shutil.rmtree(d, ignore_errors=True)
        t0 = time.perf_counter()
        convert(ConvertArgs(args.model, str(out), str(job), bpw, head_bits=args.head_bits, codebook=args.codebook,
                            calibration=args.calibration, rows=args.rows, cols=args.cols,
                            channel_scales=args.channel_scales, allocation=args.allocation), device=args.device)
        seconds = time.perf_counter() - t0
        result = evaluate(load_model(out, device=args.device, dtype="float32"), windows, reference)
        rows.append({"bpw": bpw, "convert_s": round(seconds, 1), **dataclasses.asdict(result)})
        print(json.dumps(rows[-1]), flush=True)
        for d in (out, job):
            shutil.rmtree(d, ignore_errors=True)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    print(f"\n{Path(args.model).name}, {card}, head {args.head_bits} bits, {args.codebook}, channel scales "
          f"{args.channel_scales}; {len(windows)} windows × {args.window}; original perplexity "
          f"{rows[0]['reference_perplexity']:.3f}")
    print("| bpw | " + " | ".join(f"{r['bpw']:g}" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    print("| perplexity | " + " | ".join(f"{r['perplexity']:.2f}" for r in rows) + " |")
    print("| KL-divergence | " + " | ".join(f"{r['kl_divergence']:.3g}" for r in rows) + " |")
    print("| top-1 agreement | " + " | ".join(f"{100 * r['top1_agreement']:.1f} %" for r in rows) + " |")
    print("| convert time | " + " | ".join(f"{r['convert_s']:.1f} s" for r in rows) + " |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
