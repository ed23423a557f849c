"""Linear: a named slot whose storage and matmul belong to a QuantMethod."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from trellm.io.weights import WeightSource
from trellm.quant.base import LinearImpl, MethodFor

# An input already transformed by its producer for the linears that read it: (x' fp16 [G, rows, k_pad],
# its 128-block sums fp32 [G, rows, k_pad/128]); see LinearGroup.
Rotated = tuple[torch.Tensor, torch.Tensor]


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, bias: bool, methods: MethodFor, name: str):
        super().__init__()
        self.in_features, self.out_features, self.name = in_features, out_features, name
        self.impl: LinearImpl = methods(name).create(in_features, out_features, bias)

    def load(self, source: WeightSource, *, device: torch.device, dtype: torch.dtype) -> None:
        self.impl.load(source, self.name, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, rotated: Rotated | None = None) -> torch.Tensor:
        """rotated: this linear's input transform of x already applied by the producing kernel (see
        LinearGroup); only ever given to formats whose input_rotation() is not None."""
        return self.impl(x) if rotated is None else self.impl(x, rotated=rotated)

    def dense_weight(self) -> torch.Tensor:
        return self.impl.dense_weight()


def fuse_linears(linears: list[Linear]) -> Callable[..., list[torch.Tensor]] | None:
    """One matmul for linears that read the same input, when their format can (LinearImpl.fuse)."""
    impls = [lin.impl for lin in linears]
    if any(type(i) is not type(impls[0]) for i in impls):
        return None
    return type(impls[0]).fuse(impls)


class LinearGroup:
    """Linears that read one input (q/k/v, gate/up, or one linear alone), called together: as one
    matmul where their format fuses them (LinearImpl.fuse), and with their input transform moved into
    the kernel that produces the input where every member's format has one (EXL3: x' = had128(x ⊙
    suh); `rotation` then holds the members' suh stacked [G, k_pad], which kernels/fused.py's *_rotated
    functions apply while writing x, so that no separate transform launch runs). Built after loading,
    on CUDA (DecoderModel.fuse_projections)."""

    def __init__(self, linears: list[Linear]):
        self.linears = linears
        self.fused = fuse_linears(linears) if len(linears) > 1 else None
        rotations = [lin.impl.input_rotation() for lin in linears]
        self.rotation = None
        if all(r is not None for r in rotations) and len({r.shape for r in rotations}) == 1:
            self.rotation = torch.stack(rotations).contiguous()  # [G, k_pad]

    def rotation_for(self, rows: int, dtype: torch.dtype) -> torch.Tensor | None:
        """`rotation` where some member will use it for an input of `rows` rows in `dtype`, else None (the
        producer then skips the transform: e.g. EXL3's large batches multiply x itself)."""
        if self.rotation is None or not any(lin.impl.takes_rotation(rows, dtype) for lin in self.linears):
            return None
        return self.rotation

    def __call__(self, x: torch.Tensor, rotated: Rotated | None = None) -> list[torch.Tensor]:
        """x [..., in_features] -> each member's output; `rotated` as the *_rotated producers return it
        ([G, rows, k_pad], [G, rows, k_pad/128]) for `self.rotation`."""
        if self.fused is not None:
            return self.fused(x) if rotated is None else self.fused(x, rotated=rotated)
        if rotated is None:
            return [lin(x) for lin in self.linears]
        return [lin(x, rotated=(rotated[0][i], rotated[1][i])) for i, lin in enumerate(self.linears)]
