"""Mistral: Llama-shaped, with a sliding window on every layer unless the config sets it to null."""

from trellm.models.registry import ArchSpec, register

MISTRAL = register(
    ArchSpec(
        name="MistralForCausalLM",
        # The HF config class defaults to a 4096-token window when the key is absent.
        config_defaults={"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "sliding_window": 4096,
                         "max_position_embeddings": 4096 * 32},
    )
)
