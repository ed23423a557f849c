"""Where a decode step's time goes: graph replay time per batch bucket (GPU time of one step, no host
work), the generator's whole step (Generator.iterate in steady decoding: scheduling, graph replay,
sampling, the host sync, results) — their difference is the host's share — and the kernel-by-kernel
breakdown of one eager step (torch.profiler, GPU time by kernel name).

    python benchmarks/profile_decode.py --out /tmp/l3-exl3 [--batches 1,4,16] [--ctx 256] [--host 15 [--trace F]]
        [--split] [--prefill 4096]

--split times the phases of 20 generator steps on the host clock (no profiler): scheduling, packing the
inputs, the graph launch call, sampling's launches, the wait for the tokens, the rest; and the graph launch
call alone on an idle GPU. --prefill N also times one N-token prompt's pass through the generator and lists
its kernels (GPU time by name).

The model folder is written by bench_e2e.py (same presets) when missing.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench_e2e import PRESETS, measure_prefill
from trellm.cache.paged import Segment
from trellm.engine.generator import Generator, Job
from trellm.models.loader import load_model
from trellm.quant.exl3_writer import write_random_exl3_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    ap.add_argument("--format", choices=("exl3", "bf16"), default="exl3")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--host", type=int, default=0, help="also list the N torch ops with the most host time "
                    "in three generator steps (where the host share goes)")
    ap.add_argument("--trace", help="with --host: write those steps as a Chrome trace to TRACE.bB.json")
    ap.add_argument("--split", action="store_true", help="also time the phases of a generator step (host clock)")
    ap.add_argument("--prefill", type=int, default=0, help="also profile one prompt of this many tokens")
    args = ap.parse_args()
    out = Path(args.out)
    if not (out / "config.json").is_file():
        write_random_exl3_model(PRESETS[args.preset], out, bits=4 if args.format == "exl3" else None, head_bits=6,
                                shard_bytes=4 * 2**30)
    model = load_model(out, device="cuda", dtype="bfloat16")
    batches = [int(b) for b in args.batches.split(",")]
    tokens = max(max(batches) * 2 * (args.ctx + 256), 2 * args.prefill)
    gen = Generator(model, max_seqs=max(batches), cache_tokens=tokens, max_batch_tokens=max(2048, args.prefill))
    ps = gen.cache.page_size
    need = -(-(args.ctx + 1) // ps)
    for b in batches:
        pages = [list(range(i * need, (i + 1) * need)) for i in range(b)]
        ids, pos = [17] * b, [args.ctx] * b
        for _ in range(3):
            gen.graphs.run(ids, pos, pages)
        torch.cuda.synchronize()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        graph = gen.graphs._graphs[gen.graphs.bucket(b)].graph
        ev[0].record()
        for _ in range(20):
            graph.replay()
        ev[1].record()
        ev[1].synchronize()
        replay_ms = ev[0].elapsed_time(ev[1]) / 20
        # The generator's own steps: b jobs past their prompts, then 20 timed decode steps.
        for _ in range(b):
            gen.enqueue(Job([17] * args.ctx, max_new_tokens=64))
        started: set[int] = set()
        while len(started) < b:
            started |= {r.job_id for r in gen.iterate()}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            gen.iterate()
        torch.cuda.synchronize()
        iterate_ms = (time.perf_counter() - t0) * 1000 / 20
        if args.split:
            split_phases(gen, graph, 20)
        if args.host:  # where the host share goes: host-side time by torch op over three steps
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=acts) as host_prof:
                for _ in range(3):
                    gen.iterate()
                torch.cuda.synchronize()
            print(f"\n-- batch {b}: three Generator.iterate steps, host time by op (self CPU time):")
            print(host_prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.host))
            if args.trace:
                host_prof.export_chrome_trace(f"{args.trace}.b{b}.json")
        while gen.busy:
            gen.iterate()
        segs = [Segment(i, args.ctx, 1, pages[i]) for i in range(b)]
        step = lambda: model(torch.tensor([ids], device="cuda"), torch.tensor([pos], device="cuda"),  # noqa: E731
                             gen.cache.step(segs), max_seq_len=args.ctx + 1)
        step()
        torch.cuda.synchronize()
        by_name = kernels_by_name(step)
        total = sum(v[0] for v in by_name.values())
        count = sum(v[1] for v in by_name.values())
        print(f"\n== batch {b}: graph replay {replay_ms:.3f} ms/step, Generator.iterate {iterate_ms:.3f} ms/step "
              f"({b / iterate_ms * 1000:.0f} tok/s; host share {iterate_ms - replay_ms:.3f} ms); eager kernels "
              f"{count}, sum of kernel time {total / 1000:.3f} ms")
        print_kernels(by_name, args.top)
    if args.prefill:
        # Fresh random prompts each time (bench_e2e.measure_prefill): a repeated prompt would be served from
        # the prefix cache, and neither its time nor its kernels would be a prefill's.
        vocab = model.config.vocab_size
        measure_prefill(gen, args.prefill, vocab, rounds=2, seed=999)  # compile this prompt length's kernels
        speed = measure_prefill(gen, args.prefill, vocab, rounds=3, seed=1000)
        by_name = kernels_by_name(lambda: measure_prefill(gen, args.prefill, vocab, rounds=1, seed=1001))
        total = sum(v[0] for v in by_name.values())
        print(f"\n== prefill {args.prefill} tokens: {args.prefill / speed * 1000:.1f} ms ({speed:.0f} tok/s, median "
              f"of 3 distinct prompts); sum of kernel time {total / 1000:.1f} ms")
        print_kernels(by_name, args.top)


def kernels_by_name(work) -> dict[str, list[float]]:
    """GPU time (µs) and launch count per kernel name (first 60 characters) of one call of work()."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        work()
        torch.cuda.synchronize()
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_name[e.name[:60]][0] += e.device_time
            by_name[e.name[:60]][1] += 1
    return by_name


def print_kernels(by_name: dict[str, list[float]], top: int) -> None:
    """The `top` kernels by GPU time: total, count, mean."""
    for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{us:9.1f} µs {n:5d}x {us / n:7.2f} µs  {name}")


@contextlib.contextmanager
def _timing(phases: dict[str, list[float]], owner, name: str, label: str):
    """Time every call of owner.name into phases[label] while the block runs."""
    fn = getattr(owner, name)

    def timed(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            phases[label].append(time.perf_counter() - t)

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, fn)


def split_phases(gen: Generator, graph: torch.cuda.CUDAGraph, steps: int) -> None:
    """Host-clock time of each phase of `steps` Generator.iterate calls (ms per step), and of the graph
    launch call alone with nothing queued on the GPU."""
    import trellm.engine.generator as generator_module

    phases: dict[str, list[float]] = defaultdict(list)
    torch.cuda.synchronize()
    with contextlib.ExitStack() as stack:
        for owner, name, label in [(gen.scheduler, "schedule", "scheduler.schedule"),
                                   (gen.graphs, "_pack", "pack inputs"),
                                   (torch.cuda.CUDAGraph, "replay", "graph launch call"),
                                   (generator_module, "sample_batch", "sample_batch launches"),
                                   (torch.Tensor, "tolist", "tolist (without overlap: waits for the GPU)"),
                                   (torch.cuda.Event, "synchronize", "event wait (overlap: waits for the GPU)"),
                                   (gen.scheduler, "update", "scheduler.update"),
                                   (gen, "_forward", "_forward (pack + copy + launch)"),
                                   (gen, "_sample", "_sample (sampling, copies to the host)"),
                                   (gen, "_launch_ahead", "_launch_ahead (lookahead + forward + sample)"),
                                   (gen, "_finish_pass", "_finish_pass (results)"),
                                   (gen, "iterate", "iterate")]:
            stack.enter_context(_timing(phases, owner, name, label))
        for _ in range(steps):
            gen.iterate()
        torch.cuda.synchronize()
    for label, times in phases.items():
        print(f"   {sum(times) * 1000 / steps:8.3f} ms/step  {len(times) / steps:4.1f} calls  {label}")
    idle = []
    for _ in range(10):
        torch.cuda.synchronize()
        t = time.perf_counter()
        graph.replay()
        idle.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    idle.sort()
    print(f"   graph launch call on an idle GPU: median {idle[5] * 1000:.3f} ms, min {idle[0] * 1000:.3f} ms")


if __name__ == "__main__":
    main()
