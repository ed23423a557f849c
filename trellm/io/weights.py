"""WeightSource: the tensors a model asks for, by the names of its own modules.

Most checkpoints store one tensor per module. Some store several modules stacked
in one tensor (Phi-3's qkv_proj and gate_up_proj); the architecture declares
those, and this class hands out the right rows, read lazily from the mmap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trellm.errors import TensorError
from trellm.io.safetensors import CheckpointReader


@dataclass(frozen=True, slots=True)
class FusedPart:
    fused: str  # module name in the checkpoint, e.g. "self_attn.qkv_proj"
    start: int  # first row of this part
    end: int


class WeightSource:
    def __init__(self, reader: CheckpointReader, parts: dict[str, FusedPart] | None = None):
        """`parts` maps a module suffix (e.g. "self_attn.q_proj") to its rows in a fused tensor."""
        self.reader = reader
        self.parts = parts or {}

    def __contains__(self, name: str) -> bool:
        return name in self.reader or self._fused_location(name) is not None

    def _fused_location(self, name: str) -> tuple[str, FusedPart] | None:
        prefix, _, leaf = name.rpartition(".")  # leaf: weight / bias / any format-specific tensor
        for suffix, part in self.parts.items():
            if prefix.endswith("." + suffix):
                fused_name = prefix[: -len(suffix)] + part.fused + "." + leaf
                if fused_name in self.reader:
                    return fused_name, part
        return None

    def get(
        self,
        name: str,
        *,
        shape: tuple[int, ...] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        if name in self.reader:
            return self.reader.get(name, shape=shape, dtype=dtype, device=device)
        loc = self._fused_location(name)
        if loc is None:
            raise TensorError(
                f"tensor {name!r} is missing from the checkpoint in {self.reader.folder}; the model files are "
                "incomplete or config.json names the wrong architecture"
            )
        fused_name, part = loc
        info = self.reader.info(fused_name)
        if info.shape[0] < part.end:
            raise TensorError(
                f"fused tensor {fused_name!r} has {info.shape[0]} rows but the config needs at least {part.end} "
                f"(to take {name!r} from rows {part.start}..{part.end}); config.json does not match the weights"
            )
        t = self.reader.get(fused_name, rows=(part.start, part.end))
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise TensorError(
                f"tensor {name!r} (rows {part.start}..{part.end} of {fused_name!r}) has shape {list(t.shape)} "
                f"but the model config implies {list(shape)}; config.json does not match the weights"
            )
        return t.to(device=device, dtype=dtype)
