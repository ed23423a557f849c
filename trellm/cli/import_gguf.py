"""`trellm import-gguf`: turn a GGUF file into a Hugging Face-style model folder (bf16 safetensors)."""

from __future__ import annotations

import argparse
import sys
import time


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-gguf", help="convert a GGUF file to a Hugging Face-style folder",
                       description="Dequantize a GGUF model into a Hugging Face-style folder: config.json, "
                                   "tokenizer files with the chat template, and bf16 safetensors.")
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("-o", "--output", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from trellm.io.gguf_import import import_gguf

    t0 = time.perf_counter()
    out = import_gguf(args.gguf, args.output, overwrite=args.overwrite)
    print(f"imported {args.gguf} -> {out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0
