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


# ---- RoPE that also stores k and v into a paged cache -------------------------------------------------------
STORE_CASES = [  # (hq, hk, head_dim, rotary_dim, tokens)
    (6, 2, 64, 64, 1), (6, 2, 64, 64, 7), (4, 4, 80, 32, 1), (4, 4, 80, 32, 7), (6, 2, 80, 80, 7), (5, 1, 24, 12, 3),
]


def store_case(g: torch.Generator, hq: int, hk: int, d: int, rd: int, t: int, dt, device: str, pages: int = 5,
               page_size: int = 4):
    """q/k/v as slices of one fused projection [1, t, (hq + 2 hk) d]; cos/sin [1, t, rd]; caches
    [pages, page_size, hk, d] full of old values; t distinct slots scattered over the pages in random order."""
    qkv = torch.randn(1, t, (hq + 2 * hk) * d, generator=g).to(dt).to(device)
    q = qkv[..., : hq * d].view(1, t, hq, d)
    k = qkv[..., hq * d : (hq + hk) * d].view(1, t, hk, d)
    v = qkv[..., (hq + hk) * d :].view(1, t, hk, d)
    ang = torch.randn(1, t, rd // 2, generator=g) * 3
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(dt).to(device)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(dt).to(device)
    kc = torch.randn(pages, page_size, hk, d, generator=g).to(dt).to(device)
    vc = torch.randn(pages, page_size, hk, d, generator=g).to(dt).to(device)
    slots = torch.randperm(pages * page_size, generator=g)[:t].to(device)
    return qkv, q, k, v, cos, sin, kc, vc, slots


def check_rope_store(device: str, dtypes) -> list:
    """apply_rope_qk with a cache destination against RoPE + index_copy_: q, k and both caches (old rows
    included), bit for bit; returns the failures."""
    from trellm.kernels.fused import apply_rope_qk
    from trellm.layers.rope import apply_rope

    g = torch.Generator().manual_seed(1)
    fails = []
    for dt in dtypes:
        for hq, hk, d, rd, t in STORE_CASES:
            what = (str(dt), hq, hk, d, rd, t)
            qkv, q, k, v, cos, sin, kc, vc, slots = store_case(g, hq, hk, d, rd, t, dt, device)
            refs = []
            # The kernel without a destination is the exact reference everywhere. torch's RoPE is one too
            # except on a GPU (FMA contraction, 1-2 ulp: see check_all) and in bf16 under the interpreter,
            # whose fp32 -> bf16 casts truncate instead of rounding to nearest.
            torch_exact = device == "cpu" and dt != torch.bfloat16
            for rotate in ("torch", "kernel") if torch_exact else ("kernel",):
                rq, rk = q.clone(), k.clone()
                if rotate == "torch":
                    rq, rk = apply_rope(rq, cos, sin), apply_rope(rk, cos, sin)
                else:
                    rq, rk = apply_rope_qk(rq, rk, cos, sin)
                rkc, rvc = kc.clone(), vc.clone()
                rkc.view(-1, hk, d).index_copy_(0, slots, rk[0])
                rvc.view(-1, hk, d).index_copy_(0, slots, v[0])
                refs.append((rotate, rq, rk, rkc, rvc))
            before = v.clone()
            fq, fk = apply_rope_qk(q, k, cos, sin, v=v, store=(kc.view(-1, hk, d), vc.view(-1, hk, d), slots))
            if fq.data_ptr() != qkv.data_ptr():
                fails.append(("q not rotated in place", what))
            if not torch.equal(v, before):
                fails.append(("v changed", what))
            for rotate, rq, rk, rkc, rvc in refs:
                for name, got, want in [("q", fq, rq), ("k", fk, rk), ("k cache", kc, rkc), ("v cache", vc, rvc)]:
                    if not torch.equal(got, want):
                        fails.append((name, rotate, what, (got.float() - want.float()).abs().max().item()))
    return fails


def check_paged_step(device: str, dt) -> list:
    """Two steps of a paged batch (prefill chunks, then chunks and decode tokens) through PagedStep.attend:
    the kernel storing k/v (kv_stored=True) against attend's own writes; outputs and caches bit for bit."""
    from types import SimpleNamespace

    from trellm.cache.paged import PagedKVCache, Segment
    from trellm.kernels.fused import apply_rope_qk
    from trellm.layers.attention import AttentionParams

    g = torch.Generator().manual_seed(2)
    fails = []
    for hq, hk, d, rd in [(6, 2, 64, 64), (4, 4, 80, 32)]:
        cfg = SimpleNamespace(num_layers=2, num_kv_heads=hk, head_dim=d)
        ps = 4 if device == "cpu" else 16  # the CUDA attention kernel needs pages of a multiple of 16 tokens
        caches = [PagedKVCache(cfg, num_pages=12, page_size=ps, device=device, dtype=dt) for _ in range(2)]
        order = torch.randperm(12, generator=g).tolist()
        pages = [order[0:4], order[4:8], order[8:12]]  # 16 positions per sequence, pages shuffled
        params = AttentionParams(scale=d**-0.5, window=None, softcap=None)
        done = [0, 0, 0]
        for plan in ([(0, 7), (1, 3), (2, 1)], [(0, 1), (1, 6), (2, 1)]):
            segs, offset = [], 0
            for s, n in plan:
                segs.append(Segment(offset, done[s], n, pages[s]))
                offset += n
                done[s] += n
            for layer in range(2):
                _, q, k, v, cos, sin, *_ = store_case(g, hq, hk, d, rd, offset, dt, device)
                outs = []
                for fused, cache in zip((False, True), caches):
                    step = cache.step(segs)
                    fq, fk = q.clone(), k.clone()
                    if fused:
                        fq, fk = apply_rope_qk(fq, fk, cos, sin, v=v, store=step.kv_destination(layer))
                        outs.append(step.attend(layer, fq, fk, v, params, kv_stored=True))
                    else:
                        fq, fk = apply_rope_qk(fq, fk, cos, sin)
                        outs.append(step.attend(layer, fq, fk, v, params))
                what = (str(dt), hq, hk, d, rd, layer, tuple(plan))
                if not torch.equal(outs[0], outs[1]):
                    fails.append(("attention output", what))
                if not (torch.equal(caches[0].k[layer], caches[1].k[layer])
                        and torch.equal(caches[0].v[layer], caches[1].v[layer])):
                    fails.append(("cache", what))
    return fails


STORE_SCRIPT = textwrap.dedent("""
    import torch
    from tests.kernels.test_fused import check_paged_step, check_rope_store
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    print("FAILS", check_rope_store("cpu", dtypes) + [f for dt in dtypes[:2] for f in check_paged_step("cpu", dt)])
""")


def test_rope_store_interpreted():
    out = run_interpreted(STORE_SCRIPT)
    assert out.strip().endswith("FAILS []"), out[-2000:]


@pytest.mark.gpu
def test_rope_store_gpu():
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    fails = check_rope_store("cuda", dtypes) + [f for dt in dtypes for f in check_paged_step("cuda", dt)]
    assert fails == [], fails


# ---- producers that also apply the next linears' EXL3 input transform ----------------------------------------
def check_rotated(device: str, dtypes, sizes) -> list:
    """rms_norm_rotated / act_mul_rotated against the plain kernel followed by had_in's butterfly form on
    its output (the same operations: bit for bit in the interpreter, within last-bit differences when
    compiled) and had_in_ref (fp32; one fp16 rounding); G = 1 and 3 suh rows, widths that are not
    multiples of 128 (the padding columns transform as zeros), few rows (a program per 128-column block)
    and many (the plain norm, then had_in)."""
    from trellm.kernels import hadamard
    from trellm.kernels.fused import ROTATE_ROWS, act_mul, act_mul_rotated, add_rms_norm, rms_norm, rms_norm_rotated
    from trellm.kernels.hadamard import had_in, had_in_ref

    g = torch.Generator().manual_seed(3)
    fails = []
    exact = device == "cpu"
    saved, hadamard.HAD_IN = hadamard.HAD_IN, "fwht"
    try:
        def near(a, b, rel):
            return torch.equal(a, b) if exact else (a.float() - b.float()).abs().max() <= rel * b.float().abs().max()

        def compare(what, y, rotated, suh):
            xh, xs = rotated
            if xh.shape != (suh.shape[0], y.shape[0], suh.shape[1]) or xs.shape != (*xh.shape[:2], xh.shape[2] // 128):
                fails.append(("shape", what, tuple(xh.shape), tuple(xs.shape)))
                return
            want_h, want_s = had_in(y, suh)
            if not (near(xh, want_h, 1e-3) and near(xs, want_s, 1e-4)):
                fails.append(("not had_in's", what, (xh.float() - want_h.float()).abs().max().item(),
                              (xs - want_s).abs().max().item()))
            for gi in range(suh.shape[0]):
                ref_h, ref_s = had_in_ref(y, suh[gi])
                if (xh[gi].float() - ref_h.float()).abs().max() > 1e-3 * ref_h.float().abs().max():
                    fails.append(("had_in_ref", what, gi))
                if (xs[gi] - ref_s).abs().max() > 1e-3 * ref_s.abs().max() + 1e-3:
                    fails.append(("had_in_ref sums", what, gi))

        for dt in dtypes:
            ulps = 0 if exact else 2 * torch.finfo(dt).eps
            for n in sizes:
                k_pad = (n + 127) // 128 * 128
                for rows, groups, offset, w32 in ((5, 1, 0.0, False), (5, 3, 1.0, True), (ROTATE_ROWS + 3, 3, 0.0, False)):
                    what = (str(dt), n, rows, groups)
                    suh = (torch.randn(groups, k_pad, generator=g) * 0.5).half().to(device)
                    w = (torch.randn(n, generator=g) * 0.3).to(dt).to(device)
                    x = torch.randn(1, rows, n, generator=g).to(dt).to(device)
                    h = torch.randn(1, rows, n, generator=g).to(dt).to(device)
                    s, y, rot = rms_norm_rotated(h, x, w, 1e-6, offset, w32, suh)
                    want_s, want_y = add_rms_norm(h, x, w, 1e-6, offset, w32)
                    if not (torch.equal(s, want_s) and near(y, want_y, ulps)):
                        fails.append(("add_norm changed", what))
                    compare(("add_norm",) + what, y.view(rows, n), rot, suh)
                    s, y, rot = rms_norm_rotated(None, x, w, 1e-6, offset, w32, suh)
                    if s is not x or not near(y, rms_norm(x, w, 1e-6, offset, w32), ulps):
                        fails.append(("norm changed", what))
                    compare(("norm",) + what, y.view(rows, n), rot, suh)
                    gate = (torch.randn(rows, n, generator=g) * 3).to(dt).to(device)
                    up = torch.randn(rows, n, generator=g).to(dt).to(device)
                    y, rot = act_mul_rotated("silu", gate, up, suh)
                    if not torch.equal(y, act_mul("silu", gate, up)):
                        fails.append(("act_mul changed", what))
                    compare(("act_mul",) + what, y, rot, suh)
    finally:
        hadamard.HAD_IN = saved
    return fails


ROTATED_SCRIPT = textwrap.dedent("""
    import torch
    from tests.kernels.test_fused import check_rotated
    print("FAILS", check_rotated("cpu", [torch.float32, torch.float16], [72, 576, 1300]))
""")


def test_rotated_producers_interpreted():
    out = run_interpreted(ROTATED_SCRIPT)
    assert out.strip().endswith("FAILS []"), out[-2000:]


@pytest.mark.gpu
def test_rotated_producers_gpu():
    fails = check_rotated("cuda", [torch.bfloat16, torch.float16, torch.float32], [72, 576, 1300, 4096, 14336])
    assert fails == [], fails
