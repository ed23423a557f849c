"""Unquantized weights (fp16, bf16 or fp32, whatever the model runs in)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from trellm.io.weights import WeightSource
from trellm.quant.base import LinearImpl, QuantMethod


class DenseLinear(LinearImpl):
    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__(in_features, out_features, bias)
        # Buffers, not Parameters: inference only, and a tied head can share the embedding tensor.
        self.register_buffer("weight", None, persistent=False)  # [out_features, in_features]
        self.register_buffer("bias", None, persistent=False)  # [out_features]

    def load(self, source: WeightSource, prefix: str, *, device: torch.device, dtype: torch.dtype) -> None:
        shape = (self.out_features, self.in_features)
        self.weight = source.get(f"{prefix}.weight", shape=shape, dtype=dtype, device=device)
        if self.has_bias:
            self.bias = source.get(f"{prefix}.bias", shape=(self.out_features,), dtype=dtype, device=device)

    def set_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Share an existing tensor (tied embeddings)."""
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.weight

    @staticmethod
    def fuse(impls: list[LinearImpl]) -> Callable[[torch.Tensor], list[torch.Tensor]] | None:
        """Concatenated rows: one GEMM/GEMV instead of one per linear."""
        if not all(isinstance(i, DenseLinear) and i.weight is not None for i in impls):
            return None
        first = impls[0]
        if any(i.weight.dtype != first.weight.dtype or i.weight.device != first.weight.device
               or i.in_features != first.in_features or (i.bias is None) != (first.bias is None) for i in impls):
            return None
        weight = torch.cat([i.weight for i in impls])  # [sum out, in]
        bias = torch.cat([i.bias for i in impls]) if first.bias is not None else None
        sizes, row = [i.out_features for i in impls], 0
        for i in impls:  # members become views of the fused rows
            i.weight = weight[row : row + i.out_features]
            i.bias = bias[row : row + i.out_features] if bias is not None else None
            row += i.out_features
        return lambda x: list(F.linear(x, weight, bias).split(sizes, dim=-1))

    def describe(self) -> str:
        return str(self.weight.dtype).removeprefix("torch.") if self.weight is not None else "unloaded"


class FP16Method(QuantMethod):
    name = "fp16"

    def create(self, in_features: int, out_features: int, bias: bool) -> LinearImpl:
        return DenseLinear(in_features, out_features, bias)
