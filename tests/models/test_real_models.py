"""The three real models: greedy generation equals transformers' token for token (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from trellm.engine.generate import GenerationRequest, generate_tokens
from trellm.io.tokenizer import Tokenizer
from trellm.models.loader import load_model

pytestmark = pytest.mark.real_models

PROMPTS = {
    "SmolLM2-135M-Instruct": [
        [{"role": "user", "content": "What is the capital of France?"}],
        "The history of the printing press",
    ],
    "gemma-3-270m": ["The quick brown fox", "def fibonacci(n):\n"],
    "Qwen2.5-Coder-0.5B-Instruct": [
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Write a Python hello world."}],
        "import numpy as np\n\ndef softmax(x):",
    ],
}


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_greedy_32_tokens_match_transformers(name, real_model_path):
    transformers = pytest.importorskip("transformers")
    path = real_model_path(name)
    tok = Tokenizer.from_folder(path)
    ours = load_model(path, device="cpu", dtype="float32")
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for prompt in PROMPTS[name]:
        if isinstance(prompt, str):
            ids = tok.encode(prompt)
        else:
            ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        with torch.no_grad():
            want = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(ids):].tolist()
        got = list(generate_tokens(ours, GenerationRequest(ids, max_new_tokens=32)))
        assert got == want, f"{name} {prompt!r}: {tok.decode(got)!r} != {tok.decode(want)!r}"
