"""Linear: a named slot whose storage and matmul belong to a QuantMethod."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from trellm.io.weights import WeightSource
from trellm.quant.base import LinearImpl, MethodFor


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, bias: bool, methods: MethodFor, name: str):
        super().__init__()
        self.in_features, self.out_features, self.name = in_features, out_features, name
        self.impl: LinearImpl = methods(name).create(in_features, out_features, bias)

    def load(self, source: WeightSource, *, device: torch.device, dtype: torch.dtype) -> None:
        self.impl.load(source, self.name, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.impl(x)

    def dense_weight(self) -> torch.Tensor:
        return self.impl.dense_weight()


def fuse_linears(linears: list[Linear]) -> Callable[[torch.Tensor], list[torch.Tensor]] | None:
    """One matmul for linears that read the same input, when their format can (LinearImpl.fuse)."""
    impls = [lin.impl for lin in linears]
    if any(type(i) is not type(impls[0]) for i in impls):
        return None
    return type(impls[0]).fuse(impls)
