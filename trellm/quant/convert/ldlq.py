"""Block LDLQ (QuIP / QTIP "BlockLDLQ", QUANTIZER.md §4) with 16-row strips.

For y = x·W with W [k, n] and the input Hessian proxy H = Σ xᵀx [k, k], the loss of a
quantized Ŵ is tr(Eᵀ H E) with E = W - Ŵ. Factor H = L D Lᵀ with L unit block-lower-
triangular (16×16 identity blocks on the diagonal) and D block-diagonal. Then

    tr(Eᵀ H E) = Σ_b tr(F_bᵀ D_b F_b),   F_b = E_b + Σ_{c>b} L_cbᵀ E_c

so quantizing the strips from the last to the first, each one's target being its rows
plus the feedback Σ_{c>b} L_cbᵀ E_c of the strips already done, makes every F_b just the
quantization error of that strip's adjusted target.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

import torch

STRIP = 16


def damp(h: torch.Tensor, fraction: float) -> torch.Tensor:
    return h + fraction * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


def block_ldl(h: torch.Tensor, *, damping: float = 0.025, retries: int = 6) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(L, D, damping used) for H = L D Lᵀ in float64; damping grows ×4 until Cholesky succeeds."""
    k = h.shape[0]
    if k % STRIP:
        raise ValueError(f"Hessian size {k} is not a multiple of {STRIP}")
    h = h.double()
    for _ in range(retries):
        c, info = torch.linalg.cholesky_ex(damp(h, damping))
        if int(info) == 0:
            break
        damping *= 4
    else:
        raise ValueError("the Hessian is not positive definite even with heavy damping; "
                         "the calibration data is degenerate (too few or constant rows)")
    blocks = c.view(k // STRIP, STRIP, k // STRIP, STRIP).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [B, 16, 16]
    inv = torch.linalg.inv(blocks)
    l = c @ torch.block_diag(*inv)  # unit block-lower-triangular
    d = blocks @ blocks.transpose(1, 2)  # [B, 16, 16]
    return l, d, damping


def ldlq_steps(w: torch.Tensor, l: torch.Tensor) -> Generator[tuple[int, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Block LDLQ as a coroutine: yields (b, target [16, n] float32) for each strip from the last to the
    first, takes the quantized strip Ŵ_b back through send(), and returns Ŵ [k, n]. Several linears'
    coroutines can then advance together and share each trellis search (quantize.quantize_linears)."""
    k, n = w.shape
    nb = k // STRIP
    w64 = w.double()
    out = torch.empty_like(w64)
    err = torch.zeros_like(w64)  # E rows of the strips done so far (zero elsewhere)
    lb = l.view(nb, STRIP, nb, STRIP)
    for b in range(nb - 1, -1, -1):
        rows = slice(b * STRIP, (b + 1) * STRIP)
        # Σ_{c>b} L_cbᵀ E_c: the columns of block b of L below the diagonal, against the done errors.
        below = lb[b + 1 :, :, b, :].reshape(-1, STRIP)  # [(nb-b-1)·16, 16]
        feedback = below.T @ err[(b + 1) * STRIP :]  # [16, n]
        target = w64[rows] + feedback
        q = (yield b, target.float()).double()
        out[rows] = q
        err[rows] = w64[rows] - q
    return out.to(w.dtype)


def ldlq(w: torch.Tensor, l: torch.Tensor, quantize_strip: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Ŵ [k, n] by block LDLQ. `quantize_strip(b, target [16, n]) -> Ŵ_b [16, n]` quantizes one strip."""
    steps = ldlq_steps(w, l)
    try:
        b, target = next(steps)
        while True:
            b, target = steps.send(quantize_strip(b, target))
    except StopIteration as done:
        return done.value


def ldlq_direct(w: torch.Tensor, h: torch.Tensor, quantize_strip: Callable[[int, torch.Tensor], torch.Tensor],
                damping: float) -> torch.Tensor:
    """The same algorithm written literally (explicit sums over strips); for tests."""
    l, _, _ = block_ldl(h, damping=damping, retries=1)
    k, n = w.shape
    nb = k // STRIP
    w64 = w.double()
    q_all = torch.zeros_like(w64)
    for b in reversed(range(nb)):
        target = w64[b * STRIP : (b + 1) * STRIP].clone()
        for c in range(b + 1, nb):
            l_cb = l[c * STRIP : (c + 1) * STRIP, b * STRIP : (b + 1) * STRIP]
            e_c = w64[c * STRIP : (c + 1) * STRIP] - q_all[c * STRIP : (c + 1) * STRIP]
            target += l_cb.T @ e_c
        q_all[b * STRIP : (b + 1) * STRIP] = quantize_strip(b, target.float()).double()
    return q_all.to(w.dtype)


def proxy_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr(Eᵀ H E) / tr(Wᵀ H W): the share of the layer's output energy the quantization loses."""
    h64 = h.double()
    return hessian_energy((w - w_hat).double(), h64) / hessian_energy(w.double(), h64)


def hessian_energy(m: torch.Tensor, h: torch.Tensor) -> float:
    """tr(Mᵀ H M) for M [k, n], as Σ (H M) ⊙ M: never forms the n × n product (a 128k-row head's
    would be 122 GiB in float64)."""
    return float(((h @ m) * m).sum())
