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
