"""Phi-3 / Phi-3.5 / Phi-4-mini: Llama-shaped, with q/k/v and gate/up stored fused in the checkpoint."""

from trellm.models.registry import ArchSpec, register

PHI3 = register(
    ArchSpec(
        name="Phi3ForCausalLM",
        config_defaults={"rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096},
        fused={
            "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
        },
    )
)
