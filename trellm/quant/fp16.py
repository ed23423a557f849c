"""Unquantized weights (fp16, bf16 or fp32, whatever the model runs in)."""

from __future__ import annotations

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

    def describe(self) -> str:
        return str(self.weight.dtype).removeprefix("torch.") if self.weight is not None else "unloaded"


class FP16Method(QuantMethod):
    name = "fp16"

    def create(self, in_features: int, out_features: int, bias: bool) -> LinearImpl:
        return DenseLinear(in_features, out_features, bias)
