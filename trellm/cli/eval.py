"""`trellm eval ppl|kld`: perplexity, and KL-divergence against the unquantized model."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity / KL-divergence of a model on a text",
                       description="Perplexity of a model on a text, cut into non-overlapping windows; with kld, "
                                   "also the KL-divergence from a reference model and the top-1 agreement.")
    p.add_argument("metric", choices=("ppl", "kld"))
    p.add_argument("-m", "--model", required=True, help="model folder (e.g. the EXL3 output)")
    p.add_argument("--reference", help="reference model folder (needed for kld)")
    p.add_argument("--text", required=True, help="text file, tokenized whole without special tokens")
    p.add_argument("--window", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--windows", type=int, default=None, help="use only the first N windows")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None,
                   help="compute dtype of both models (default: float32 for kld — bf16 rounding alone puts "
                        "SmolLM2-135M at KL 0.001 from its float32 self, the size of a 6-bpw model's loss; "
                        "the model's own dtype for ppl)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from trellm.engine.evaluate import evaluate, windows_of
    from trellm.errors import ConfigError
    from trellm.io.tokenizer import Tokenizer
    from trellm.models.loader import load_model

    if args.metric == "kld" and not args.reference:
        raise ConfigError("kld needs --reference (the unquantized model folder)")
    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {args.text}: {e.strerror or e}") from e
    ids = Tokenizer.from_folder(args.model).encode(text, add_special_tokens=False)
    windows = windows_of(ids, args.window, args.windows)
    dtype = args.dtype or ("float32" if args.metric == "kld" else None)
    model = load_model(args.model, device=args.device, dtype=dtype)
    reference = load_model(args.reference, device=args.device, dtype=dtype) if args.reference else None
    result = evaluate(model, windows, reference)
    if args.json:
        print(json.dumps(dataclasses.asdict(result)))
    else:
        print(f"windows {result.windows} × {args.window} tokens; perplexity {result.perplexity:.4f}")
        if reference is not None:
            print(f"reference perplexity {result.reference_perplexity:.4f}; KL-divergence {result.kl_divergence:.5f}; "
                  f"top-1 agreement {100 * result.top1_agreement:.2f} %")
    sys.stdout.flush()
    return 0
