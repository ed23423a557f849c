"""The `exl3` QuantMethod: linears stored as EXL3 trellis codes (EXL3_FORMAT.md §2).

Loading validates every tensor against the format (and names the tensor when it
is wrong). The forward pass dispatches by device and batch size:
  CPU          -> the torch reference (Q decoded once and cached: CPU runs are for tests)
  CUDA, m<=64  -> fused Triton decode-GEMV (kernels/exl3_gemv.py, exl3_tc.py; kernels/exl3_dispatch.py)
  CUDA, larger -> Triton decode to an fp16 scratch + cuBLAS (kernels/exl3_decode.py)
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from trellm.errors import TensorError
from trellm.io.weights import WeightSource
from trellm.quant import exl3_format as fmt
from trellm.quant.base import LinearImpl, QuantMethod

log = logging.getLogger(__name__)

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8) + fmt.HALF_BITS


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


class EXL3Linear(LinearImpl):
    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__(in_features, out_features, bias)
        self.k_pad, self.n_pad = round_up(in_features, 128), round_up(out_features, 128)
        self.bits: float = 0.0
        self.codebook = ""
        self.register_buffer("trellis", None, persistent=False)  # int16 [k_pad/16, n_pad/16, 16K]
        self.register_buffer("suh", None, persistent=False)  # fp16 [k_pad]
        self.register_buffer("svh", None, persistent=False)  # fp16 [n_pad]
        self.register_buffer("bias", None, persistent=False)  # fp16 [out_features]
        self._q_cache: torch.Tensor | None = None  # CPU only: decoded Q [k_pad, n_pad]

    # ---- loading ----------------------------------------------------------------------------------

    def load(self, source: WeightSource, prefix: str, *, device: torch.device, dtype: torch.dtype) -> None:
        trellis = source.get(f"{prefix}.trellis")
        self.set_tensors(
            trellis,
            suh=self._scales(source, prefix, "suh", "su", self.k_pad),
            svh=self._scales(source, prefix, "svh", "sv", self.n_pad),
            codebook=self._codebook(source, prefix),
            bias=source.get(f"{prefix}.bias") if self.has_bias else None,
            name=prefix,
            device=device,
        )

    def set_tensors(self, trellis: torch.Tensor, *, suh: torch.Tensor, svh: torch.Tensor, codebook: str,
                    bias: torch.Tensor | None = None, name: str = "", device: torch.device | str | None = None) -> None:
        """Validate and install the layer's tensors (used by the loader, the writer's tests and benchmarks)."""
        where = f"{name}.trellis" if name else "trellis"
        if trellis.dtype != torch.int16 or trellis.dim() != 3:
            raise TensorError(f"{where} must be an int16 tensor [k/16, n/16, 16*bits], got {trellis.dtype} "
                              f"{list(trellis.shape)}")
        bits = fmt.bits_per_weight(trellis.shape[-1])
        if trellis.shape[-1] % 16 and bits not in fmt.HALF_BITS:
            raise TensorError(f"{where} has last dimension {trellis.shape[-1]}, not a multiple of 16 "
                              "(16 int16 words per bit of the 16x16 tile); the file is corrupt")
        if bits not in SUPPORTED_BITS:
            raise TensorError(f"{where} encodes {bits:g} bits per weight; EXL3 supports 1..8 "
                              f"(and {', '.join(map(str, fmt.HALF_BITS))} with the mul1 codebook)")
        if bits in fmt.HALF_BITS and codebook != "mul1":
            raise TensorError(f"{where}: half-integer bits ({bits}) exist only with the mul1 codebook, "
                              f"found {codebook}")
        want = (self.k_pad // 16, self.n_pad // 16)
        if tuple(trellis.shape[:2]) != want:
            raise TensorError(f"{where} has tiles {list(trellis.shape[:2])} but a {self.in_features}->"
                              f"{self.out_features} layer padded to 128 needs {list(want)}; config.json does not "
                              "match the weights")
        for label, t, length in (("suh", suh, self.k_pad), ("svh", svh, self.n_pad)):
            if t.dim() != 1 or t.shape[0] != length:
                raise TensorError(f"{name}.{label} has shape {list(t.shape)} but the layer needs [{length}] "
                                  f"(the padded {'in' if label == 'suh' else 'out'}_features)")
        if bias is not None and (bias.dim() != 1 or bias.shape[0] not in (self.out_features, self.n_pad)):
            raise TensorError(f"{name}.bias has shape {list(bias.shape)}, expected [{self.out_features}]")
        dev = device if device is not None else trellis.device
        self.trellis = trellis.to(dev).contiguous()
        self.suh = suh.to(device=dev, dtype=torch.float16)
        self.svh = svh.to(device=dev, dtype=torch.float16)
        self.bias = None if bias is None else bias[: self.out_features].to(device=dev, dtype=torch.float16)
        self.bits, self.codebook = bits, codebook
        self._q_cache = None

    @staticmethod
    def _scales(source: WeightSource, prefix: str, name: str, legacy: str, length: int) -> torch.Tensor:
        if f"{prefix}.{name}" in source:
            return source.get(f"{prefix}.{name}")
        if f"{prefix}.{legacy}" in source:
            # Older files: int16 sign bit fields, 16 signs per word, scale 1 (§2).
            words = source.get(f"{prefix}.{legacy}")
            if words.dtype != torch.int16 or words.numel() * 16 < length:
                raise TensorError(f"{prefix}.{legacy} must be int16 sign bits for {length} features, "
                                  f"got {words.dtype} {list(words.shape)}")
            return fmt.signs_from_bits(words, length)
        raise TensorError(f"{prefix}.{name} is missing from the checkpoint (and no legacy {prefix}.{legacy}); "
                          "the EXL3 files are incomplete")

    @staticmethod
    def _codebook(source: WeightSource, prefix: str) -> str:
        found = [cb for cb in fmt.MARKERS if f"{prefix}.{cb}" in source]
        if len(found) > 1:
            raise TensorError(f"{prefix} carries both codebook markers {found}; the file is corrupt")
        if not found:
            return "3inst"
        cb = found[0]
        value = int(source.get(f"{prefix}.{cb}").to(torch.int64).flatten()[0])
        if value & 0xFFFFFFFF != fmt.MARKERS[cb]:
            raise TensorError(f"{prefix}.{cb} holds {value & 0xFFFFFFFF:#x}, expected {fmt.MARKERS[cb]:#x}")
        return cb

    # ---- compute ----------------------------------------------------------------------------------

    def input_rotation(self) -> torch.Tensor | None:
        """suh where the CUDA kernels run (integer K): the producer of x may then hand over
        x' = had128(x ⊙ suh) and its block sums (LinearImpl.input_rotation)."""
        if self.trellis is None or not self.trellis.is_cuda or not float(self.bits).is_integer():
            return None
        return self.suh

    def takes_rotation(self, rows: int, dtype: torch.dtype) -> bool:
        from trellm.kernels.exl3_dispatch import small_m_limit, uses_effective

        return rows <= small_m_limit(self.trellis.device) or not uses_effective(self, dtype)

    def forward(self, x: torch.Tensor, rotated: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [m, in_features]
        if x2.device.type == "cuda":
            from trellm.kernels.exl3_dispatch import exl3_matmul

            y = exl3_matmul(x2, self, rotated)
        else:
            y = self._forward_ref(x2)
        return y.reshape(*shape[:-1], self.out_features)

    @staticmethod
    def fuse(impls: list[LinearImpl]) -> Callable[..., list[torch.Tensor]] | None:
        """Up to three CUDA linears with the same input size, bits and codebook, every output a multiple
        of 128: their trellis columns are concatenated and decode batches (m <= 64) run one input
        transform (each member's own suh) and one stream-K GEMV for all of them."""
        if not 2 <= len(impls) <= 3 or not all(isinstance(i, EXL3Linear) and i.trellis is not None for i in impls):
            return None
        first = impls[0]
        if first.trellis.device.type != "cuda" or not float(first.bits).is_integer() or any(
                i.bits != first.bits or i.codebook != first.codebook or i.k_pad != first.k_pad
                or i.out_features % 128 or (i.bias is None) != (first.bias is None) for i in impls):
            return None
        trellis = torch.cat([i.trellis for i in impls], dim=1)  # [k/16, sum n/16, 16K]
        svh = torch.cat([i.svh for i in impls])
        bias = torch.cat([i.bias for i in impls]) if first.bias is not None else None
        suh = torch.stack([i.suh for i in impls])  # [G, k_pad]
        sizes = [i.out_features for i in impls]
        col = 0
        blocks = []
        for i in impls:  # members keep their own path, on views of the fused tensors
            i.trellis = trellis[:, col // 16 : (col + i.out_features) // 16]
            i.svh = svh[col : col + i.out_features]
            i.bias = bias[col : col + i.out_features] if bias is not None else None
            col += i.out_features
            blocks.append(col // 128)
        group_blocks = tuple(blocks[:-1])

        def run(x: torch.Tensor, rotated: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor]:
            """rotated: had_in's output for the stacked suh, written by x's producer (LinearGroup)."""
            from trellm.kernels.exl3_dispatch import gemv_small, small_m_limit
            from trellm.kernels.hadamard import had_in

            x2 = x.reshape(-1, x.shape[-1])
            if x2.shape[0] > small_m_limit(x2.device):  # prefill: each member's scratch + cuBLAS path
                if rotated is None:
                    return [i(x) for i in impls]
                return [i(x, rotated=(rotated[0][g], rotated[1][g])) for g, i in enumerate(impls)]

            x_h, x_sums = had_in(x2.contiguous(), suh) if rotated is None else rotated
            y = gemv_small(x_h, x_sums, trellis, svh, bias, first.codebook, col, x.dtype, group_blocks=group_blocks)
            return [part.view(*x.shape[:-1], n) for part, n in zip(y.split(sizes, dim=1), sizes)]

        return run

    def _forward_ref(self, x: torch.Tensor) -> torch.Tensor:
        """The reference path: y = had(had(x ⊙ suh) · Q) ⊙ svh + bias, fp32 math, Q cached."""
        if self._q_cache is None:
            self._q_cache = fmt.decode_trellis(self.trellis, self.codebook, self.bits).float()
        xp = F.pad(x.float(), (0, self.k_pad - self.in_features))
        y = fmt.had128(fmt.had128(xp * self.suh.float()) @ self._q_cache) * self.svh.float()
        y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def dense_weight(self) -> torch.Tensor:
        w = fmt.exl3_weight(self.trellis, self.suh, self.svh, self.codebook, self.bits)  # [k_pad, n_pad]
        return w[: self.in_features, : self.out_features].T.contiguous()

    def describe(self) -> str:
        return f"exl3 {self.bits:g}-bit {self.codebook}"


class EXL3Method(QuantMethod):
    name = "exl3"

    def create(self, in_features: int, out_features: int, bias: bool) -> LinearImpl:
        return EXL3Linear(in_features, out_features, bias)
