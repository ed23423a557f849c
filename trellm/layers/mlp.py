"""Gated MLP: down(act(gate(x)) * up(x))."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trellm.errors import ConfigError
from trellm.layers.linear import Linear
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
        self.act = activation(act)
        self.gate_proj = Linear(hidden, intermediate, bias=bias, methods=methods, name=f"{prefix}.gate_proj")
        self.up_proj = Linear(hidden, intermediate, bias=bias, methods=methods, name=f"{prefix}.up_proj")
        self.down_proj = Linear(intermediate, hidden, bias=bias, methods=methods, name=f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
