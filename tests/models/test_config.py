"""config.json parsing: old and new key forms, nesting, defaults and clear errors."""

from __future__ import annotations

import json

import pytest

from trellm.errors import ConfigError, UnsupportedArchitectureError
from trellm.models.config import FULL, SLIDING, ModelConfig
from trellm.models.loader import load_config
from trellm.models.registry import supported_architectures

BASE = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
}


def test_old_and_new_rope_forms_agree():
    old = ModelConfig.from_hf({**BASE, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
                               "rope_scaling": {"type": "linear", "factor": 2.0}})
    new = ModelConfig.from_hf({**BASE, "dtype": "bfloat16",
                               "rope_parameters": {"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0}})
    assert old.rope == new.rope
    assert old.rope[FULL].theta == 500000.0 and old.rope[FULL].rope_type == "linear"
    assert old.torch_dtype == new.torch_dtype == "bfloat16"


def test_text_config_nesting_and_top_level_keys():
    raw = {"architectures": ["Gemma3ForCausalLM"], "dtype": "bfloat16",
           "text_config": {k: v for k, v in BASE.items() if k != "architectures"} | {"sliding_window": 16}}
    cfg = ModelConfig.from_hf(raw)
    assert cfg.hidden_size == 64 and cfg.torch_dtype == "bfloat16"
    # Gemma 3 defaults: every 6th layer global, the rest sliding, two RoPE bases.
    raw["text_config"]["num_hidden_layers"] = 12
    cfg = ModelConfig.from_hf(raw)
    assert cfg.layer_types == ([SLIDING] * 5 + [FULL]) * 2
    assert cfg.rope[SLIDING].theta == 10000.0 and cfg.rope[FULL].theta == 1_000_000.0
    assert cfg.window(0) == 16 and cfg.window(5) is None


def test_gemma3_nested_rope_parameters():
    raw = {**BASE, "architectures": ["Gemma3ForCausalLM"], "layer_types": [SLIDING, FULL], "sliding_window": 8,
           "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    cfg = ModelConfig.from_hf(raw)
    assert cfg.rope[FULL].factor == 8.0 and cfg.rope[SLIDING].theta == 1e4


def test_eos_from_generation_config_may_be_a_list():
    cfg = ModelConfig.from_hf({**BASE, "eos_token_id": 2}, {"eos_token_id": [2, 7], "bos_token_id": 1})
    assert cfg.eos_token_ids == [2, 7] and cfg.bos_token_id == 1
    assert ModelConfig.from_hf({**BASE, "eos_token_id": [3, 4]}).eos_token_ids == [3, 4]


def test_qwen_sliding_window_only_when_enabled():
    raw = {**BASE, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 32, "use_sliding_window": False}
    cfg = ModelConfig.from_hf(raw)
    assert cfg.sliding_window is None and cfg.layer_types == [FULL, FULL] and cfg.qkv_bias and not cfg.o_bias
    cfg = ModelConfig.from_hf({**raw, "use_sliding_window": True, "max_window_layers": 1})
    assert cfg.layer_types == [FULL, SLIDING] and cfg.sliding_window == 32


def test_mistral_window_default_and_explicit_null():
    raw = {**BASE, "architectures": ["MistralForCausalLM"]}
    assert ModelConfig.from_hf(raw).sliding_window == 4096
    assert ModelConfig.from_hf({**raw, "sliding_window": None}).sliding_window is None


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError) as e:
        ModelConfig.from_hf({**BASE, "architectures": ["FancyNetForCausalLM"]})
    msg = str(e.value)
    assert "FancyNetForCausalLM" in msg
    for name in supported_architectures():
        assert name in msg
    assert len(supported_architectures()) >= 6


@pytest.mark.parametrize(
    "change, words",
    [
        ({"hidden_size": None}, "hidden_size"),
        ({"num_key_value_heads": 3}, "multiple"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"rope_scaling": {"rope_type": "warp"}}, "not supported"),
        ({"vocab_size": "many"}, "vocab_size"),
        ({"architectures": []}, "architectures"),
        ({"hidden_act": "swoosh"}, None),  # parsed fine; refused when the model is built
    ],
)
def test_bad_configs_raise_config_errors(change, words):
    raw = {**BASE, **change}
    if words is None:
        ModelConfig.from_hf(raw)
        return
    with pytest.raises(ConfigError, match=words):
        ModelConfig.from_hf(raw)


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="not a folder"):
        load_config(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": "x"}')
    with pytest.raises(ConfigError, match="token id"):
        load_config(tmp_path)
