"""`trellm inspect`: what a model folder holds, read from config.json and safetensors headers only."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="describe a model folder without loading it",
                       description="Show architecture, size, storage and context of a model folder.")
    p.add_argument("model", help="model folder")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(run=run)


def describe(path: str | Path) -> dict[str, Any]:
    from trellm.io.safetensors import CheckpointReader
    from trellm.models.config import SLIDING
    from trellm.models.loader import load_config

    cfg = load_config(path)
    reader = CheckpointReader(path)
    infos = [reader.info(n) for n in reader.names()]
    dtypes = Counter(i.dtype for i in infos)
    files = {i.file for i in infos}
    rope = {t: {"type": r.rope_type, "theta": r.theta, **({"factor": r.factor} if r.factor else {})}
            for t, r in sorted(cfg.rope.items()) if t in cfg.layer_types}
    quant = cfg.quantization_config
    return {
        "path": str(Path(path).resolve()),
        "architecture": cfg.architecture,
        "parameters": sum(i.numel for i in infos),
        "storage": {k.lower(): v for k, v in dtypes.most_common()},
        "quantization": quant.get("quant_method") if isinstance(quant, dict) else None,
        "bytes": sum(f.stat().st_size for f in files),
        "files": len(files),
        "context_length": cfg.max_position_embeddings,
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "sliding_window": cfg.sliding_window,
        "sliding_layers": sum(t == SLIDING for t in cfg.layer_types),
        "rope": rope,
        "vocab_size": cfg.vocab_size,
        "tied_head": cfg.tie_word_embeddings,
    }


def _human(n: float, unit: str) -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.1f} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
        n /= 1000
    raise AssertionError


def run(args: argparse.Namespace) -> int:
    d = describe(args.model)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    storage = ", ".join(f"{k} ({v} tensors)" for k, v in d["storage"].items())
    rope = "; ".join(f"{t}: {r['type']}, theta {r['theta']:g}" + (f", factor {r['factor']:g}" if "factor" in r else "")
                     for t, r in d["rope"].items())
    window = (f"{d['sliding_window']} tokens on {d['sliding_layers']} of {d['layers']} layers"
              if d["sliding_window"] else "none")
    rows = [
        ("model", d["path"]),
        ("architecture", d["architecture"]),
        ("parameters", _human(d["parameters"], "")),
        ("storage", storage + (f"; quantization: {d['quantization']}" if d["quantization"] else "")),
        ("size", f"{_human(d['bytes'], 'B')} in {d['files']} file(s)"),
        ("context length", str(d["context_length"])),
        ("layers", f"{d['layers']} (hidden {d['hidden_size']}, intermediate {d['intermediate_size']})"),
        ("attention", f"{d['heads']} heads, {d['kv_heads']} KV heads, head dim {d['head_dim']}"),
        ("sliding window", window),
        ("rope", rope),
        ("vocabulary", f"{d['vocab_size']}, head {'tied to the embeddings' if d['tied_head'] else 'separate'}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
