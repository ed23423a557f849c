"""Measured bit allocation: what each linear's quantization error costs at the model's output.

Before any layer is quantized, each linear in turn gets noise shaped like the trellis error and
the KL-divergence of the model's next-token distributions from the unperturbed ones is measured
on a few calibration rows. The trellis puts an error of about the same size on every entry of
the rotated, channel-scaled weights, i.e. i.i.d. noise there; the rotation is orthonormal, so in
the original weights that is i.i.d. noise times the channel scales (input d_i, output c_j):

    E_ij = NOISE · RMS(W / d / c) · d_i · c_j · N(0, 1)

In the small-error regime the KL-divergence is quadratic in the error, so a linear quantized at K
bits costs about  sensitivity × mse(K) / NOISE², with mse(K) the trellis's error on a unit Gaussian;
the allocation then minimises Σ sensitivity_i · mse(K_i) for the bit budget (bits.allocate_measured).

Per weight, the sensitivities of SmolLM2-135M's linears differ ~90× (layer 0's q_proj is the cheapest,
layer 1's v_proj the dearest; 6.7× between the 10th and 90th percentiles; first 20 layers, CPU), which a
uniform K ignores. On the GPU the measured allocation lowered the KL-divergence by 14–18 % on
Qwen2.5-Coder-0.5B and 3–6 % on SmolLM2 against bits.allocate_bits (RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from trellm.layers.linear import Linear
from trellm.quant.convert.quantize import SCALE_MODES, channel_scales

NOISE = 0.05  # relative RMS of the probe noise: between a 4- and a 5-bit trellis error, far above bf16 rounding
ROWS, COLS = 4, 512  # calibration tokens the probe runs on (its text rows, not the random-token ones)


def probe_noise(weight: torch.Tensor, mode: str, generator: torch.Generator, noise: float = NOISE) -> torch.Tensor:
    """Trellis-like noise for weight [n, k] (Hugging Face layout), float32, drawn on the weight's device
    (the generator's): an 8B model's linears take ~7·10^9 draws, tens of seconds on a CPU."""
    w = weight.float().T  # [k, n] as the quantizer sees it
    d, c = channel_scales(w, mode if mode in SCALE_MODES else "both")
    rms = float((w / d[:, None] / c[None, :]).pow(2).mean().sqrt())
    e = torch.randn(w.shape, generator=generator, device=w.device) * (noise * rms)
    return (e * d[:, None] * c[None, :]).T


def linear_sensitivities(layers: Sequence[Sequence[Linear]], states: torch.Tensor,
                         run_layer: Callable[[int, torch.Tensor], torch.Tensor],
                         logprobs: Callable[[torch.Tensor], torch.Tensor], *, mode: str = "both", seed: int = 0,
                         noise: float = NOISE) -> dict[str, float]:
    """KL-divergence (mean per token, nats) caused by probe noise on each linear, by linear name.

    layers[i] = the dense Linears of decoder layer i; states = the embedded calibration rows [R, C, hidden];
    run_layer(i, h) -> layer i's output; logprobs(h) -> log-softmax of the logits [R, C, vocab] (float32).
    Each linear's weight is restored after its probe."""
    inputs = []
    h = states
    with torch.no_grad():
        for i in range(len(layers)):
            inputs.append(h)
            h = run_layer(i, h)
        ref = logprobs(h)
        p_ref = ref.exp()
        out: dict[str, float] = {}
        for i, linears in enumerate(layers):
            for j, lin in enumerate(linears):
                w0 = lin.impl.weight
                g = torch.Generator(device=w0.device).manual_seed(seed * 1_000_003 + i * 9_973 + j * 101 + 7)
                lin.impl.weight = (w0.float() + probe_noise(w0, mode, g, noise)).to(w0.dtype)
                try:
                    h = inputs[i]
                    for k in range(i, len(layers)):
                        h = run_layer(k, h)
                    out[lin.name] = float((p_ref * (ref - logprobs(h))).sum(-1).mean())
                finally:
                    lin.impl.weight = w0
    return out
