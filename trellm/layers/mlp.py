"""Gated MLP: down(act(gate(x)) * up(x))."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trellm.errors import ConfigError
from trellm.layers.linear import Linear, fuse_linears
from trellm.quant.base import MethodFor

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})") from None


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, *, act: str, bias: bool, methods: MethodFor, prefix: str):
        super().__init__()
        self.act, self.act_name = activation(act), act
        self.gate_proj = Linear(hidden, intermediate, bias=bias, methods=methods, name=f"{prefix}.gate_proj")
        self.up_proj = Linear(hidden, intermediate, bias=bias, methods=methods, name=f"{prefix}.up_proj")
        self.down_proj = Linear(intermediate, hidden, bias=bias, methods=methods, name=f"{prefix}.down_proj")
        self.gate_up = None  # gate and up as one matmul (fuse_projections, after loading)

    def fuse_projections(self) -> None:
        self.gate_up = fuse_linears([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from trellm.kernels.fused import act_mul

            gate, up = self.gate_up(x) if self.gate_up is not None else (self.gate_proj(x), self.up_proj(x))
            return self.down_proj(act_mul(self.act_name, gate, up))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
