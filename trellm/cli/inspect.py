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
    exl3 = _exl3_bits(reader, infos) if isinstance(quant, dict) and quant.get("quant_method") == "exl3" else None
    return {
        "path": str(Path(path).resolve()),
        "architecture": cfg.architecture,
        "parameters": sum(_logical_params(i) for i in infos),
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
        **({"exl3": exl3} if exl3 else {}),
    }


def _exl3_bits(reader, infos) -> dict[str, Any]:
    """Bits per weight of every EXL3 linear (from the trellis shapes), averaged per layer, and the head."""
    import re

    per_layer: dict[int, list[tuple[float, int]]] = {}
    head = None
    codebooks = Counter()
    for info in infos:
        if not info.name.endswith(".trellis"):
            continue
        prefix = info.name[: -len(".trellis")]
        bits = info.shape[-1] / 16
        weights = info.shape[0] * info.shape[1] * 256
        codebooks["mul1" if f"{prefix}.mul1" in reader else "mcg" if f"{prefix}.mcg" in reader else "3inst"] += 1
        m = re.search(r"layers\.(\d+)\.", prefix)
        if m:
            per_layer.setdefault(int(m.group(1)), []).append((bits, weights))
        elif prefix.endswith("lm_head"):
            head = bits
    layer_bits = {i: sum(b * w for b, w in v) / sum(w for _, w in v) for i, v in sorted(per_layer.items())}
    total = sum(w for v in per_layer.values() for _, w in v)
    avg = sum(b * w for v in per_layer.values() for b, w in v) / total if total else 0.0
    return {"bits": round(avg, 3), "head_bits": head, "codebooks": dict(codebooks),
            "bits_per_layer": {str(i): round(b, 3) for i, b in layer_bits.items()}}


def _runs(bits_per_layer: dict[str, float]) -> str:
    """'0-29: 4, 30-31: 5' for consecutive layers with the same bits."""
    out, start, prev = [], None, None
    items = [(int(k), v) for k, v in bits_per_layer.items()]
    for i, (layer, b) in enumerate(items):
        if start is None:
            start, prev = layer, b
        if i + 1 == len(items) or items[i + 1][1] != b:
            out.append(f"{start}-{layer}: {b:g}" if layer != start else f"{layer}: {b:g}")
            start = None
    return ", ".join(out)


def _logical_params(info) -> int:
    """Weights a tensor stands for: an EXL3 trellis holds 256 weights per 16x16 tile (padded shape);
    its scales and codebook markers are bookkeeping, not parameters."""
    leaf = info.name.rpartition(".")[2]
    if leaf == "trellis":
        return info.shape[0] * info.shape[1] * 256
    if leaf in ("suh", "svh", "su", "sv", "mul1", "mcg"):
        return 0
    return info.numel


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
    if "exl3" in d:
        e = d["exl3"]
        rows.insert(4, ("exl3", f"{e['bits']:g} bits per weight in the layers, head {e['head_bits']:g}-bit; codebooks "
                                + ", ".join(f"{k} ({v})" for k, v in e["codebooks"].items())))
        rows.insert(5, ("bits per layer", _runs(e["bits_per_layer"])))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
