"""Perplexity and KL-divergence of a model on fixed token windows (the converter's quality report).

The text is tokenized whole without special tokens and cut into non-overlapping windows; every
window is one forward pass. Perplexity = exp(mean next-token NLL). KL-divergence compares the
model's next-token distributions with a reference model's on the same windows, KL(ref || model),
averaged over tokens; top-1 agreement is how often both models' most likely token agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trellm.cache.contiguous import ContiguousKVCache
from trellm.errors import GenerationError


@dataclass
class EvalResult:
    windows: int
    tokens: int
    perplexity: float
    reference_perplexity: float | None = None
    kl_divergence: float | None = None
    top1_agreement: float | None = None


def windows_of(ids: list[int], window: int, count: int | None) -> torch.Tensor:
    n = len(ids) // window
    if n == 0:
        raise GenerationError(f"the text has {len(ids)} tokens, fewer than one window of {window}; "
                              "use a longer text or a smaller --window")
    n = min(n, count) if count else n
    return torch.tensor(ids[: n * window]).view(n, window)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Full-window log-probabilities [T, vocab] in float32."""
    t = ids.shape[0]
    cache = ContiguousKVCache(model.config, batch_size=1, max_len=t, device=model.device, dtype=model.dtype)
    x = ids.to(model.device)[None]
    logits = model(x, torch.arange(t, device=model.device)[None], cache.step(t), max_seq_len=t)[0]
    return torch.log_softmax(logits.float(), dim=-1)


def evaluate(model, windows: torch.Tensor, reference=None) -> EvalResult:
    nll, count, kl, agree, ref_nll = 0.0, 0, 0.0, 0, 0.0
    for row in windows:
        if row.shape[0] > model.config.max_position_embeddings:
            raise GenerationError(f"window of {row.shape[0]} tokens exceeds the model's context "
                                  f"({model.config.max_position_embeddings}); use a smaller --window")
        logp = _logits(model, row)
        target = row[1:].to(logp.device)
        nll += float(-logp[:-1].gather(1, target[:, None]).sum())
        count += target.numel()
        if reference is not None:
            ref = _logits(reference, row).to(logp.device)
            ref_nll += float(-ref[:-1].gather(1, target[:, None]).sum())
            kl += float((ref.exp() * (ref - logp)).sum())
            agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
    tokens = windows.numel()
    result = EvalResult(windows=windows.shape[0], tokens=tokens, perplexity=math.exp(nll / count))
    if reference is not None:
        result.reference_perplexity = math.exp(ref_nll / count)
        result.kl_divergence = kl / tokens
        result.top1_agreement = agree / tokens
    return result
