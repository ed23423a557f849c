"""Fused RMSNorm / residual+RMSNorm / RoPE / act·mul kernels against the torch code in layers/.

The kernels round where the torch code rounds, so in fp32 and fp16 they agree to within the order
of the norm's sum (interpreter, CPU) and in bf16 on a GPU to one unit in the last place at most.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from tests.conftest import run_interpreted

pytest.importorskip("triton")


def check_all(device: str, dtypes) -> list:
    """Every fused op against its reference on odd sizes; returns the failures."""
    from trellm.kernels.fused import ACT_CODES, act_mul, add_rms_norm, apply_rope_qk, rms_norm
    from trellm.layers.mlp import activation
    from trellm.layers.norms import RMSNorm
    from trellm.layers.rope import apply_rope

    g = torch.Generator().manual_seed(0)
    fails = []

    def close(a, b, what, ulps):
        tol = ulps * torch.finfo(b.dtype).eps * max(1.0, b.float().abs().max().item())
        err = (a.float() - b.float()).abs().max().item()
        if err > tol:
            fails.append((what, str(b.dtype), err, tol))

    for dt in dtypes:
        for n, offset, w32 in [(72, 0.0, False), (576, 1.0, True), (130, 0.0, True), (4096, 1.0, False)]:
            norm = RMSNorm(n, 1e-6, offset=offset, weight_in_fp32=w32)
            norm.weight = torch.nn.Parameter((torch.randn(n, generator=g) * 0.3).to(dt).to(device), requires_grad=False)
            x = torch.randn(3, 5, n, generator=g).to(dt).to(device)
            h = torch.randn(3, 5, n, generator=g).to(dt).to(device)
            close(rms_norm(x, norm.weight, 1e-6, offset, w32), norm._forward_ref(x), ("norm", n), 2)
            s, y = add_rms_norm(h, x, norm.weight, 1e-6, offset, w32)
            close(s, h + x, ("add", n), 0)
            close(y, norm._forward_ref(h + x), ("add_norm", n), 2)
        for d, rd, hq, hk in [(16, 16, 6, 2), (24, 12, 4, 1), (128, 128, 32, 8), (80, 80, 5, 5)]:
            # q and k as slices of one fused projection output (row stride (hq + 2 hk)·d), like q/k/v.
            qkv = torch.randn(2, 7, (hq + 2 * hk) * d, generator=g).to(dt).to(device)
            q = qkv[..., : hq * d].view(2, 7, hq, d)
            k = qkv[..., hq * d : (hq + hk) * d].view(2, 7, hk, d)
            ang = torch.randn(2, 7, rd // 2, generator=g) * 3
            cos = torch.cat([ang.cos(), ang.cos()], -1).to(dt).to(device)
            sin = torch.cat([ang.sin(), ang.sin()], -1).to(dt).to(device)
            want_q, want_k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            q, k = apply_rope_qk(q, k, cos, sin)
            # Same roundings as torch; the GPU build may still contract x·cos + y·sin into an FMA (1-2 ulp).
            exact = 2 if device == "cuda" else 0
            close(q, want_q, ("rope q", d, rd), exact)
            close(k, want_k, ("rope k", d, rd), exact)
            if rd == d and q.data_ptr() != qkv.data_ptr():
                fails.append(("rope not in place", d))
        for act in ACT_CODES:
            gate = (torch.randn(3, 1000, generator=g) * 3).to(dt).to(device)
            up = torch.randn(3, 1000, generator=g).to(dt).to(device)
            close(act_mul(act, gate, up), activation(act)(gate) * up, ("act", act), 2)
    return fails


SCRIPT = textwrap.dedent("""
    import torch
    from tests.kernels.test_fused import check_all
    print("FAILS", check_all("cpu", [torch.float32, torch.float16]))
""")


def test_fused_kernels_interpreted():
    out = run_interpreted(SCRIPT)
    assert out.strip().endswith("FAILS []"), out[-2000:]


@pytest.mark.gpu
def test_fused_kernels_gpu():
    fails = check_all("cuda", [torch.float32, torch.bfloat16, torch.float16])
    assert fails == [], fails
