"""Qwen3: Qwen2 without the q/k/v biases, with per-head RMSNorm on q and k."""

from trellm.models.architectures.qwen2 import qwen_sliding_layers
from trellm.models.registry import ArchSpec, register

QWEN3 = register(
    ArchSpec(
        name="Qwen3ForCausalLM",
        config_defaults={"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768},
        adapt_config=qwen_sliding_layers,
        qk_norm=True,
    )
)
