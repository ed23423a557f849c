"""Self-attention layer and the backend interface it attends through.

The layer projects q/k/v, applies q/k norms and RoPE, and hands q/k/v to an
`AttentionBackend`, which owns the KV cache: it stores this step's keys and values
and attends over everything cached for each sequence. The simple contiguous cache
(cache/contiguous.py) and the paged, batched cache of the generator implement the
same interface, so the model code does not change between them.

A backend may also offer `kv_destination` (`KVStoringBackend`): the cache rows this
layer's new keys and values belong in. On GPUs the layer's RoPE kernel then writes them
there itself and the backend is told (`kv_stored=True`) to skip its own cache writes,
which in a decode step are launches that cost more than the copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from trellm.layers.linear import Linear, LinearGroup, Rotated
from trellm.layers.norms import RMSNorm
from trellm.layers.rope import apply_rope
from trellm.quant.base import MethodFor


@dataclass(frozen=True, slots=True)
class AttentionParams:
    """Per-layer attention settings a backend needs."""

    scale: float  # softmax scale
    window: int | None  # sliding window in tokens (query included), None = global
    softcap: float | None  # logit soft-capping (Gemma 2), None = off


class KVDestination(NamedTuple):
    """Where one layer's new keys and values go: token t's k/v [Hkv, D] into row slots[t] of k/v."""

    k: torch.Tensor  # [rows, num_kv_heads, head_dim], a view of the layer's key cache
    v: torch.Tensor  # [rows, num_kv_heads, head_dim], a view of the layer's value cache
    slots: torch.Tensor  # [num_tokens] integer row indices


class AttentionBackend(Protocol):
    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: AttentionParams
    ) -> torch.Tensor:
        """q [B, T, H, D], k/v [B, T, Hkv, D] of the tokens of this step -> output [B, T, H, D]."""
        ...


class KVStoringBackend(AttentionBackend, Protocol):
    """A backend whose cache the layer may fill itself (optional: the layer looks for kv_destination)."""

    def kv_destination(self, layer_idx: int) -> KVDestination | None:
        """Where this layer's new keys and values go, or None to have attend store them."""
        ...

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: AttentionParams, *,
        kv_stored: bool = False,
    ) -> torch.Tensor:
        """As AttentionBackend.attend; kv_stored: k and v are already at kv_destination(layer_idx)."""
        ...


def attention_mask(q_start: int, t: int, s: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Bool [T, S]: query q_start + i sees key j when p - window < j <= p; None when every query
    sees every key (one decoding token over a cache inside the window). Host integers only, so
    building it never waits for the device."""
    if q_start + t == s and t == 1 and (window is None or s <= window):
        return None
    q_pos = torch.arange(q_start, q_start + t, device=device)[:, None]  # [T, 1]
    k_pos = torch.arange(s, device=device)[None, :]  # [1, S]
    mask = k_pos <= q_pos  # [T, S]
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


_UNSET = object()


def attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, params: AttentionParams, mask=_UNSET
) -> torch.Tensor:
    """Reference attention with GQA, causal + sliding-window masking and soft-capping.

    q [B, T, H, D] holds the queries at positions q_start .. q_start+T-1; k, v [B, S, Hkv, D]
    hold the keys at positions 0 .. S-1 (S >= q_start + T). Returns [B, T, H, D]. `mask` is
    attention_mask(...) for these positions when the caller already has it (it is the same
    for every layer of one step), else it is built here.
    """
    t, s = q.shape[1], k.shape[1]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, len, D]
    if mask is _UNSET:
        mask = attention_mask(q_start, t, s, params.window, q.device)
    if params.softcap is None and q.device.type != "cpu":
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=params.scale, enable_gqa=True)
        return out.transpose(1, 2)
    # Explicit math: soft-capping needs it, and on CPUs torch's SDPA kernel is far slower than
    # this for GQA and masked calls. Query heads are grouped by the KV head they share, so
    # keys and values are never copied per query head.
    b, h, d, hkv = q.shape[0], q.shape[2], q.shape[3], k.shape[2]
    g = h // hkv
    qg = qh.reshape(b, hkv, g * t, d)  # [B, Hkv, G*T, D]
    scores = qg @ kh.transpose(-1, -2)  # [B, Hkv, G*T, S]
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * params.scale  # softmax in >= fp32
    if params.softcap is not None:
        scores = torch.tanh(scores / params.softcap) * params.softcap
    if mask is not None:
        scores = scores.view(b, hkv, g, t, s).masked_fill(~mask, float("-inf")).view(b, hkv, g * t, s)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return (probs @ vh).view(b, h, t, d).transpose(1, 2)


class Attention(nn.Module):
    def __init__(
        self,
        *,
        layer_idx: int,
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        qkv_bias: bool,
        o_bias: bool,
        params: AttentionParams,
        qk_norm: RMSNorm | None,
        methods: MethodFor,
        prefix: str,
    ):
        super().__init__()
        self.layer_idx, self.params = layer_idx, params
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = Linear(hidden, num_heads * head_dim, bias=qkv_bias, methods=methods, name=f"{prefix}.q_proj")
        self.k_proj = Linear(hidden, num_kv_heads * head_dim, bias=qkv_bias, methods=methods, name=f"{prefix}.k_proj")
        self.v_proj = Linear(hidden, num_kv_heads * head_dim, bias=qkv_bias, methods=methods, name=f"{prefix}.v_proj")
        self.o_proj = Linear(num_heads * head_dim, hidden, bias=o_bias, methods=methods, name=f"{prefix}.o_proj")
        self.q_norm = qk_norm
        self.qkv: LinearGroup | None = None  # q/k/v called together (fuse_projections, after loading)
        self.o: LinearGroup | None = None  # o_proj as a group of one: its input transform (fuse_projections)
        self.k_norm = None if qk_norm is None else RMSNorm(
            head_dim, qk_norm.eps, offset=qk_norm.offset, weight_in_fp32=qk_norm.weight_in_fp32
        )

    def fuse_projections(self) -> None:
        self.qkv = LinearGroup([self.q_proj, self.k_proj, self.v_proj])
        self.o = LinearGroup([self.o_proj])

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: AttentionBackend,
        rotated: Rotated | None = None,
    ) -> torch.Tensor:
        """rotated: q/k/v's input transform of x, done by x's producer (for self.qkv.rotation)."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x, rotated) if self.qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(b, t, self.num_heads, self.head_dim)  # [B, T, H, D]
        k = k.view(b, t, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        v = v.view(b, t, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        dest = None
        if q.is_cuda:
            from trellm.kernels.fused import apply_rope_qk

            where = getattr(backend, "kv_destination", None)
            dest = where(self.layer_idx) if where is not None else None
            q, k = apply_rope_qk(q, k, cos, sin, v=v, store=dest)  # one kernel, the cache writes included
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rotate = self.o.rotation_for(b * t, q.dtype) if self.o is not None else None
        if dest is not None and rotate is not None and hasattr(backend, "attend_rotated"):
            # The backend's kernel may hand over o_proj's input transform too (no had_in launch).
            out, o_rotated = backend.attend_rotated(self.layer_idx, q, k, v, self.params, rotate)
            if o_rotated is not None:
                return self.o(out.reshape(b, t, self.num_heads * self.head_dim), o_rotated)[0]
        elif dest is not None:
            out = backend.attend(self.layer_idx, q, k, v, self.params, kv_stored=True)  # [B, T, H, D]
        else:  # backends without kv_destination need not know the keyword
            out = backend.attend(self.layer_idx, q, k, v, self.params)  # [B, T, H, D]
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))
