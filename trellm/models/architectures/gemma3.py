"""Gemma 3 (text): sandwich norms with (1 + w) scaling, q/k norms, scaled embeddings, and
interleaved sliding-window / global layers, each kind with its own RoPE base."""

from __future__ import annotations

from typing import Any

from trellm.errors import ConfigError
from trellm.models.config import FULL, LAYER_TYPES, SLIDING, RopeConfig, parse_rope
from trellm.models.registry import ArchSpec, register


def _adapt(cfg: dict[str, Any], kw: dict[str, Any]) -> None:
    if cfg.get("use_bidirectional_attention"):
        raise ConfigError("bidirectional Gemma 3 models (embedding models) are not supported for generation")
    if not cfg.get("layer_types"):
        # Older configs give the pattern as an int: every n-th layer is global.
        n = int(cfg.get("sliding_window_pattern") or 6)
        kw["layer_types"] = [FULL if (i + 1) % n == 0 else SLIDING for i in range(kw["num_layers"])]
    # Gemma 3 replaced attention soft-capping by q/k norms; the reference implementation ignores
    # the key even when a config sets it, and so do we (final-logit soft-capping still applies).
    kw["attn_logit_softcapping"] = None
    kw["attn_scale"] = float(cfg.get("query_pre_attn_scalar") or kw["head_dim"]) ** -0.5
    kw["hidden_act"] = str(cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh")
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and any(k in params for k in LAYER_TYPES):
        kw["rope"] = parse_rope(cfg, kw["layer_types"], kw["max_position_embeddings"])
        return
    # Old form: rope_theta + rope_scaling for global layers, rope_local_base_freq for local ones.
    full_params = params if isinstance(params, dict) else (cfg.get("rope_scaling") or {})
    common = {"max_position_embeddings": kw["max_position_embeddings"]}
    kw["rope"] = {
        FULL: RopeConfig.from_dict(full_params, theta=cfg.get("rope_theta") or 1_000_000.0, **common),
        SLIDING: RopeConfig.from_dict({}, theta=cfg.get("rope_local_base_freq") or 10_000.0, **common),
    }


GEMMA3 = register(
    ArchSpec(
        name="Gemma3ForCausalLM",
        config_defaults={
            "rms_norm_eps": 1e-6, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096,
            "max_position_embeddings": 131072, "tie_word_embeddings": True,
        },
        adapt_config=_adapt,
        norm_offset=1.0,
        norm_weight_in_fp32=True,
        sandwich_norms=True,
        qk_norm=True,
        scale_embeddings=True,
        attn_norm="input_layernorm",
        attn_post_norm="post_attention_layernorm",
        mlp_norm="pre_feedforward_layernorm",
        mlp_post_norm="post_feedforward_layernorm",
    )
)
