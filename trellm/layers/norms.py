"""RMSNorm in the two roundings that published models were trained with."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = x / rms(x) * (offset + w), normalised in fp32.

    offset = 0 (Llama, Qwen, Phi) or 1 (Gemma, which stores w - 1). `weight_in_fp32`
    follows Gemma, which multiplies by the weight before rounding back to the input
    dtype; Llama-style models round first and multiply in the model dtype. The two
    agree in fp32 and differ by one rounding in bf16, which is enough to change greedy
    outputs, so each model gets the one it was trained with.
    """

    def __init__(self, dim: int, eps: float, *, offset: float = 0.0, weight_in_fp32: bool = False):
        super().__init__()
        self.dim, self.eps, self.offset, self.weight_in_fp32 = dim, eps, offset, weight_in_fp32
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)  # [dim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from trellm.kernels.fused import rms_norm

            return rms_norm(x, self.weight, self.eps, self.offset, self.weight_in_fp32)
        return self._forward_ref(x)

    def norm_for(self, h: torch.Tensor, x: torch.Tensor | None, rotate: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """(h + x — h itself without x —, its norm, the consuming linears' input transform of the norm for
        their stacked rotation `rotate` [G, k_pad] — None without): the residual add, the norm and the
        transform in one kernel on CUDA (layers/linear.py LinearGroup; rotations exist only there)."""
        if h.is_cuda:
            from trellm.kernels.fused import rms_norm_rotated

            residual, x = (None, h) if x is None else (h, x)
            return rms_norm_rotated(residual, x, self.weight, self.eps, self.offset, self.weight_in_fp32, rotate)
        assert rotate is None, "input transforms are made by the CUDA kernels"
        if x is not None:
            h = h + x
        return h, self(h), None

    def _forward_ref(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_in_fp32:
            return (xf * (self.offset + self.weight.float())).to(x.dtype)
        w = self.weight if self.offset == 0 else self.weight + self.offset
        return w * xf.to(x.dtype)
