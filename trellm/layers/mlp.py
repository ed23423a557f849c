"""Gated MLP: down(act(gate(x)) * up(x))."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trellm.errors import ConfigError
from trellm.layers.linear import Linear, LinearGroup, Rotated
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
        # gate/up and down called as groups (fuse_projections, after loading; CUDA)
        self.gate_up: LinearGroup | None = None
        self.down: LinearGroup | None = None

    def fuse_projections(self) -> None:
        self.gate_up = LinearGroup([self.gate_proj, self.up_proj])
        self.down = LinearGroup([self.down_proj])

    def forward(self, x: torch.Tensor, rotated: Rotated | None = None) -> torch.Tensor:
        """rotated: gate/up's input transform of x, done by x's producer (for self.gate_up.rotation)."""
        if x.is_cuda:
            from trellm.kernels.fused import act_mul, act_mul_rotated

            if self.gate_up is None:
                return self.down_proj(act_mul(self.act_name, self.gate_proj(x), self.up_proj(x)))
            gate, up = self.gate_up(x, rotated)
            rotate = self.down.rotation_for(gate.numel() // gate.shape[-1], gate.dtype)
            return self.down(*act_mul_rotated(self.act_name, gate, up, rotate))[0]
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
