"""Speed of the Triton Viterbi search (issue 4): tiles per second by K, the time a 4096×14336 linear
(229,376 tiles) would take, and the check against the torch reference on a sample.

    python benchmarks/bench_viterbi.py [--tiles 4096] [--bits 2,3,4,5,6,8] [--variants 1024:8,512:4]
                                       [--launch-tiles 256]

A variant is groups per chunk : warps; each K is then checked and timed with its fastest variant
(without --variants, with kernels/viterbi.py CONFIGS).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from trellm.kernels import viterbi as kv
from trellm.kernels.viterbi import viterbi
from trellm.quant.convert.viterbi import decode_states, viterbi_ref


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=4096)
    ap.add_argument("--bits", default="2,3,4,5,6,8")
    ap.add_argument("--codebook", default="mul1")
    ap.add_argument("--variants", default="")
    ap.add_argument("--launch-tiles", type=int, default=0,
                    help="search the tiles in launches of this many, one after the other (as LDLQ does strip by "
                         "strip: e.g. 256 for a 14336->4096 down_proj); prints ms per launch")
    args = ap.parse_args()

    def search(x: torch.Tensor, bits: int) -> torch.Tensor:
        if not args.launch_tiles:
            return viterbi(x, bits, args.codebook)
        return torch.cat([viterbi(c, bits, args.codebook) for c in x.split(args.launch_tiles)])

    def timed(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, float]:
        """(states, seconds) of one search of x, after an untimed one: Triton specialises integer
        arguments on divisibility by 16 (the tile count among them), so only the same shape warms up."""
        search(x, bits)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        states = search(x, bits)
        torch.cuda.synchronize()
        return states, time.perf_counter() - t0

    variants = [v.split(":") for v in args.variants.split(",")] if args.variants else []
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        speeds = {}
        for gc, warps in variants:
            kv.CONFIGS[bits] = (int(gc), int(warps))
            _, sec = timed(torch.randn(args.tiles, 256, device="cuda"), bits)
            speeds[f"{gc}:{warps}"] = round(args.tiles / sec)
        if variants:
            print(f"K={bits} tiles/s by variant: {speeds}", flush=True)
            best = max(speeds, key=speeds.get)
            kv.CONFIGS[bits] = tuple(int(v) for v in best.split(":"))
        x = torch.randn(args.tiles, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(bits))
        states, sec = timed(x, bits)
        mse = float(((decode_states(states, args.codebook) - x) ** 2).mean())
        ref = viterbi_ref(x[:64], bits, args.codebook)
        same = float((ref == states[:64]).all(dim=1).float().mean())
        rows.append({"bits": bits, "tiles_per_s": round(args.tiles / sec), "layer_4096x14336_s": round(229376 / (args.tiles / sec), 1),
                     "mse": round(mse, 5), "same_as_ref": same, "config": kv.CONFIGS[bits],
                     "ms_per_launch": round(1000 * sec / -(-args.tiles // args.launch_tiles), 2) if args.launch_tiles
                     else None})
    print(f"card: {torch.cuda.get_device_name()}")
    print(f"{'K':>3} {'tiles/s':>10} {'4096x14336 s':>13} {'MSE':>9} {'= ref':>6} {'ms/launch':>9}")
    for r in rows:
        print(f"{r['bits']:>3} {r['tiles_per_s']:>10} {r['layer_4096x14336_s']:>13} {r['mse']:>9} {r['same_as_ref']:>6} "
              f"{r['ms_per_launch'] or '':>9}")
    print(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}))


if __name__ == "__main__":
    main()
