"""RoPE inverse frequencies of every variant equal transformers' for the same parameters."""

from __future__ import annotations

import pytest
import torch

from trellm.layers.rope import RotaryEmbedding, apply_rope, inv_freq_and_scale
from trellm.models.config import FULL, ModelConfig

VARIANTS = [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
     "original_max_position_embeddings": 1024},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048, "truncate": False,
     "attention_factor": 1.3},
    {"rope_type": "longrope", "original_max_position_embeddings": 4096,
     "short_factor": [1.0 + 0.05 * i for i in range(64)], "long_factor": [1.5 + 0.3 * i for i in range(64)]},
]


@pytest.mark.parametrize("params", VARIANTS, ids=lambda p: p["rope_type"])
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_inv_freq_matches_transformers(params, partial):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if params["rope_type"] == "longrope" and partial != 1.0:
        pytest.skip("the longrope factor list is sized for the full rotary dimension")
    hf = LlamaConfig(hidden_size=1024, num_attention_heads=8, max_position_embeddings=131072,
                     rope_parameters={**params, "rope_theta": 500000.0, "partial_rotary_factor": partial})
    ours = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 1024,
                                "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 8,
                                "max_position_embeddings": 131072,
                                "rope_parameters": {**params, "rope_theta": 500000.0,
                                                    "partial_rotary_factor": partial}})
    for long in (False, True):
        if params["rope_type"] == "default":
            # Phi-3's default RoPE honours partial_rotary_factor (Llama's ignores it).
            from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

            ref_inv, ref_scale = Phi3RotaryEmbedding.compute_default_rope_parameters(hf)
        else:
            seq = 10**6 if long else None
            ref_inv, ref_scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf, "cpu", seq_len=seq)
        inv, scale = inv_freq_and_scale(ours.rope[FULL], 128, long=long)
        torch.testing.assert_close(inv, ref_inv.float(), rtol=1e-6, atol=0)
        assert scale == pytest.approx(ref_scale, rel=1e-6)


def test_rotation_preserves_norm_and_relative_positions():
    cfg = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 64,
                               "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2})
    rot = RotaryEmbedding(cfg.rope[FULL], 32)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 32, generator=g), torch.randn(1, 1, 1, 32, generator=g)

    def dot(pq: int, pk: int) -> float:
        cq, sq = rot.cos_sin(torch.tensor([[pq]]), 9000, torch.float32)
        ck, sk = rot.cos_sin(torch.tensor([[pk]]), 9000, torch.float32)
        return float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())

    cq, sq = rot.cos_sin(torch.tensor([[123]]), 9000, torch.float32)
    assert apply_rope(q, cq, sq).norm() == pytest.approx(q.norm().item(), rel=1e-5)
    # q·k depends only on the distance between positions; the table grows past its first 4096 rows.
    assert dot(10, 3) == pytest.approx(dot(8007, 8000), rel=1e-3, abs=1e-4)
