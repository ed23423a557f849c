"""Cost of the measured bit allocation's sensitivity probe (`trellm convert --allocation measured`) at full depth.

    python benchmarks/bench_probe.py --out /tmp/probe [--preset llama3-8b] [--layers 8]

The probe runs every linear's noise through the rest of the model: 7·L(L+1)/2 + L layer passes and
7·L + 1 head passes for L layers, i.e. quadratic in depth, so a model cut to a few layers cannot be
extrapolated linearly. This script writes a random bf16 model of the preset cut to --layers (unless it
exists), times the probe on its first half and on all of it, solves for the time of one layer pass and
one head pass, and predicts the probe at the preset's full depth.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench_e2e import PRESETS
from bench_server import write_word_tokenizer
from trellm.models.loader import load_model
from trellm.quant.convert.job import ConvertArgs, _matmul_tf32, _sensitivities
from trellm.quant.convert.sensitivity import COLS, ROWS
from trellm.quant.exl3_writer import write_random_exl3_model


def passes(layers: int) -> tuple[int, int]:
    """(layer passes, head passes) of the probe on a model of `layers` layers with 7 linears each."""
    return 7 * layers * (layers + 1) // 2 + layers, 7 * layers + 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    cfg = dict(PRESETS[args.preset])
    full = cfg["num_hidden_layers"]
    cfg["num_hidden_layers"] = args.layers
    src = Path(args.out) / "src"
    if not (src / "config.json").is_file():
        write_random_exl3_model(cfg, src, bits=None, shard_bytes=4 * 2**30)
        write_word_tokenizer(src, cfg["vocab_size"], cfg["eos_token_id"])
    model = load_model(src, device=args.device, dtype="bfloat16", fuse=False)
    ids = torch.randint(0, cfg["vocab_size"], (ROWS + 1, COLS), generator=torch.Generator().manual_seed(0))
    conv = ConvertArgs(str(src), "unused", "unused", 4.0)
    all_layers = model.layers
    times = {}
    for n in (args.layers // 2, args.layers, args.layers // 2):  # the first run also warms up
        model.layers = all_layers[:n]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        with _matmul_tf32(conv.tf32):  # as `trellm convert` runs it (the default: TF32 matmuls)
            sens = _sensitivities(model, ids, conv, batch=8)
        times[n] = time.perf_counter() - t
        assert len(sens) == 7 * n
    (la, ha), (lb, hb) = passes(args.layers // 2), passes(args.layers)
    ta, tb = times[args.layers // 2], times[args.layers]
    det = la * hb - lb * ha
    t_layer, t_head = (ta * hb - tb * ha) / det, (la * tb - lb * ta) / det
    lf, hf = passes(full)
    print(f"{args.preset}: probe of {ROWS} x {COLS} tokens, {args.layers // 2} layers {ta:.2f} s, "
          f"{args.layers} layers {tb:.2f} s")
    print(f"one layer pass {1e3 * t_layer:.2f} ms, one head pass {1e3 * t_head:.2f} ms")
    print(f"predicted at {full} layers: {lf} layer + {hf} head passes = {lf * t_layer + hf * t_head:.1f} s")


if __name__ == "__main__":
    main()
