"""Qwen2 / Qwen2.5: Llama-shaped with biases on q, k and v (not o), optional sliding window on upper layers."""

from __future__ import annotations

from typing import Any

from trellm.models.config import FULL, SLIDING
from trellm.models.registry import ArchSpec, register


def qwen_sliding_layers(cfg: dict[str, Any], kw: dict[str, Any]) -> None:
    """Qwen's window applies only with use_sliding_window, and then from layer max_window_layers up."""
    if not cfg.get("use_sliding_window", False) or not cfg.get("sliding_window"):
        kw["sliding_window"] = None
        kw["layer_types"] = [FULL] * kw["num_layers"]
    elif not cfg.get("layer_types"):
        first = cfg.get("max_window_layers", 28)
        kw["layer_types"] = [SLIDING if i >= first else FULL for i in range(kw["num_layers"])]


def _adapt(cfg: dict[str, Any], kw: dict[str, Any]) -> None:
    kw["qkv_bias"], kw["o_bias"] = True, False
    qwen_sliding_layers(cfg, kw)


QWEN2 = register(
    ArchSpec(
        name="Qwen2ForCausalLM",
        config_defaults={"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768},
        adapt_config=_adapt,
    )
)
