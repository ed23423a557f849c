"""The QuantMethod interface: how a Linear stores, loads and applies its weight.

Model code never branches on the quantization format (ARCHITECTURE.md rule 2): a
Linear asks its QuantMethod for an implementation module and calls it. Formats:
`fp16` (plain 16/32-bit weights, this package) and `exl3` (trellis-coded, later).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

if TYPE_CHECKING:
    from trellm.io.weights import WeightSource


class LinearImpl(nn.Module, ABC):
    """The weight storage and matmul of one Linear in some format. y = x @ W^T + b."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.has_bias = in_features, out_features, bias

    @abstractmethod
    def load(self, source: WeightSource, prefix: str, *, device: torch.device, dtype: torch.dtype) -> None:
        """Read this layer's tensors (names start with `prefix`, e.g. 'model.layers.0.mlp.up_proj')."""

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features]."""

    @abstractmethod
    def dense_weight(self) -> torch.Tensor:
        """The effective weight [out_features, in_features] (debugging, export, tests)."""

    def describe(self) -> str:
        """Short human description of the storage, for `trellm inspect`."""
        return type(self).__name__

    def input_rotation(self) -> torch.Tensor | None:
        """For formats that transform their input before the product (EXL3: x' = had128(x ⊙ suh)) and
        can take it already transformed by the producing kernel: the per-channel factor [k_pad] of that
        transform; then forward also accepts `rotated=(x' [rows, k_pad], 128-block sums [rows,
        k_pad/128])`. None (the default) where not."""
        return None

    def takes_rotation(self, rows: int, dtype: torch.dtype) -> bool:
        """Whether a call of `rows` rows in `dtype` would use a handed-over input transform (asked only
        where input_rotation() is not None); where not, producers skip the work of making it."""
        return True

    @staticmethod
    def fuse(impls: list[LinearImpl]) -> Callable[..., list[torch.Tensor]] | None:
        """One matmul for several linears of this format that read the same input (q/k/v, gate/up), or
        None where the format cannot. The result maps x to the list of outputs (and, where the members
        have an input_rotation, also takes `rotated` for their stacked rotations). The members keep
        working alone (their tensors become views into the fused ones, so nothing is stored twice)."""
        return None


class QuantMethod(ABC):
    name: str

    @abstractmethod
    def create(self, in_features: int, out_features: int, bias: bool) -> LinearImpl: ...


# Linear's full name (e.g. "model.layers.0.mlp.up_proj") -> how that layer's weight is stored.
MethodFor = Callable[[str], QuantMethod]
