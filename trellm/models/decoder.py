"""The one generic decoder every architecture runs through.

    h = embed(ids) [* sqrt(hidden)]
    per layer:  h += [post_attn_norm]( attn( attn_norm(h) ) )
                h += [post_mlp_norm]( mlp( mlp_norm(h) ) )
    logits = [softcap]( lm_head( norm(h) ) )

In the model's forward every residual add runs inside the kernel of the norm that follows it
(RMSNorm.norm_for), and on CUDA the EXL3 input transform of the linears after a norm or act·mul runs
inside that kernel too (layers/linear.py LinearGroup).
What differs between architectures is declared in their ArchSpec (models/registry.py);
nothing here branches on an architecture's name or on the quantization format.
"""

from __future__ import annotations

import torch
from torch import nn

from trellm.io.weights import FusedPart, WeightSource
from trellm.layers.attention import Attention, AttentionBackend, AttentionParams
from trellm.layers.linear import Linear, LinearGroup
from trellm.layers.mlp import GatedMLP
from trellm.layers.norms import RMSNorm
from trellm.layers.rope import RotaryEmbedding
from trellm.models.config import ModelConfig
from trellm.models.registry import ArchSpec
from trellm.quant.base import MethodFor


def fused_parts(cfg: ModelConfig, spec: ArchSpec) -> dict[str, FusedPart]:
    """Rows of each of our linears inside the checkpoint's fused tensors (ArchSpec.fused)."""
    sizes = {
        "self_attn.q_proj": cfg.num_heads * cfg.head_dim,
        "self_attn.k_proj": cfg.num_kv_heads * cfg.head_dim,
        "self_attn.v_proj": cfg.num_kv_heads * cfg.head_dim,
        "mlp.gate_proj": cfg.intermediate_size,
        "mlp.up_proj": cfg.intermediate_size,
    }
    parts: dict[str, FusedPart] = {}
    for fused, names in spec.fused.items():
        start = 0
        for name in names:
            parts[name] = FusedPart(fused, start, start + sizes[name])
            start += sizes[name]
    return parts


def _rotation(group: LinearGroup | None, x: torch.Tensor) -> torch.Tensor | None:
    """The input transform a group's producer applies for it on x's rows (None before fuse_projections,
    without one, or where the group would not use it)."""
    return group.rotation_for(x.numel() // x.shape[-1], x.dtype) if group is not None else None


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: ArchSpec, idx: int, method_for: MethodFor):
        super().__init__()
        p = f"model.layers.{idx}"
        self.prefix = p

        def norm(dim: int = cfg.hidden_size) -> RMSNorm:
            return RMSNorm(dim, cfg.rms_norm_eps, offset=spec.norm_offset, weight_in_fp32=spec.norm_weight_in_fp32)

        self.norm_names = {"attn_norm": spec.attn_norm, "mlp_norm": spec.mlp_norm}
        self.attn_norm, self.mlp_norm = norm(), norm()
        self.attn_post_norm = self.mlp_post_norm = None
        if spec.sandwich_norms:
            self.attn_post_norm, self.mlp_post_norm = norm(), norm()
            self.norm_names |= {"attn_post_norm": spec.attn_post_norm, "mlp_post_norm": spec.mlp_post_norm}
        params = AttentionParams(scale=cfg.scale, window=cfg.window(idx), softcap=cfg.attn_logit_softcapping)
        self.layer_type = cfg.layer_types[idx]
        self.self_attn = Attention(
            layer_idx=idx, hidden=cfg.hidden_size, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, qkv_bias=cfg.qkv_bias, o_bias=cfg.o_bias, params=params,
            qk_norm=norm(cfg.head_dim) if spec.qk_norm else None,
            methods=method_for, prefix=f"{p}.self_attn",
        )
        self.mlp = GatedMLP(
            cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act, bias=cfg.mlp_bias,
            methods=method_for, prefix=f"{p}.mlp",
        )

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        h, m = self.forward_deferred(h, None, cos, sin, backend)
        return h + m

    def forward_deferred(self, h: torch.Tensor, pending: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                         backend: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer on the residual h + pending, returning (residual, mlp output) without their sum: the
        next layer's (or the final) norm adds it in its own kernel, saving one launch per layer."""
        # Where the projections transform their input first (EXL3 on CUDA), the norm kernels do it.
        h, x, rot = self.attn_norm.norm_for(h, pending, _rotation(self.self_attn.qkv, h))
        a = self.self_attn(x, cos, sin, backend, rot)
        if self.attn_post_norm is not None:
            a = self.attn_post_norm(a)
        h, x, rot = self.mlp_norm.norm_for(h, a, _rotation(self.mlp.gate_up, h))  # h + a and its norm
        m = self.mlp(x, rot)
        if self.mlp_post_norm is not None:
            m = self.mlp_post_norm(m)
        return h, m

    def named_norms(self) -> dict[str, RMSNorm]:
        """Checkpoint tensor name (without '.weight') -> norm module."""
        out = {f"{self.prefix}.{ckpt}": getattr(self, attr) for attr, ckpt in self.norm_names.items()}
        if self.self_attn.q_norm is not None:
            out[f"{self.prefix}.self_attn.q_norm"] = self.self_attn.q_norm
            out[f"{self.prefix}.self_attn.k_norm"] = self.self_attn.k_norm
        return out


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: ArchSpec, method_for: MethodFor):
        super().__init__()
        self.config, self.spec = cfg, spec
        self.register_buffer("embed_weight", None, persistent=False)  # [vocab_size, hidden]
        self.layers = nn.ModuleList(DecoderLayer(cfg, spec, i, method_for) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=spec.norm_offset,
                            weight_in_fp32=spec.norm_weight_in_fp32)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, methods=method_for, name="lm_head")
        self.head: LinearGroup | None = None  # lm_head as a group of one (fuse_projections)
        self.rotary = nn.ModuleDict({t: RotaryEmbedding(cfg.rope[t], cfg.head_dim) for t in sorted(set(cfg.layer_types))})
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    # ---- loading --------------------------------------------------------------------------------------

    @torch.no_grad()
    def load(self, source: WeightSource, *, device: torch.device, dtype: torch.dtype) -> None:
        cfg = self.config
        self.device, self.dtype = torch.device(device), dtype
        self.embed_weight = source.get(
            "model.embed_tokens.weight", shape=(cfg.vocab_size, cfg.hidden_size), dtype=dtype, device=device
        )
        # Gemma multiplies embeddings by sqrt(hidden) rounded to the model dtype.
        self.embed_scale = torch.tensor(cfg.hidden_size**0.5, dtype=dtype, device=device)
        norms: dict[str, RMSNorm] = {"model.norm": self.norm}
        for layer in self.layers:
            norms |= layer.named_norms()
            for m in layer.modules():
                if isinstance(m, Linear):
                    m.load(source, device=device, dtype=dtype)
        for name, norm in norms.items():
            norm.weight = nn.Parameter(
                source.get(f"{name}.weight", shape=(norm.dim,), dtype=dtype, device=device), requires_grad=False
            )
        stored = "lm_head.weight" in source or "lm_head.trellis" in source
        if cfg.tie_word_embeddings and not stored:
            self.lm_head.impl.set_weight(self.embed_weight)
        else:
            self.lm_head.load(source, device=device, dtype=dtype)

    def fuse_projections(self) -> None:
        """On CUDA: q/k/v and gate/up, which share an input, each become one matmul (LinearImpl.fuse).
        The Linear modules stay, but forward calls go around them (no hooks, no swapping their impl)."""
        if self.device.type != "cuda":
            return
        for layer in self.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()
        self.head = LinearGroup([self.lm_head])

    # ---- forward --------------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[B, T] -> [B, T, hidden] in the model's dtype, or computed in `dtype` (the converter's float32)."""
        h = nn.functional.embedding(input_ids, self.embed_weight)  # [B, T, hidden]
        if dtype is not None and dtype != h.dtype:
            h = h.to(dtype)
            scale = torch.tensor(self.config.hidden_size**0.5, dtype=dtype, device=h.device)
        else:
            scale = self.embed_scale
        if self.spec.scale_embeddings:
            h = h * scale
        return h

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        *,
        max_seq_len: int,
        last_only: bool = False,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions [B, T]; max_seq_len = largest position + 1 (host int).

        Returns float32 logits [B, T, vocab]: [B, 1, vocab] with last_only, [B, len(select), vocab]
        for the token rows in `select` (a flat batch needs logits only where sequences sample)."""
        h = self.embed(input_ids)
        rope = {t: r.cos_sin(positions, max_seq_len, h.dtype) for t, r in self.rotary.items()}
        pending = None  # the last layer's mlp output, not yet added to h
        for layer in self.layers:
            cos, sin = rope[layer.layer_type]
            h, pending = layer.forward_deferred(h, pending, cos, sin, backend)
        if last_only:
            h, pending = h[:, -1:], pending[:, -1:]
        elif select is not None:
            h, pending = h[:, select], pending[:, select]
        _, x, rot = self.norm.norm_for(h, pending, _rotation(self.head, h))
        logits = self.head(x, rot)[0] if self.head is not None else self.lm_head(x)
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()
