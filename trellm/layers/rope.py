"""Rotary position embeddings (RoPE) and the scaling variants published models use.

Inverse frequencies follow the formulas of each variant's paper / model card:
linear (position interpolation), llama3 (wavelength-banded scaling, Llama 3.1
report), yarn (Peng et al. 2023: ramped blend of interpolation and extrapolation
plus an attention temperature), longrope (Phi-3: per-dimension factors, short or
long set chosen by sequence length).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trellm.models.config import RopeConfig


def inv_freq_and_scale(rope: RopeConfig, head_dim: int, *, long: bool = False) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rotary_dim // 2] (fp32) and the factor applied to cos and sin."""
    dim = int(head_dim * rope.partial_rotary_factor)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # [dim // 2]
    base_freq = 1.0 / (rope.theta**exponents)
    t = rope.rope_type
    if t == "default":
        return base_freq, 1.0
    if t == "linear":
        return base_freq / rope.factor, 1.0
    if t == "llama3":
        omax, factor = rope.original_max_position_embeddings, rope.factor
        lo, hi = rope.low_freq_factor, rope.high_freq_factor
        wavelen = 2 * math.pi / base_freq
        # Long wavelengths (low frequencies) are divided by the factor, short ones kept,
        # the band between blended linearly in omax / wavelen.
        scaled = torch.where(wavelen > omax / lo, base_freq / factor, base_freq)
        smooth = (omax / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= omax / hi) & (wavelen <= omax / lo)
        return torch.where(medium, blended, scaled), 1.0
    if t == "yarn":
        return _yarn(rope, dim, exponents)
    if t == "longrope":
        omax = rope.original_max_position_embeddings
        factor = rope.factor if rope.factor is not None else 1.0
        scale = rope.attention_factor
        if scale is None:
            scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(omax))
        ext = torch.tensor(rope.long_factor if long else rope.short_factor, dtype=torch.float32)
        if ext.numel() != dim // 2:
            from trellm.errors import ConfigError

            raise ConfigError(f"longrope factors have {ext.numel()} entries; the rotary dimension needs {dim // 2}")
        return 1.0 / (ext * rope.theta**exponents), scale
    raise AssertionError(t)  # RopeConfig validated the type


def _yarn(rope: RopeConfig, dim: int, exponents: torch.Tensor) -> tuple[torch.Tensor, float]:
    factor, omax, base = rope.factor, rope.original_max_position_embeddings, rope.theta

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    scale = rope.attention_factor
    if scale is None:
        if rope.mscale and rope.mscale_all_dim:
            scale = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            scale = mscale(factor)
    beta_fast, beta_slow = rope.beta_fast or 32, rope.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength fits `rotations` times into the original context.
        return dim * math.log(omax / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate by the factor
    pos_freqs = base**exponents
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv, float(scale)


class RotaryEmbedding(nn.Module):
    """cos/sin tables indexed by position, grown on demand."""

    def __init__(self, rope: RopeConfig, head_dim: int):
        super().__init__()
        self.rope, self.head_dim = rope, head_dim
        self.rotary_dim = int(head_dim * rope.partial_rotary_factor)
        self._tables: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, long: bool, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._tables.get(long)
        if cached is not None and cached[0].shape[0] >= length and cached[0].device == device:
            return cached
        size = max(length, 2 * cached[0].shape[0] if cached is not None else 4096)
        inv_freq, scale = inv_freq_and_scale(self.rope, self.head_dim, long=long)
        pos = torch.arange(size, dtype=torch.float32)  # [size]
        freqs = pos[:, None] * inv_freq[None, :]  # [size, rotary_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [size, rotary_dim]
        table = ((emb.cos() * scale).to(device), (emb.sin() * scale).to(device))
        self._tables[long] = table
        return table

    def cos_sin(self, positions: torch.Tensor, max_seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape positions.shape + [rotary_dim] in `dtype`.

        `max_seq_len` (largest position + 1, known on the host) picks longrope's factor set the
        way the model was trained: long factors once the sequence outgrows the original context.
        """
        long = self.rope.rope_type == "longrope" and max_seq_len > self.rope.original_max_position_embeddings
        cos, sin = self._table(long, max_seq_len, positions.device)
        return cos[positions].to(dtype), sin[positions].to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim channels of x [..., num_heads, head_dim]; cos/sin are [..., rotary_dim]."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
