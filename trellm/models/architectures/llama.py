"""Llama 2 / 3 / 3.1 / 3.2, SmolLM and the many Llama-shaped finetunes: the generic decoder as is."""

from trellm.models.registry import ArchSpec, register

LLAMA = register(
    ArchSpec(
        name="LlamaForCausalLM",
        config_defaults={"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048},
    )
)
