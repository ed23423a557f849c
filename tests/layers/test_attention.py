"""attention_ref against a per-query loop written from the definition."""

from __future__ import annotations

import math

import pytest
import torch

from trellm.layers.attention import AttentionParams, attention_ref


def _naive(q, k, v, q_start, params):
    b, t, h, d = q.shape
    hkv = k.shape[2]
    out = torch.zeros_like(q)
    for bi in range(b):
        for ti in range(t):
            p = q_start + ti
            for hi in range(h):
                kh = hi // (h // hkv)
                lo = 0 if params.window is None else max(0, p - params.window + 1)
                keys, vals = k[bi, lo : p + 1, kh], v[bi, lo : p + 1, kh]
                s = keys @ q[bi, ti, hi] * params.scale
                if params.softcap:
                    s = params.softcap * torch.tanh(s / params.softcap)
                out[bi, ti, hi] = torch.softmax(s, 0) @ vals
    return out


@pytest.mark.parametrize("window", [None, 1, 5])
@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("q_start, t", [(0, 1), (0, 9), (6, 1), (4, 7)])
def test_attention_matches_definition(window, softcap, q_start, t):
    g = torch.Generator().manual_seed(q_start * 31 + t)
    b, h, hkv, d = 2, 6, 2, 24
    s = q_start + t
    q = torch.randn(b, t, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, s, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, s, hkv, d, generator=g, dtype=torch.float64)
    params = AttentionParams(scale=1 / math.sqrt(d), window=window, softcap=softcap)
    torch.testing.assert_close(attention_ref(q, k, v, q_start, params), _naive(q, k, v, q_start, params))


class _WritesItsOwnKV:
    """A paged step seen through the plain AttentionBackend interface (no kv_destination)."""

    def __init__(self, step):
        self.step = step

    def attend(self, layer_idx, q, k, v, params):
        return self.step.attend(layer_idx, q, k, v, params)


def fused_store_mismatches(path, device: str, dtype: str) -> list:
    """A tiny model's passes over a paged cache (prompt chunks of three sequences on shuffled pages, then
    chunks beside decode tokens): the layers' RoPE kernel storing k/v against PagedStep.attend storing them.
    Returns what differs (logits of every row, then every layer's caches): nothing, bit for bit."""
    from trellm.cache.paged import PagedKVCache, Segment
    from trellm.models.loader import load_model

    model = load_model(path, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    ps = 4 if device == "cpu" else 16  # the CUDA attention kernel needs pages of a multiple of 16 tokens
    caches = [PagedKVCache(model.config, num_pages=15, page_size=ps, device=device, dtype=model.dtype)
              for _ in range(2)]
    order = torch.randperm(15, generator=g).tolist()
    pages = [order[0:5], order[5:10], order[10:15]]  # 20 positions per sequence
    done, bad = [0, 0, 0], []
    for plan in ([(0, 7), (1, 3), (2, 1)], [(0, 1), (1, 6), (2, 1)], [(0, 1), (1, 1), (2, 1)]):
        segs, positions, offset = [], [], 0
        for s, n in plan:
            segs.append(Segment(offset, done[s], n, pages[s]))
            positions += range(done[s], done[s] + n)
            offset += n
            done[s] += n
        ids = torch.randint(0, model.config.vocab_size, (1, offset), generator=g).to(device)
        pos = torch.tensor([positions], device=device)
        fused = model(ids, pos, caches[0].step(segs), max_seq_len=max(positions) + 1)
        plain = model(ids, pos, _WritesItsOwnKV(caches[1].step(segs)), max_seq_len=max(positions) + 1)
        if not torch.equal(fused, plain):
            bad.append(("logits", plan))
    for layer in range(model.config.num_layers):
        if not (torch.equal(caches[0].k[layer], caches[1].k[layer])
                and torch.equal(caches[0].v[layer], caches[1].v[layer])):
            bad.append(("cache", layer))
    return bad


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "qwen3", "llama_partial_rotary"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fused_kv_store_matches_attend_gpu(kind, dtype, tiny_model_dir, tmp_path):
    """GQA (llama), q/k norms (qwen3) and partial rotary: the fused store changes no bit of the output."""
    import json
    import shutil

    path = tiny_model_dir(kind.removesuffix("_partial_rotary"))[0]
    if kind.endswith("_partial_rotary"):
        path = shutil.copytree(path, tmp_path / "model")
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, "partial_rotary_factor": 0.5}))
    assert fused_store_mismatches(path, "cuda", dtype) == []
