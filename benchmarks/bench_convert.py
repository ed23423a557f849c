"""Speed of `trellm convert` (issue 4) on a random-weight model of the Llama-3-8B shape, by stage.

    python benchmarks/bench_convert.py --out /tmp/c8b [--layers 32] [--bpw 4] [--rows 250 --cols 2048]
    python benchmarks/bench_convert.py --out /tmp/ctiny --preset tiny --rows 8 --cols 64 --device cpu  # smoke

Writes the unquantized model (bf16, random weights, a word-level tokenizer) unless it exists, converts
it with the default (model-generated) calibration, and prints the setup time (load, calibration text,
embedding), each layer's stages (Hessians = the reference forward that captures them, quantize, forward
through the quantized layer, waits for the checkpoint writer), the head and the output writing. With
--layers below the preset's count the model is cut to that many layers and the total for the full
depth is extrapolated (setup + head + writing + layers × mean layer time): a 32-layer 8B conversion
does not fit in one GPU session call, while two layers have exactly the full model's per-layer work.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from bench_e2e import PRESETS
from bench_server import write_word_tokenizer
from trellm.quant.convert.job import ConvertArgs, convert
from trellm.quant.exl3_writer import write_random_exl3_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="work folder: src/ (written if missing), job/, exl3/")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    ap.add_argument("--layers", type=int, help="cut the model to this many layers (default: all)")
    ap.add_argument("--bpw", type=float, default=4.0)
    ap.add_argument("--head-bits", type=int, default=6)
    ap.add_argument("--rows", type=int, default=250)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    cfg = dict(PRESETS[args.preset])
    full_layers = cfg["num_hidden_layers"]
    layers = args.layers or full_layers
    cfg["num_hidden_layers"] = layers
    root = Path(args.out)
    src = root / "src"
    if not (src / "config.json").is_file():
        write_random_exl3_model(cfg, src, bits=None, shard_bytes=4 * 2**30)
        write_word_tokenizer(src, cfg["vocab_size"], cfg["eos_token_id"])
    for d in ("job", "exl3"):
        shutil.rmtree(root / d, ignore_errors=True)
    events: list[dict] = []
    t0 = time.perf_counter()
    convert(ConvertArgs(str(src), str(root / "exl3"), str(root / "job"), args.bpw, head_bits=args.head_bits,
                        rows=args.rows, cols=args.cols), device=args.device,
            progress=lambda info: events.append({**info, "at": time.perf_counter() - t0}))
    total = time.perf_counter() - t0
    layer_ev = [e for e in events if e["layer"] != "head"]
    head_at = next(e["at"] for e in events if e["layer"] == "head")
    setup = layer_ev[0]["at"] - layer_ev[0]["seconds"]
    per_layer = statistics.fmean(b["at"] - a["at"] for a, b in zip(layer_ev, layer_ev[1:])) if len(layer_ev) > 1 \
        else layer_ev[0]["seconds"]
    stages = {k: round(statistics.fmean(e["stages"][k] for e in layer_ev), 2) for k in layer_ev[0]["stages"]}
    head = head_at - layer_ev[-1]["at"]
    write = total - head_at
    full = setup + head + write + full_layers * per_layer
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"card: {dev}; {args.preset} shape, {layers} of {full_layers} layers, {args.bpw} bpw, "
          f"calibration {args.rows} × {args.cols} (generated)")
    print(f"setup (load, calibration, embed) {setup:.1f} s; per layer {per_layer:.1f} s {stages}; "
          f"head {head:.1f} s; writing {write:.1f} s; total {total:.1f} s")
    print(f"{full_layers}-layer total (measured setup/head/writing + {full_layers} × per layer): {full / 60:.1f} min")
    print(json.dumps({"device": dev, "preset": args.preset, "layers": layers, "bpw": args.bpw, "setup_s": round(setup, 1),
                      "per_layer_s": round(per_layer, 2), "stages_s": stages, "head_s": round(head, 1),
                      "write_s": round(write, 1), "total_s": round(total, 1), "full_model_min": round(full / 60, 2)}))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"total_s": total, "events": events}, default=str))


if __name__ == "__main__":
    main()
