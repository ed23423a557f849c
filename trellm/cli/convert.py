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
                    "The job is checkpointed in WORKDIR (see --checkpoint-interval); -r continues after a crash or "
                    "Ctrl-C and produces the same output as an uninterrupted run.")
    p.add_argument("-i", "--input", required=True, help="unquantized model folder (config.json + safetensors)")
    p.add_argument("-o", "--output", required=True, help="output folder for the EXL3 model (written at the end)")
    p.add_argument("-w", "--workdir", required=True, help="work folder for the job's checkpoints")
    p.add_argument("-b", "--bpw", type=float, required=True,
                   help="target bits per weight of the decoder layers, 1-8, fractional allowed (e.g. 2.25, 3.5)")
    p.add_argument("-hb", "--head-bits", type=int, default=6, help="bits per weight of the lm_head (default 6)")
    p.add_argument("--codebook", choices=("mul1", "mcg", "3inst"), default="mul1",
                   help="trellis codebook (default mul1, what current EXL3 readers expect)")
    p.add_argument("--channel-scales", choices=("both", "columns", "none", "best"), default="both",
                   help="per-channel scales folded into suh/svh before the trellis search: both = every input "
                        "and output channel to equal RMS (default); columns = output channels by the square "
                        "root of their RMS only (lower Hessian-weighted error on some of SmolLM2's linears, "
                        "but a higher KL-divergence); none; best = each linear both ways, keeping "
                        "the lower error (twice the quantize time)")
    p.add_argument("--allocation", choices=("measured", "heuristic"), default="measured",
                   help="how bits are shared between linears: measured = first measure what trellis-like noise "
                        "on each linear costs in KL-divergence (a few seconds), then give each a width from "
                        "floor(bpw)-1 to ceil(bpw)+2 where it removes the most predicted KL per bit, also at "
                        "integer bpw (default; 3-18 %% lower KL than heuristic on SmolLM2 and Qwen2.5-0.5B); "
                        "heuristic = floor(bpw) everywhere, the rest to attention and the first / last layers")
    p.add_argument("--calibration", help="text file to calibrate on (default: text the model generates itself, "
                                         "plus random-token rows)")
    p.add_argument("--rows", type=int, default=250, help="calibration rows (default 250)")
    p.add_argument("--cols", type=int, default=2048, help="tokens per calibration row (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    p.add_argument("--no-tf32", dest="tf32", action="store_false",
                   help="run the calibration forward passes and Hessians in full float32 on a GPU (default: "
                        "TF32 tensor cores, several times faster; the quantization itself is float32/float64 "
                        "either way)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--batch", type=int, default=8, help="calibration rows per forward pass (default 8)")
    p.add_argument("--checkpoint-interval", type=float, default=60.0, metavar="SECONDS",
                   help="checkpoint the finished layers and calibration states at most this often (default 60; "
                        "0 = after every layer; always after the last layer and on Ctrl-C). A hard crash loses "
                        "at most this much work")
    p.add_argument("-r", "--resume", action="store_true", help="continue the job in WORKDIR")
    p.add_argument("--force-resume", action="store_true",
                   help="with -r: continue even though the arguments differ from the job's")
    p.set_defaults(run=run)


class _Display:
    """The job's progress on stderr: one line per layer (bits, output error and SQNR, proxy error per
    linear, time) and, when both stdout and stderr are terminals, a live rich bar with layer n/N,
    elapsed and remaining time. In logs only the lines appear, as plain text."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True, highlight=False)
        self.bar = Progress(TextColumn("converting"), BarColumn(), MofNCompleteColumn(), TextColumn("layers"),
                            TimeElapsedColumn(), TextColumn("{task.fields[left]}"), console=self.console,
                            disable=not (self.console.is_terminal and sys.stdout.isatty()))
        self.task = None
        self.t0 = time.perf_counter()
        self.layer_seconds: list[float] = []

    def __enter__(self) -> _Display:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, info: dict) -> None:
        n = info["num_layers"]
        elapsed = info.get("elapsed", time.perf_counter() - self.t0)
        if self.task is None:
            self.task = self.bar.add_task("convert", total=n + 1, left="")  # + 1: the head
        if info["layer"] == "setup":
            stages = ", ".join(f"{k} {v:.1f} s" for k, v in info["stages"].items())
            resumed = f"; resuming after layer {info['resumed_after']}" if info["resumed_after"] else ""
            widths = info.get("widths")  # {bits: how many linears}
            widths = ("; linears at " + ", ".join(f"{k} bits: {c}" for k, c in widths.items())) if widths else ""
            self.console.print(f"setup: {stages}{resumed}{widths}", markup=False, soft_wrap=True)
            self.bar.update(self.task, completed=info["resumed_after"])
            return
        if info["layer"] == "head":
            self.console.print(f"head: proxy error {info['proxy']['lm_head']:.4g}  [{elapsed:.0f} s]", markup=False,
                               soft_wrap=True)
            self.bar.update(self.task, completed=n + 1, left="")
            return
        done = info["layer"] + 1
        self.layer_seconds.append(info["seconds"])
        remaining = sum(self.layer_seconds) / len(self.layer_seconds) * (n - done)  # this run's layers only
        widths = info["bits"]
        proxies = ", ".join(f"{k} {v:.3g} ({widths[k]} b)" if k in widths else f"{k} {v:.3g}"
                            for k, v in info["proxy"].items())
        bits = sorted(set(info["bits"].values()))
        stages = "".join(f", {k} {v:.1f}" for k, v in info.get("stages", {}).items())
        self.console.print(
            f"layer {done}/{n}: {'/'.join(map(str, bits))} bits, output error {info['rel_error']:.4f} "
            f"(SQNR {-20 * math.log10(max(info['rel_error'], 1e-12)):.1f} dB); proxy {proxies}  "
            f"[{info['seconds']:.1f} s{stages}; elapsed {elapsed:.0f} s, ~{remaining:.0f} s left]", markup=False,
            soft_wrap=True)
        self.bar.update(self.task, completed=done, left=f"~{remaining:.0f} s left")


def run(args: argparse.Namespace) -> int:
    from trellm.quant.convert.job import ConvertArgs, convert

    job = ConvertArgs(input=args.input, output=args.output, workdir=args.workdir, bpw=args.bpw,
                      head_bits=args.head_bits, codebook=args.codebook, calibration=args.calibration,
                      rows=args.rows, cols=args.cols, seed=args.seed, tf32=args.tf32,
                      channel_scales=args.channel_scales, allocation=args.allocation)
    with _Display() as display:
        out = convert(job, resume=args.resume, force=args.force_resume, device=args.device, batch=args.batch,
                      progress=display, checkpoint_interval=args.checkpoint_interval)
    print(f"wrote {out}", file=sys.stderr)
    return 0
