"""CUDA runs of the generic decoder (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from trellm.cache.contiguous import ContiguousKVCache
from trellm.engine.generate import GenerationRequest, generate_tokens
from trellm.models.loader import load_model

pytestmark = pytest.mark.gpu


def _logits(model, ids):
    cache = ContiguousKVCache(model.config, batch_size=ids.shape[0], max_len=ids.shape[1], device=model.device,
                              dtype=model.dtype)
    pos = torch.arange(ids.shape[1], device=model.device)[None].expand(ids.shape[0], -1)
    return model(ids.to(model.device), pos, cache.step(ids.shape[1]), max_seq_len=ids.shape[1]).cpu()


@pytest.mark.parametrize("kind", ["llama", "gemma3", "phi3", "qwen3", "mistral"])
def test_cuda_fp32_matches_cpu(kind, tiny_model_dir):
    path, _ = tiny_model_dir(kind)
    cpu = load_model(path, device="cpu", dtype="float32")
    gpu = load_model(path, device="cuda", dtype="float32")
    ids = torch.randint(0, cpu.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    ref = _logits(cpu, ids)
    # TF32 may be on for CUDA matmuls; allow its rounding.
    torch.testing.assert_close(_logits(gpu, ids), ref, atol=3e-3 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_cuda_bf16_close_to_fp32(kind, tiny_model_dir):
    path, _ = tiny_model_dir(kind)
    ref = load_model(path, device="cuda", dtype="float32")
    bf16 = load_model(path, device="cuda", dtype="bfloat16")
    ids = torch.randint(0, ref.config.vocab_size, (1, 33), generator=torch.Generator().manual_seed(1))
    a, b = _logits(ref, ids), _logits(bf16, ids)
    assert (a - b).norm() / a.norm() < 3e-2


@pytest.mark.real_models
def test_real_model_greedy_on_cuda_bf16_matches_transformers(real_model_path):
    transformers = pytest.importorskip("transformers")
    path = real_model_path("SmolLM2-135M-Instruct")
    ours = load_model(path, device="cuda", dtype="bfloat16")
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    prompt = [1, 504, 3458, 282, 4649, 314]
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=16, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    got = list(generate_tokens(ours, GenerationRequest(prompt, max_new_tokens=16)))
    # bf16 kernels may differ between libraries; the first tokens must agree.
    assert got[:8] == want[:8]
