"""Does a change to what LDLQ is asked to quantize lower the KL-divergence? A CPU-sized stand-in for
`trellm convert` + `trellm eval kld`, and the record of the "drift" experiment (benchmarks/RESULTS.md).

The converter's own pieces (job._layer_forward, its Hessians, quantize.quantize_linears with the rotations,
channel scales and block LDLQ) on a small real model, with one substitution: the trellis search becomes
rounding to a uniform grid whose step gives the mean squared error per unit-variance weight of the K-bit
trellis (TRELLIS_MSE). On a CPU the real Viterbi would take hours for SmolLM2-135M; this takes minutes,
and options can be compared under equal conditions (the absolute KL is the grid's, not the trellis's:
6 bits, 32k calibration tokens: 0.0032 with the head unquantized, against 0.0033 measured for real with
an 8-bit head). Linears are held as dense float32 weights (what a reader reconstructs).

Variants: plain = the converter (every linear's Hessian from one pass of the original layer over the
quantized model's states); seq = q/k/v, o, gate/up, down quantized in turn, each group's Hessian taken
with the groups before it already quantized; drift / seqdrift = also run the calibration rows through the
original model and quantize each linear toward the original model's output (CrossHessian.target);
drift@λ sets the damping of that map. Seeds change the random signs; differences smaller than the spread
over seeds mean nothing.

    python benchmarks/drift_proxy.py --model /tmp/g/smol --calibration calib.txt --text wiki_en.txt --bits 6 \
        --rows 64 --cols 512 --variants plain,seqdrift@1 --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import trellm.quant.convert.quantize as qz
from trellm.engine.evaluate import evaluate, windows_of
from trellm.io.tokenizer import Tokenizer
from trellm.models.loader import load_model
from trellm.quant.convert import job
from trellm.quant.convert.calibration import rows_from_text

DRIFT_DAMPING = 0.01  # λ of CrossHessian.target, relative to the mean diagonal of H (drift@λ sets it)


class CrossHessian(job._Hessian):
    """The converter's Hessian H = Σ x·xᵀ of a linear's input on the quantized model's stream and, for drift,
    C = Σ x₀·xᵀ with x₀ the same token's input in the original model (add_original(x₀) right before add(x))."""

    def __init__(self, k: int, device: torch.device, drift: bool):
        super().__init__(k, device)
        self.cross = torch.zeros_like(self.sum) if drift else None
        self.held: torch.Tensor | None = None

    def add_original(self, x0: torch.Tensor) -> None:
        self.held = x0.reshape(-1, x0.shape[-1]).float()

    def add(self, x: torch.Tensor) -> None:
        super().add(x)
        if self.cross is not None:
            x = x.reshape(-1, x.shape[-1]).float()
            assert self.held is not None and self.held.shape == x.shape, "add_original must precede add"
            self.cross += (x.T @ self.held).double()
            self.held = None

    def target(self, weight: torch.Tensor) -> torch.Tensor:
        """What to quantize against mean(): Σ‖W·x₀ − Q·x‖² over the tokens is Σ‖(Q − W*)·x‖² + a constant
        with W* = W·C·H⁻¹, so LDLQ quantizing W* minimises the distance to the original model's output.
        Written W* = W + W·(C − H)·(H + λ)⁻¹: exactly W where both streams agree (the first layer), and
        the damping bounds the correction where H is nearly singular (without it, it fits noise: below)."""
        if self.cross is None:
            return weight
        h, c = self.mean(), self.cross / max(self.count, 1)
        damp = DRIFT_DAMPING * torch.diagonal(h).mean().clamp_min(1e-12)
        eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        correction = torch.linalg.solve(h + damp * eye, c - h)  # H⁻¹(C − H)ᵀ: H symmetric, cross = Cᵀ
        w = weight.double()
        return (w + w @ correction.T).to(weight.dtype)


# Mean squared error per weight of unit-normal tiles through the mul1 trellis (RESULTS.md: K = 2..4 from
# bench_viterbi, K = 5, 6 from the CPU check at high widths; 7 and 8 extrapolated by 6 dB per bit).
TRELLIS_MSE = {2: 0.069, 3: 0.0178, 4: 0.0046, 5: 0.00120, 6: 0.000305, 7: 0.0000763, 8: 0.0000191}


def grid_quantizer(bits: int) -> None:
    """Make quantize_linears round to a uniform grid (step √(12·MSE_K)) instead of searching a trellis, and
    keep each linear's reconstructed weight on the result (`.w_hat`, [n, k])."""
    step = (12 * TRELLIS_MSE[bits]) ** 0.5
    qz.trellis_search = lambda tiles, b, codebook, tail_biting=True: torch.round(tiles / step) * step
    qz.decode_states = lambda states, codebook: states
    qz.fmt.pack_states = lambda states, b: torch.zeros(states.shape[0], 16 * b, dtype=torch.int16)
    qz._choose_scales = lambda samples, rms, b, codebook: list(rms)  # the target has unit RMS
    finish = qz._finish

    def keep_w_hat(plan, wr_hat, codebook):
        q = finish(plan, wr_hat, codebook)
        n, k = plan.job.weight.shape
        w_hat = qz._had_both(wr_hat / plan.scale) * q.suh.float()[:, None] * q.svh.float()[None, :]
        q.w_hat = w_hat[:k, :n].T.contiguous()
        return q

    qz._finish = keep_w_hat


SEED = 0  # of the random signs (--seeds): the spread over seeds is what a difference must exceed


def _quantize_group(linears, hessian, bits: int, idx: int, positions: list[int]) -> dict:
    """{name: reconstructed weight} of linears sharing one input (seeds by their position in the layer)."""
    jobs = [qz.LinearJob(hessian.target(lin.impl.dense_weight()), hessian.mean(), bits, job._seed(SEED, idx, j))
            for j, lin in zip(positions, linears)]
    return {lin.name: q.w_hat for lin, q in zip(linears, qz.quantize_linears(jobs))}


def feed(hessian: CrossHessian, x0: torch.Tensor, x: torch.Tensor) -> None:
    hessian.add_original(x0)
    hessian.add(x)


def quantize_model(model, ids: torch.Tensor, bits: int, drift: bool, sequential: bool, batch: int) -> list[float]:
    """The converter's layer loop (job.convert without files, allocation or checkpoints): every linear at
    `bits`; returns each layer's relative output error. sequential: the linears reading one input are
    quantized in the layer's order (q/k/v, o, gate/up, down), each group's Hessians taken with the groups
    before it already quantized, instead of all from one pass of the original layer."""
    states = model.embed(ids, dtype=torch.float32)
    original = states.clone() if drift else None
    errors = []
    for idx in range(model.config.num_layers):
        linears = job._layer_linears(model.layers[idx])
        members: dict[str, list] = {}  # input -> the linears reading it, in the layer's order
        for lin in linears:
            members.setdefault(job.input_key(lin.name), []).append(lin)
        dense = {lin.name: lin.impl.dense_weight() for lin in linears}
        quantized: dict[str, torch.Tensor] = {}
        first = {k: lins[0].name for k, lins in members.items()}  # the linear whose input the hooks see

        def use(weights: dict[str, torch.Tensor]) -> None:
            for lin in linears:
                lin.impl.set_weight(weights.get(lin.name, dense[lin.name]), getattr(lin.impl, "bias", None))

        x0s: dict[str, list[torch.Tensor]] = {k: [] for k in members}
        if drift:  # one pass of the original layer over the original stream: every input, batch by batch
            use({})
            grab = {first[k]: (lambda x, k=k: x0s[k].append(x.reshape(-1, x.shape[-1]).clone())) for k in members}
            original, _ = job._layer_forward(model, idx, original, batch, grab)
        reference = None
        for group in [list(members)] if not sequential else [[k] for k in members]:
            hessians = {k: CrossHessian(members[k][0].in_features, states.device, drift=drift) for k in group}
            hooks = {first[k]: hessians[k].add for k in group}
            if drift:  # each batch's original inputs beside the same rows on the quantized stream
                feeds = {k: iter(x0s[k]) for k in group}
                hooks = {first[k]: (lambda x, k=k: feed(hessians[k], next(feeds[k]), x)) for k in group}
            use(quantized)  # the groups before this one quantized
            out, _ = job._layer_forward(model, idx, states, batch, hooks)
            reference = out if reference is None else reference  # the original layer on this stream
            use({})
            for k in group:
                quantized |= _quantize_group(members[k], hessians[k], bits, idx,
                                             [linears.index(m) for m in members[k]])
        use(quantized)
        states, err = job._layer_forward(model, idx, states, batch, into=reference)
        errors.append(err)
    return errors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calibration", required=True, help="text file (rows of --cols tokens from its start)")
    ap.add_argument("--text", required=True, help="evaluation text (windows from its start)")
    ap.add_argument("--bits", type=int, default=6)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--cols", type=int, default=512)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--variants", default="plain,drift",
                    help="comma-separated: plain, seq, drift, seqdrift; a drift variant@λ sets DRIFT_DAMPING = λ")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds of the random signs; each variant runs each")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    grid_quantizer(args.bits)
    tok = Tokenizer.from_folder(args.model)
    calib = rows_from_text(tok, Path(args.calibration).read_text(encoding="utf-8"), args.rows, args.cols)
    windows = windows_of(tok.encode(Path(args.text).read_text(encoding="utf-8"), add_special_tokens=False),
                         args.window, args.windows)
    reference = load_model(args.model, device="cpu", dtype="float32", fuse=False)
    global SEED, DRIFT_DAMPING
    for variant, seed in ((v, int(sd)) for v in args.variants.split(",") for sd in args.seeds.split(",")):
        SEED = seed
        t0 = time.perf_counter()
        model = load_model(args.model, device="cpu", dtype="float32", fuse=False)
        if "@" in variant:
            DRIFT_DAMPING = float(variant.split("@")[1])
        with torch.no_grad():
            errors = quantize_model(model, calib, args.bits, drift="drift" in variant,
                                    sequential=variant.startswith("seq"), batch=4)
            result = evaluate(model, windows, reference)
        print(json.dumps({"variant": variant, "seed": seed, "bits": args.bits, "kl": round(result.kl_divergence, 6),
                          "top1": round(result.top1_agreement, 4), "ppl": round(result.perplexity, 3),
                          "ref_ppl": round(result.reference_perplexity, 3),
                          "last_layer_error": round(errors[-1], 5), "seconds": round(time.perf_counter() - t0, 1)}),
              flush=True)


if __name__ == "__main__":
    main()
