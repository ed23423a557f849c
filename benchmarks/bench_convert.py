"""Speed of `trellm convert` (issue 4) on a random-weight model of the Llama-3-8B shape, by stage.

    python benchmarks/bench_convert.py --out /tmp/c8b [--layers 32] [--bpw 4] [--rows 250 --cols 2048]
    python benchmarks/bench_convert.py --out /tmp/ctiny --preset tiny --rows 8 --cols 64 --device cpu  # smoke

Writes the unquantized model (bf16, random weights, a word-level tokenizer) unless it exists, converts
it with the default (model-generated) calibration, and prints the setup time (load, calibration text,
embedding), each layer's stages (Hessians = the reference forward that captures them, quantize, forward
through the quantized layer, waits for the checkpoint writer), the head and the output writing. With
--layers below the preset's count the model is cut to that many layers and the total for the full
depth is extrapolated (setup + head + writing + layers × mean layer time): two layers have exactly
the full model's per-layer work. A full-depth run that may outlast one device call runs in parts:

    python benchmarks/bench_convert.py --out /tmp/c8b --prepare          # writes src/ only
    timeout -s INT 560 python benchmarks/bench_convert.py --out /tmp/c8b  # Ctrl-C keeps finished layers
    python benchmarks/bench_convert.py --out /tmp/c8b --resume           # as often as needed

Each part appends its events to OUT/parts.json; the report gives the parts' total and the uninterrupted
equivalent: the first setup + every layer's time + head + writing, without what a stop threw away
(a resumed part's own setup, the interrupted layer).
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
    ap.add_argument("--allocation", choices=("measured", "heuristic"), default="measured",
                    help="the converter's bit allocation (default measured, as trellm convert)")
    ap.add_argument("--rows", type=int, default=250)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json-out")
    ap.add_argument("--prepare", action="store_true", help="only write the unquantized model (src/) and stop")
    ap.add_argument("--resume", action="store_true",
                    help="continue the conversion in OUT/job (a run stopped by Ctrl-C / SIGINT); the report "
                         "adds up every part's time from OUT/parts.json")
    ap.add_argument("--checkpoint-interval", type=float, default=60.0)
    args = ap.parse_args()
    cfg = dict(PRESETS[args.preset])
    full_layers = cfg["num_hidden_layers"]
    layers = args.layers or full_layers
    cfg["num_hidden_layers"] = layers
    root = Path(args.out)
    src = root / "src"
    if not (src / "config.json").is_file():
        t = time.perf_counter()
        write_random_exl3_model(cfg, src, bits=None, shard_bytes=4 * 2**30)
        write_word_tokenizer(src, cfg["vocab_size"], cfg["eos_token_id"])
        print(f"wrote the unquantized model to {src} in {time.perf_counter() - t:.0f} s")
    if args.prepare:
        return
    parts_file = root / "parts.json"
    if not args.resume:
        for d in ("job", "exl3"):
            shutil.rmtree(root / d, ignore_errors=True)
        parts_file.unlink(missing_ok=True)
    parts = json.loads(parts_file.read_text()) if parts_file.is_file() else []
    events: list[dict] = []
    t0 = time.perf_counter()
    stopped = False
    try:
        convert(ConvertArgs(str(src), str(root / "exl3"), str(root / "job"), args.bpw, head_bits=args.head_bits,
                            rows=args.rows, cols=args.cols, allocation=args.allocation),
                device=args.device, resume=args.resume, checkpoint_interval=args.checkpoint_interval,
                progress=lambda info: note(events, info, time.perf_counter() - t0))
    except KeyboardInterrupt:
        stopped = True
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else 0.0
    parts.append({"total_s": time.perf_counter() - t0, "events": events, "stopped": stopped, "peak_gib": peak})
    parts_file.write_text(json.dumps(parts, default=str))
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    done = [e["layer"] for e in events if isinstance(e["layer"], int)]
    print(f"part {len(parts)}: {parts[-1]['total_s']:.1f} s, layers {done[:1]}..{done[-1:]}, "
          f"peak GPU memory {peak:.1f} GiB"
          + (" — stopped (resume with --resume)" if stopped else ""))
    if stopped:
        return
    report(parts, dev, args, layers, full_layers)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(parts, default=str))


def note(events: list[dict], info: dict, at: float) -> None:
    events.append({**info, "at": at})
    extra = f" {info['seconds']} s {info['stages']}" if isinstance(info["layer"], int) else ""
    print(f"[{at:7.1f} s] {info['layer']}{extra}", flush=True)


def report(parts: list[dict], dev: str, args: argparse.Namespace, layers: int, full_layers: int) -> None:
    """Setup, per-layer stages, head and writing over all parts."""
    layer_ev, durations = [], []
    for part in parts:  # a layer's time runs from the previous layer (or the part's setup) to its own event
        marks = [e for e in part["events"] if e["layer"] == "setup" or isinstance(e["layer"], int)]
        layer_ev += [e for e in marks if e["layer"] != "setup"]
        durations += [b["at"] - a["at"] for a, b in zip(marks, marks[1:])]
    setup = next(e for e in parts[0]["events"] if e["layer"] == "setup")  # sent when the setup ends
    setup_s, setup_stages = setup["at"], setup["stages"]
    last = parts[-1]["events"]
    head_at = next(e["at"] for e in last if e["layer"] == "head")
    head = head_at - max(e["at"] for e in last if e["layer"] == "setup" or isinstance(e["layer"], int))
    write = parts[-1]["total_s"] - head_at
    total = sum(p["total_s"] for p in parts)
    # Work a stop threw away (restarts, the interrupted layer) is in the total but not in the equivalent.
    equivalent = setup_s + sum(durations) + head + write
    per_layer = statistics.fmean(durations)
    stages = {k: round(statistics.fmean(e["stages"][k] for e in layer_ev), 2) for k in layer_ev[0]["stages"]}
    print(f"card: {dev}; {args.preset} shape, {layers} of {full_layers} layers, {args.bpw} bpw, "
          f"calibration {args.rows} × {args.cols} (generated); {len(parts)} part(s)")
    print(f"setup {setup_s:.1f} s {setup_stages}; per layer {per_layer:.1f} s {stages}; "
          f"head {head:.1f} s; writing {write:.1f} s")
    print(f"total {total:.1f} s ({total / 60:.2f} min) over {len(parts)} part(s); uninterrupted equivalent "
          f"(setup + layers + head + writing) {equivalent:.1f} s ({equivalent / 60:.2f} min)")
    if layers < full_layers:
        full = setup_s + head + write + full_layers * per_layer
        print(f"{full_layers}-layer total (measured setup/head/writing + {full_layers} × per layer): {full / 60:.1f} min")
        print(f"note: the calibration rows were generated by the {layers}-layer cut; at full depth that stage "
              "costs more (each generated token is a forward pass of every layer), and so does the measured "
              "allocation's probe, quadratically in depth (benchmarks/bench_probe.py predicts it)")
    print(json.dumps({"device": dev, "preset": args.preset, "layers": layers, "bpw": args.bpw, "parts": len(parts),
                      "setup_s": round(setup_s, 1), "setup_stages_s": setup_stages,
                      "per_layer_s": round(per_layer, 2), "stages_s": stages, "head_s": round(head, 1),
                      "write_s": round(write, 1), "total_s": round(total, 1), "equivalent_s": round(equivalent, 1)}))


if __name__ == "__main__":
    main()
