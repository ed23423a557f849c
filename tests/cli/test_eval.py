"""`trellm eval ppl|kld` against an independent computation with transformers."""

from __future__ import annotations

import json
import math
import shutil

import torch
from safetensors.torch import load_file, save_file

from trellm.cli.main import main
from trellm.io.tokenizer import Tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Pack my box with five dozen liquor jugs. " * 3) * 4
WINDOW = 24


def _hf_logprobs(folder, windows):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return [torch.log_softmax(model(w[None]).logits[0].float(), -1) for w in windows]


def test_eval_kld_matches_transformers_in_float32(capsys, tiny_chat_model, tmp_path):
    """A perturbed copy stored in bf16 against the original: perplexities, KL-divergence and top-1 agreement
    equal a float32 transformers computation on the same windows (kld computes in float32 by default,
    whatever the stored dtype); the original against itself gives KL 0 and full agreement."""
    other = tmp_path / "other"
    shutil.copytree(tiny_chat_model, other)
    (weights,) = other.glob("*.safetensors")
    tensors = load_file(str(weights))
    g = torch.Generator().manual_seed(0)
    tensors = {k: (v.float() + 0.02 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) if v.dim() == 2 else v
               for k, v in tensors.items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    ids = Tokenizer.from_folder(tiny_chat_model).encode(TEXT, add_special_tokens=False)
    windows = [torch.tensor(ids[i : i + WINDOW]) for i in range(0, len(ids) - WINDOW + 1, WINDOW)]

    assert main(["eval", "kld", "-m", str(other), "--reference", str(tiny_chat_model), "--text", str(text),
                 "--window", str(WINDOW), "--device", "cpu", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    q, ref = _hf_logprobs(other, windows), _hf_logprobs(tiny_chat_model, windows)
    nll = sum(float(-lq[:-1].gather(1, w[1:, None]).sum()) for lq, w in zip(q, windows))
    ref_nll = sum(float(-lr[:-1].gather(1, w[1:, None]).sum()) for lr, w in zip(ref, windows))
    count = sum(len(w) - 1 for w in windows)
    kl = sum(float((lr.exp() * (lr - lq)).sum()) for lq, lr in zip(q, ref)) / (len(windows) * WINDOW)
    agree = sum(int((lq.argmax(-1) == lr.argmax(-1)).sum()) for lq, lr in zip(q, ref)) / (len(windows) * WINDOW)
    assert got["windows"] == len(windows)
    assert math.isclose(got["perplexity"], math.exp(nll / count), rel_tol=1e-4)
    assert math.isclose(got["reference_perplexity"], math.exp(ref_nll / count), rel_tol=1e-4)
    assert kl > 1e-4 and math.isclose(got["kl_divergence"], kl, rel_tol=1e-3)
    assert got["top1_agreement"] == agree < 1

    assert main(["eval", "kld", "-m", str(tiny_chat_model), "--reference", str(tiny_chat_model), "--text", str(text),
                 "--window", str(WINDOW), "--device", "cpu", "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert abs(same["kl_divergence"]) < 1e-7 and same["top1_agreement"] == 1.0
    assert same["perplexity"] == same["reference_perplexity"]


def test_eval_kld_without_reference_is_a_clear_error(capsys, tiny_chat_model, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    assert main(["eval", "kld", "-m", str(tiny_chat_model), "--text", str(text), "--device", "cpu"]) != 0
    assert "--reference" in capsys.readouterr().err
