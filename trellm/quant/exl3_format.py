"""The EXL3 weight format in plain torch: the executable form of ../shared/design/EXL3_FORMAT.md.

Everything here is a reference: readable, exact, vectorised but not fast. The GPU
kernels (kernels/exl3_*.py) are tested against these functions, and the writer and
the converter produce tensors that these functions read back.

Notation (EXL3_FORMAT.md §2–3): a linear layer with k inputs and n outputs stores
`trellis` int16 [k/16, n/16, 16·K]: one 16×16 tile per (a, c), each a circular
stream of 256·K bits from which weight p (0..255, in tensor-core fragment order)
takes the 16-bit state ending at bit (p+1)·K. A codebook maps states to fp16
values; W = diag(suh)·H·Q·H·diag(svh) with H the blockwise 128-point Hadamard.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

CODEBOOKS = ("mul1", "mcg", "3inst")
# Marker tensors that name the codebook in a checkpoint (absent = 3inst), §2.
MARKERS = {"mul1": 0x83DCD12D, "mcg": 0xCBAC1FED}
MUL1_MULT = 0x83DCD12D
MCG_MULT = 0xCBAC1FED
INST3_MULT, INST3_ADD = 89226354, 64248484
# mul1's affine map from the byte sum to the value: fma(fp16(1024 + b), C1, C2), §3.1.
MUL1_C1_BITS, MUL1_C2_BITS = 0x1EEE, 0xC931
HALF_BITS = (1.5, 2.5, 3.5)  # half-integer K some newer writers use (mul1 only)


def as_int32(value: int) -> int:
    """An unsigned 32-bit constant as the signed int32 a checkpoint stores."""
    return value - (1 << 32) if value >= 1 << 31 else value


def _fp16(bits: int) -> np.float16:
    return np.array([bits], dtype=np.uint16).view(np.float16)[0]


@functools.lru_cache(maxsize=None)
def _codebook_lut_np(codebook: str) -> np.ndarray:
    s = np.arange(1 << 16, dtype=np.uint64)
    if codebook == "mul1":
        x = (s * MUL1_MULT) & 0xFFFFFFFF
        b = (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + (x >> 24)
        h = (1024 + b).astype(np.float64)  # exactly representable in fp16
        # h * C1 + C2 is exact in float64 (≤ 33 significant bits), so one rounding to fp16
        # below is the single rounding of the fp16 fma.
        exact = h * float(_fp16(MUL1_C1_BITS)) + float(_fp16(MUL1_C2_BITS))
        return exact.astype(np.float16)
    if codebook in ("mcg", "3inst"):
        x = (s * MCG_MULT) if codebook == "mcg" else (s * INST3_MULT + INST3_ADD)
        u = ((x & 0xFFFFFFFF) & 0x8FFF8FFF) ^ 0x3B603B60
        lo = (u & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float64)
        hi = (u >> 16).astype(np.uint16).view(np.float16).astype(np.float64)
        return (lo + hi).astype(np.float16)  # the fp16 add, rounded once from the exact sum
    raise ValueError(f"unknown EXL3 codebook {codebook!r}; expected one of {CODEBOOKS}")


def codebook_lut(codebook: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Value of every 16-bit state: fp16 [65536]. Shared per device: read it, never write it."""
    return _lut_on(codebook, torch.device(device))


# The tables are cached per device: copying one from host memory on every call stalled the converter's
# GPU loop ~15 times per LDLQ step (a pageable copy waits for the stream).
@functools.lru_cache(maxsize=None)
def _lut_on(codebook: str, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(_codebook_lut_np(codebook).copy()).to(device)


@functools.lru_cache(maxsize=None)
def _tile_order_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    row, col = _tile_order()
    return torch.from_numpy(row).to(device), torch.from_numpy(col).to(device)


@functools.lru_cache(maxsize=None)
def _tile_order() -> tuple[np.ndarray, np.ndarray]:
    p = np.arange(256)
    t, j = p // 8, p % 8
    row = 2 * (t % 4) + (j & 1) + 8 * ((j >> 1) & 1)
    col = t // 4 + 8 * ((j >> 2) & 1)
    return row, col


def tile_order(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) inside the 16×16 tile of each sequence position p = 0..255 (§3); shared, read-only."""
    return _tile_order_on(torch.device(device))


def bits_per_weight(trellis_last_dim: int) -> float:
    """K from the trellis tensor's last dimension (16·K int16 per tile)."""
    return trellis_last_dim / 16


def _stream_ends(bits: float) -> np.ndarray:
    """End bit (exclusive) of each weight's state in the tile stream: the cumulative bit count."""
    if float(bits).is_integer():
        return (np.arange(256) + 1) * int(bits)
    # Half-integer K: weight p takes floor(K) bits, plus one more when p is odd (§3.2).
    per = np.full(256, int(bits)) + (np.arange(256) % 2)
    return np.cumsum(per)


def trellis_words(trellis: torch.Tensor) -> torch.Tensor:
    """int16 [..., 16K] -> the tile streams as 32-bit words in int64 [..., 8K] (§3: u[2m] | u[2m+1] << 16)."""
    u = trellis.to(torch.int64) & 0xFFFF
    return u[..., 0::2] | (u[..., 1::2] << 16)


def unpack_states(trellis: torch.Tensor, bits: float | None = None) -> torch.Tensor:
    """The 16-bit state of every weight: int64 [..., 256] in sequence order p."""
    bits = bits if bits is not None else bits_per_weight(trellis.shape[-1])
    words = trellis_words(trellis)  # [..., W]
    nbits = 32 * words.shape[-1]
    start = torch.from_numpy((_stream_ends(bits) - 16) % nbits).to(trellis.device)  # [256]
    w0 = start // 32
    w1 = (w0 + 1) % words.shape[-1]
    off = start % 32
    # 48 bits: all of word w0 then the top half of the next word; the state starts at bit off.
    v = (words[..., w0] << 16) | (words[..., w1] >> 16)
    return (v >> (32 - off)) & 0xFFFF


def pack_states(states: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of unpack_states for integer K: states int64 [..., 256] (each = its predecessor
    shifted by K plus K new bits) -> trellis int16 [..., 16K]. Only the new bits are stored."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    new = states & ((1 << bits) - 1)  # [..., 256] the K newest bits of each state
    # Bit b of the stream (MSB-first per 32-bit word) is bit K-1-(b mod K) of new[b // K].
    b = torch.arange(256 * bits, device=states.device)
    stream = (new[..., b // bits] >> (bits - 1 - (b % bits))) & 1  # [..., 256K]
    weights = 1 << (31 - torch.arange(32, device=states.device))
    words = (stream.view(*stream.shape[:-1], 8 * bits, 32) * weights).sum(-1)  # [..., 8K]
    lo, hi = words & 0xFFFF, words >> 16
    u = torch.stack((lo, hi), dim=-1).flatten(-2)  # u[2m] = low half, u[2m+1] = high half
    return torch.where(u >= 1 << 15, u - (1 << 16), u).to(torch.int16)


def decode_trellis(trellis: torch.Tensor, codebook: str, bits: float | None = None) -> torch.Tensor:
    """Q: fp16 [k, n] from trellis int16 [k/16, n/16, 16K] (no Hadamard, no scales)."""
    kt, nt = trellis.shape[0], trellis.shape[1]
    states = unpack_states(trellis, bits)  # [kt, nt, 256]
    values = codebook_lut(codebook, trellis.device)[states]  # [kt, nt, 256]
    row, col = tile_order(trellis.device)
    tiles = torch.empty(kt, nt, 16, 16, dtype=torch.float16, device=trellis.device)
    tiles[:, :, row, col] = values
    return tiles.permute(0, 2, 1, 3).reshape(kt * 16, nt * 16)


@functools.lru_cache(maxsize=None)
def _hadamard_np(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)


def hadamard_matrix(n: int = 128, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    """Sylvester Hadamard matrix in natural order, scaled by 1/sqrt(n) (orthonormal, symmetric)."""
    if n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    return torch.from_numpy(_hadamard_np(n)).to(device=device, dtype=dtype)


def had128(x: torch.Tensor) -> torch.Tensor:
    """Blockwise 128-point Hadamard transform along the last dim (a multiple of 128), in x's dtype."""
    h = hadamard_matrix(128, x.dtype, x.device)
    return (x.reshape(*x.shape[:-1], -1, 128) @ h).reshape(x.shape)


def signs_from_bits(words: torch.Tensor, length: int) -> torch.Tensor:
    """Legacy su/sv: int16 bit fields, 16 signs per word, set bit = -1 (§2). -> fp16 [length] of ±1."""
    u = words.to(torch.int64).flatten() & 0xFFFF
    bits = (u[:, None] >> torch.arange(16, device=words.device)) & 1  # [words, 16], bit i = element 16w + i
    signs = 1.0 - 2.0 * bits.flatten()[:length].to(torch.float32)
    return signs.to(torch.float16)


def exl3_weight(trellis: torch.Tensor, suh: torch.Tensor, svh: torch.Tensor, codebook: str,
                bits: float | None = None) -> torch.Tensor:
    """W = diag(suh)·H·Q·H·diag(svh) in fp32, [k, n] (k, n as stored: padded to multiples of 128)."""
    q = decode_trellis(trellis, codebook, bits).float()
    w = had128(had128(q.T).T)  # H·Q·H: rows then columns, both blockwise
    return suh.float()[:, None] * w * svh.float()[None, :]


def exl3_linear_ref(x: torch.Tensor, trellis: torch.Tensor, suh: torch.Tensor, svh: torch.Tensor,
                    codebook: str, bias: torch.Tensor | None = None, bits: float | None = None) -> torch.Tensor:
    """y = had128(had128(x ⊙ suh)·Q) ⊙ svh + bias, computed in fp32; x [..., k] -> [..., n]."""
    q = decode_trellis(trellis, codebook, bits).float()
    xs = had128(x.float() * suh.float())
    y = had128(xs @ q) * svh.float()
    if bias is not None:
        y = y + bias.float()
    return y
