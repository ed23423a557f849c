"""LinearGroup's input transform: which producers make it, for how many rows (CPU, with a stand-in format)."""

from __future__ import annotations

import torch

from trellm.layers.linear import LinearGroup
from trellm.quant.fp16 import DenseLinear


class _Rotating(DenseLinear):
    """A format with an input transform (like EXL3's suh) that only batches of up to `limit` rows use."""

    def __init__(self, k: int, limit: int):
        super().__init__(k, k, False)
        self.suh, self.limit = torch.full((k,), float(limit)), limit

    def input_rotation(self) -> torch.Tensor | None:
        return self.suh

    def takes_rotation(self, rows: int, dtype: torch.dtype) -> bool:
        return rows <= self.limit


class _Slot:
    def __init__(self, impl):
        self.impl = impl


def test_rotation_is_made_only_where_some_member_uses_it():
    group = LinearGroup([_Slot(_Rotating(8, 4)), _Slot(_Rotating(8, 64))])
    assert group.rotation is not None and group.rotation.shape == (2, 8)
    assert group.rotation_for(1, torch.bfloat16) is group.rotation
    assert group.rotation_for(64, torch.bfloat16) is group.rotation  # the second member still takes it
    assert group.rotation_for(65, torch.bfloat16) is None  # nobody would: the producer skips the transform
    alone = LinearGroup([_Slot(_Rotating(8, 4))])
    assert alone.rotation_for(4, torch.float16) is not None and alone.rotation_for(5, torch.float16) is None


def test_formats_without_a_transform_never_get_one():
    plain = LinearGroup([_Slot(DenseLinear(8, 8, False))])
    assert plain.rotation is None and plain.rotation_for(1, torch.bfloat16) is None
    mixed = LinearGroup([_Slot(_Rotating(8, 64)), _Slot(DenseLinear(8, 8, False))])
    assert mixed.rotation is None and mixed.rotation_for(1, torch.bfloat16) is None
