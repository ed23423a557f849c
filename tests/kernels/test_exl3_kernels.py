"""EXL3 kernels against their torch references.

On a CPU the Triton kernels run under TRITON_INTERPRET=1 (set for this module's
subprocess-free use by monkeypatching the env before triton imports is not
possible, so these tests run the interpreter in a child process) on small shapes;
on a GPU they run natively on full shapes (marker `gpu`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton")

INTERPRETER_SCRIPT = textwrap.dedent("""
    import torch
    from trellm.kernels.exl3_decode import dequantize, dequantize_ref
    from trellm.kernels.exl3_gemv import exl3_gemv, exl3_gemv_ref
    from trellm.kernels.hadamard import had_in, had_in_ref, had_out, had_out_ref
    from trellm.kernels.exl3_dispatch import exl3_gemm_dequant
    from trellm.quant.exl3 import EXL3Linear
    from trellm.quant.exl3_writer import random_linear
    g = torch.Generator().manual_seed(SEED)
    fails = []
    for bits in range(1, 9):
        for cb in ("mul1", "mcg", "3inst"):
            tr = torch.randint(-32768, 32768, (8, 16, 16 * bits), dtype=torch.int16, generator=g)
            if not torch.equal(dequantize(tr, cb).view(torch.int16), dequantize_ref(tr, cb).view(torch.int16)):
                fails.append(("dequant", bits, cb))
    x = torch.randn(5, 200, generator=g).to(torch.bfloat16)
    suh = torch.randn(256, generator=g).half()
    a, sa = had_in(x, suh); b, sb = had_in_ref(x, suh)
    if (a.float() - b.float()).abs().max() > 4e-3 * b.float().abs().max(): fails.append(("had_in",))
    if (sa - sb).abs().max() > 1e-2 * sb.abs().max(): fails.append(("had_in sums",))
    from trellm.kernels import hadamard
    hadamard.HAD_IN = "fwht"  # the butterfly form, fp32 like the reference: within one fp16 rounding
    for m in (1, 5, 17):
        x = torch.randn(m, 200, generator=g).to(torch.bfloat16)
        suh2 = torch.randn(2, 256, generator=g).half()
        a, sa = had_in(x, suh2)
        for gi in range(2):
            b, sb = had_in_ref(x, suh2[gi])
            if (a[gi].float() - b.float()).abs().max() > 1e-3 * b.float().abs().max(): fails.append(("fwht", m, gi))
            if (sa[gi] - sb).abs().max() > 1e-3 * sb.abs().max(): fails.append(("fwht sums", m, gi))
    hadamard.HAD_IN = "dot"
    y = torch.randn(3, 384, generator=g); svh = torch.randn(384, generator=g).half(); bias = torch.randn(300, generator=g).half()
    if (had_out(y, svh, bias, 300, torch.float32) - had_out_ref(y, svh, bias, 300, torch.float32)).abs().max() > 1e-3:
        fails.append(("had_out",))
    # Odd shapes: in/out not multiples of 128 (padding), every codebook, both GEMV kernels, stream-K runs
    # that start and end inside column blocks (programs not dividing the 4-tile-row chunks).
    cases = [(1, 250, 300, 4, "mul1", 5, True), (1, 384, 130, 3, "mcg", 1, True), (1, 256, 256, 2, "3inst", 3, True),
             (3, 256, 390, 5, "mul1", 7, False), (16, 130, 256, 8, "mul1", 2, False), (7, 256, 128, 6, "3inst", 4, False)]
    for m, k, n, bits, cb, programs, fma in cases:
        lin = EXL3Linear(k, n, True)
        tr, s1, s2 = random_linear(k, n, bits, generator=g)
        lin.set_tensors(tr, suh=s1, svh=s2, codebook=cb, bias=torch.randn(n, generator=g))
        x = torch.randn(m, k, generator=g)
        ref = lin._forward_ref(x)
        xh, xs = had_in(x, lin.suh)
        out = exl3_gemv(xh, xs, lin.trellis, lin.svh, lin.bias, cb, n, torch.float32, programs=programs, ta=4,
                        num_warps=4, fma=fma, direct=False)
        if (out - ref).abs().max() > 5e-3 * ref.abs().max(): fails.append(("gemv", m, k, n, bits, cb, fma))
        for prefetch in ((False, True) if fma else ()):  # the one-row body with per-thread loads
            out = exl3_gemv(xh, xs, lin.trellis, lin.svh, lin.bias, cb, n, torch.float32, programs=programs, ta=4,
                            num_warps=4, fma=fma, direct=True, prefetch=prefetch)
            if (out - ref).abs().max() > 5e-3 * ref.abs().max():
                fails.append(("direct gemv", m, k, n, bits, cb, prefetch))
        out = exl3_gemm_dequant(xh, lin, torch.float32)
        if (out - ref).abs().max() > 5e-3 * ref.abs().max(): fails.append(("gemm", m, k, n, bits, cb))
    # Linears sharing an input as one launch (stacked suh, concatenated trellis columns, per-group input),
    # and a member alone on its column slice of the concatenated trellis (row stride wider than its tiles).
    for m, fma in ((1, True), (3, False)):
        lins = []
        for n in (256, 128, 128):
            lin = EXL3Linear(256, n, True)
            tr, s1, s2 = random_linear(256, n, 3, generator=g)
            lin.set_tensors(tr, suh=s1, svh=s2, codebook="mcg", bias=torch.randn(n, generator=g))
            lins.append(lin)
        x = torch.randn(m, 256, generator=g)
        refs = [lin._forward_ref(x) for lin in lins]
        trellis = torch.cat([lin.trellis for lin in lins], dim=1)
        xh, xs = had_in(x, torch.stack([lin.suh for lin in lins]))
        out = exl3_gemv(xh, xs, trellis, torch.cat([l.svh for l in lins]), torch.cat([l.bias for l in lins]), "mcg",
                        512, torch.float32, programs=3, ta=4, num_warps=4, fma=fma, group_blocks=(2, 3))
        ref = torch.cat(refs, dim=1)
        if (out - ref).abs().max() > 5e-3 * ref.abs().max(): fails.append(("grouped gemv", m))
        view = trellis[:, 16:24]
        xh1, xs1 = had_in(x, lins[1].suh)
        alone = exl3_gemv(xh1, xs1, view, lins[1].svh, lins[1].bias, "mcg", 128, torch.float32, programs=2, ta=4,
                          num_warps=4, fma=fma)
        if (alone - refs[1]).abs().max() > 5e-3 * refs[1].abs().max(): fails.append(("gemv on a view", m))
        if fma:
            out = exl3_gemv(xh, xs, trellis, torch.cat([l.svh for l in lins]), torch.cat([l.bias for l in lins]),
                            "mcg", 512, torch.float32, programs=3, ta=4, num_warps=4, fma=True, group_blocks=(2, 3),
                            prefetch=True)
            if (out - ref).abs().max() > 5e-3 * ref.abs().max(): fails.append(("direct grouped gemv", m))
        lins[1].trellis = view
        if (exl3_gemm_dequant(xh1, lins[1], torch.float32) - refs[1]).abs().max() > 5e-3 * refs[1].abs().max():
            fails.append(("dequant on a view", m))
    # The effective weight (both transforms folded in) and the product on it, padded shapes, both forms.
    from trellm.kernels.exl3_decode import dequantize_effective
    from trellm.kernels.exl3_dispatch import exl3_gemm_effective
    from trellm.quant import exl3_format as fmt
    for k, n, bits, cb in ((250, 300, 4, "mul1"), (128, 256, 8, "3inst")):
        lin = EXL3Linear(k, n, True)
        tr, s1, s2 = random_linear(k, n, bits, generator=g)
        lin.set_tensors(tr, suh=s1, svh=s2, codebook=cb, bias=torch.randn(n, generator=g))
        ref_w = fmt.exl3_weight(lin.trellis, lin.suh, lin.svh, cb).T
        x = torch.randn(3, k, generator=g).to(torch.bfloat16)
        ref = lin._forward_ref(x.float())
        for form in ("dot", "fwht"):
            w = dequantize_effective(lin.trellis, cb, lin.suh, lin.svh, dtype=torch.float16, transform=form)
            # one rounding to fp16 of each weight; the dot form also rounds Q·H (an error on the scale of the
            # block's typical weight, not of each weight)
            bound = 2**-10 * (ref_w.abs() + ref_w.abs().mean())
            if not ((w.float() - ref_w).abs() <= bound).all(): fails.append(("eff", k, n, form))
            y = exl3_gemm_effective(x, lin, transform=form)
            if (y.float() - ref).abs().max() > 1e-2 * ref.abs().max(): fails.append(("eff gemm", k, n, form))
    print("FAILS", fails)
""")


@pytest.mark.slow
def test_kernels_in_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT.replace("SEED", "1234")], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FAILS []" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("codebook", ["mul1", "mcg", "3inst"])
def test_dequantize_bit_exact_on_gpu(bits, codebook):
    from trellm.kernels.exl3_decode import dequantize, dequantize_ref

    g = torch.Generator().manual_seed(bits)
    tr = torch.randint(-32768, 32768, (96, 80, 16 * bits), dtype=torch.int16, generator=g).cuda()
    assert torch.equal(dequantize(tr, codebook).view(torch.int16), dequantize_ref(tr, codebook).view(torch.int16))


@pytest.mark.gpu
@pytest.mark.parametrize("k, n", [(128, 128), (384, 1536), (1536, 640), (4096, 14336), (14336, 4096), (1000, 3000)])
@pytest.mark.parametrize("m", [1, 2, 5, 16, 17, 64, 300])
@pytest.mark.parametrize("bits, codebook", [(2, "mul1"), (3, "mcg"), (4, "mul1"), (5, "3inst"), (8, "mul1")])
def test_layer_kernels_match_reference_on_gpu(k, n, m, bits, codebook):
    from trellm.quant.exl3 import EXL3Linear
    from trellm.quant.exl3_writer import random_linear

    g = torch.Generator().manual_seed(k + n + m + bits)
    lin = EXL3Linear(k, n, True)
    tr, suh, svh = random_linear(k, n, bits, generator=g)
    lin.set_tensors(tr, suh=suh, svh=svh, codebook=codebook, bias=torch.randn(n, generator=g), device="cuda")
    x = torch.randn(m, k, generator=g).cuda().to(torch.bfloat16)
    y = lin(x).float()
    ref = lin._forward_ref(x.float()).float()
    assert torch.isfinite(y).all()
    assert (y - ref).abs().max() <= 6e-3 * ref.abs().max()
    # The layer gives the same answer twice, bit for bit (stream-K counters reset themselves and the
    # partial sums are added in a fixed order).
    torch.testing.assert_close(lin(x).float(), y, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("k, n", [(256, 128), (1536, 640), (4096, 14336), (14336, 4096), (1000, 3000)])
@pytest.mark.parametrize("bits, codebook", [(2, "mul1"), (4, "mul1"), (5, "3inst"), (8, "mcg")])
def test_direct_load_gemv_matches_reference_on_gpu(k, n, bits, codebook):
    """The one-row GEMV with per-thread loads (exl3_gemv(direct=True), with and without prefetch) on full
    shapes, deterministic from call to call."""
    from trellm.kernels.exl3_gemv import exl3_gemv
    from trellm.kernels.hadamard import had_in
    from trellm.quant.exl3 import EXL3Linear
    from trellm.quant.exl3_writer import random_linear

    g = torch.Generator().manual_seed(k + n + bits)
    lin = EXL3Linear(k, n, True)
    tr, suh, svh = random_linear(k, n, bits, generator=g)
    lin.set_tensors(tr, suh=suh, svh=svh, codebook=codebook, bias=torch.randn(n, generator=g), device="cuda")
    x = torch.randn(1, k, generator=g).cuda()
    xh, xs = had_in(x, lin.suh)
    ref = lin._forward_ref(x).float()
    for prefetch in (False, True):
        y = exl3_gemv(xh, xs, lin.trellis, lin.svh, lin.bias, codebook, n, torch.float32, direct=True,
                      prefetch=prefetch)
        assert (y - ref).abs().max() <= 6e-3 * ref.abs().max()
        torch.testing.assert_close(exl3_gemv(xh, xs, lin.trellis, lin.svh, lin.bias, codebook, n, torch.float32,
                                             direct=True, prefetch=prefetch), y, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16, 40])
@pytest.mark.parametrize("bits, bias", [(4, False), (2, True)])
def test_fused_projections_match_each_linear_on_gpu(m, bits, bias):
    """q/k/v-like linears fused (one input transform + one GEMV) give each linear's own output; after
    fusing, the members still run alone on their views of the fused tensors."""
    from trellm.quant.exl3 import EXL3Linear
    from trellm.quant.exl3_writer import random_linear

    g = torch.Generator().manual_seed(m + bits)
    lins = []
    for n in (4096, 1024, 1024):
        lin = EXL3Linear(4096, n, bias)
        tr, suh, svh = random_linear(4096, n, bits, generator=g)
        lin.set_tensors(tr, suh=suh, svh=svh, codebook="mul1", bias=torch.randn(n, generator=g) if bias else None,
                        device="cuda")
        lins.append(lin)
    x = torch.randn(m, 4096, generator=g).cuda().to(torch.bfloat16)
    refs = [lin._forward_ref(x.float()).float() for lin in lins]
    run = EXL3Linear.fuse(lins)
    assert run is not None
    for y, ref, lin in zip(run(x), refs, lins):
        assert (y.float() - ref).abs().max() <= 6e-3 * ref.abs().max()
        assert (lin(x).float() - ref).abs().max() <= 6e-3 * ref.abs().max()


# The tensor-core small-m kernel (kernels/exl3_tc.py) is written in Gluon, which the Triton interpreter does
# not run: on a CPU it is compiled for sm_90 (which also proves that the decoded tiles land in the mma
# operand registers with no data movement: the kernel asserts that conversion is trivial).
@pytest.mark.slow
@pytest.mark.parametrize("bits, codebook, m, opts", [  # opts: tc_constexprs' options beyond the defaults
    (1, "mul1", 1, {}), (2, "mul1", 1, {}), (3, "mcg", 5, {}), (4, "mul1", 1, {}), (4, "mul1", 16, {}),
    (5, "3inst", 1, {}), (5, "mul1", 16, {}), (6, "mul1", 9, {}), (7, "mul1", 1, {}), (8, "mcg", 1, {}),
    (3, "mul1", 1, {"prefetch": False}), (8, "mul1", 16, {"prefetch": True, "x_coalesced": False}), (4, "mul1", 1, {"timeline": True}),
    (4, "mul1", 1, {"prefetch": True, "pingpong": True}), (7, "mcg", 3, {"prefetch": True, "pingpong": True, "x_coalesced": False}),
    (4, "mul1", 32, {}), (6, "mcg", 17, {}), (4, "mul1", 64, {}), (8, "3inst", 40, {}), (4, "mul1", 1, {"pdl": True}),
    (5, "mcg", 16, {"pdl": True}), (6, "mul1", 1, {"pdl": True, "pdl_prefetch": 2}),
    (4, "mul1", 1, {"x_coalesced": True}), (3, "mcg", 16, {"x_coalesced": True}),
    (4, "mul1", 64, {"x_coalesced": True}), (6, "3inst", 33, {"x_coalesced": True, "prefetch": True}),
    (4, "mul1", 1, {"pdl": True, "pdl_early": True}), (3, "mcg", 16, {"pdl": True, "pdl_early": True}),
    (5, "mul1", 4, {"pdl": True, "pdl_early": True, "pingpong": True, "x_coalesced": False})])
def test_tensor_core_gemv_compiles_for_sm90(bits, codebook, m, opts):
    from trellm.kernels.exl3_tc import compile_for_sm90, cubin_usage, tc_constexprs

    kernel = compile_for_sm90(tc_constexprs(256, 896, 16 * bits, codebook, m, has_bias=True, grouped=m == 1, **opts))
    ptx = kernel.asm["ptx"]
    assert ("griddepcontrol.wait" in ptx) == opts.get("pdl", False)  # a dependent launch waits for its input
    if opts.get("pdl_early"):  # ... after issuing some word loads
        assert "ld.global" in ptx[: ptx.index("griddepcontrol.wait")]
    assert ("prefetch.global.L2" in ptx) == (opts.get("pdl_prefetch", 0) > 0)
    assert "mma.sync.aligned.m16n8k16" in ptx
    assert ("dp4a" in ptx) == (codebook == "mul1")
    assert ("%globaltimer" in ptx) == opts.get("timeline", False)  # benchmarks/timeline_tc.py's build
    if opts.get("x_coalesced"):  # x rows through shared memory: more ldmatrix than the same kernel without
        plain = {**opts, "x_coalesced": False}
        plain_ptx = compile_for_sm90(tc_constexprs(256, 896, 16 * bits, codebook, m, has_bias=True, grouped=m == 1,
                                                   **plain)).asm["ptx"]
        assert ptx.count("ldmatrix") > plain_ptx.count("ldmatrix")
    # Occupancy guard: up to 32 rows, at most 168 registers keeps 3 programs of 4 warps per SM (the timed
    # defaults take 96-168; the pingpong forms with x through shared memory take 196-251, so their cases
    # pin the direct x load; more would drop to 2 and expose the loads' latency). 33-64 rows (a 64-column
    # accumulator) take 224-246 registers: 2 programs per SM. Nothing spills to local memory.
    regs, local = cubin_usage(kernel.asm["cubin"])
    assert regs <= (168 if m <= 32 else 255) and local == 0, (regs, local)


@pytest.mark.parametrize("bits", range(1, 9))
def test_tensor_core_lane_decode_replayed_in_torch(bits):
    """exl3_tc's index arithmetic, replayed in torch on one random tile: each lane's stream (first word,
    shift, the word pair and offset _state picks for each constant window offset) gives the format's
    states, and the joins + A_PERM put weight (k, n) of every tile at row n, column k of the mma operand.
    (The GPU test checks the kernel itself.)"""
    import numpy as np

    from trellm.kernels.exl3_tc import A_PERM
    from trellm.quant import exl3_format as fmt

    K, W, TA = bits, 8 * bits, 2
    tr = torch.randint(-32768, 32768, (1, 1, 16 * K), dtype=torch.int16, generator=torch.Generator().manual_seed(K))
    words = [int(w) & 0xFFFFFFFF for w in fmt.trellis_words(tr)[0, 0]]
    states = fmt.unpack_states(tr)[0, 0]
    mask = 0xFFFFFFFF
    for t in range(32):
        first = 8 * K * t + K - 16
        d0 = (first + 32 * W) // 32 - W
        off = first - 32 * d0
        w0, w1, w2 = (words[(d0 + i + W) % W] for i in range(3))
        if K % 4 == 0:
            assert off == (K + 16) % 32
            o0, s0, s1, s2 = off, w0, w1, (w2 if K == 8 else w1)
        else:
            w2 = w2 if K > 4 else w1
            o0 = 0
            s0 = ((w0 << off) | (w1 >> (32 - off))) & mask
            s1 = ((w1 << off) | (w2 >> (32 - off))) & mask
            s2 = (w2 << off) & mask
        stream = (s0, s1, s2, s2)
        for j in range(8):  # _state: word O // 32 and the next, then _window at O % 32
            o = o0 + j * K
            assert o + 16 <= 96
            hi, lo, sh = stream[o // 32], stream[o // 32 + 1], o % 32
            if sh <= 16:
                window = (hi >> (16 - sh)) & 0xFFFF
            else:
                window = ((((hi << sh) | (lo >> (32 - sh))) & mask) >> 16)
            assert window == states[8 * t + j], (K, t, j)
    row, col = (torch.as_tensor(np.asarray(v)) for v in fmt.tile_order())
    a, r, w, t = (torch.arange(s).view(*[-1 if d == i else 1 for d in range(4)]) for i, s in enumerate((TA, 2, 4, 32)))
    coded = [(16 * a + row[8 * t + j]) * 1000 + 16 * (w + 4 * r) + col[8 * t + j] for j in range(8)]
    join = lambda x, y: torch.stack((x, y), dim=-1)  # noqa: E731 (gl.join: a new last dimension)
    q = [join(coded[i], coded[i + 1]) for i in range(0, 8, 2)]
    v = join(join(q[0], q[1]), join(q[2], q[3])).reshape(TA, 2, 4, 8, 4, 2, 2, 2)
    operand = v.permute(*A_PERM.value).reshape(128, 16 * TA)
    assert torch.equal(operand, torch.arange(16 * TA)[None, :] * 1000 + torch.arange(128)[:, None])


def _tc_case(k, n, bits, codebook, bias, seed):
    from trellm.kernels.exl3_tc import exl3_gemv_tc  # noqa: F401 (fails early without Gluon)
    from trellm.quant.exl3 import EXL3Linear
    from trellm.quant.exl3_writer import random_linear

    g = torch.Generator().manual_seed(seed)
    lin = EXL3Linear(k, n, bias)
    tr, suh, svh = random_linear(k, n, bits, generator=g)
    lin.set_tensors(tr, suh=suh, svh=svh, codebook=codebook, bias=torch.randn(n, generator=g) if bias else None,
                    device="cuda")
    return lin, g


@pytest.mark.gpu
@pytest.mark.parametrize("k, n", [(256, 384), (1000, 3000), (4096, 14336), (14336, 4096)])
@pytest.mark.parametrize("m", [1, 5, 16, 17, 33, 64])
@pytest.mark.parametrize("bits, codebook", [(1, "mul1"), (2, "mul1"), (3, "mcg"), (4, "mul1"), (5, "3inst"),
                                            (6, "mul1"), (7, "mul1"), (8, "mcg")])
def test_tensor_core_gemv_matches_reference_on_gpu(k, n, m, bits, codebook):
    from trellm.kernels.exl3_tc import exl3_gemv_tc
    from trellm.kernels.hadamard import had_in

    lin, g = _tc_case(k, n, bits, codebook, True, k + n + m + bits)
    x = torch.randn(m, k, generator=g).cuda()
    xh, xs = had_in(x, lin.suh)
    ref = lin._forward_ref(x).float()
    y = exl3_gemv_tc(xh, xs, lin.trellis, lin.svh, lin.bias, codebook, n, torch.float32)
    assert torch.isfinite(y).all()
    assert (y - ref).abs().max() <= 6e-3 * ref.abs().max()
    # Deterministic from call to call (fixed-order stream-K reduction), and any program count is correct
    # (runs starting and ending inside column blocks).
    torch.testing.assert_close(exl3_gemv_tc(xh, xs, lin.trellis, lin.svh, lin.bias, codebook, n, torch.float32),
                               y, rtol=0, atol=0)
    for programs in (3, 7):
        y2 = exl3_gemv_tc(xh, xs, lin.trellis, lin.svh, lin.bias, codebook, n, torch.float32, programs=programs)
        assert (y2 - ref).abs().max() <= 6e-3 * ref.abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("opts", [{"prefetch": False}, {"prefetch": True}, {"prefetch": True, "pingpong": True}])
@pytest.mark.parametrize("bits, codebook", [(3, "mcg"), (4, "mul1"), (6, "3inst"), (8, "mul1")])
@pytest.mark.parametrize("m", [1, 9])
def test_tensor_core_gemv_load_variants_on_gpu(opts, bits, codebook, m):
    """Each way of bringing the words to the lanes (at the top of the iteration, one iteration ahead in
    registers, in two alternating register sets) on runs of 1 to many iterations (odd and even counts)."""
    from trellm.kernels.exl3_tc import exl3_gemv_tc
    from trellm.kernels.hadamard import had_in

    lin, g = _tc_case(1664, 3000, bits, codebook, True, bits + m)
    x = torch.randn(m, 1664, generator=g).cuda()
    xh, xs = had_in(x, lin.suh)
    ref = lin._forward_ref(x).float()
    for programs in (None, 5, 100):
        y = exl3_gemv_tc(xh, xs, lin.trellis, lin.svh, lin.bias, codebook, 3000, torch.float32, programs=programs,
                         **opts)
        assert (y - ref).abs().max() <= 6e-3 * ref.abs().max(), (opts, programs)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16, 48])
def test_tensor_core_gemv_grouped_launch_on_gpu(m):
    """Linears sharing an input (q/k/v) as one launch on column slices of the concatenated trellis."""
    from trellm.kernels.exl3_tc import exl3_gemv_tc
    from trellm.kernels.hadamard import had_in

    lins = [_tc_case(4096, n, 4, "mul1", n == 1024, 17 * n + m)[0] for n in (4096, 1024, 1024)]
    x = torch.randn(m, 4096, device="cuda")
    trellis = torch.cat([lin.trellis for lin in lins], dim=1)
    svh = torch.cat([lin.svh for lin in lins])
    bias = torch.cat([lin.bias if lin.bias is not None else torch.zeros_like(lin.svh) for lin in lins])
    xh, xs = had_in(x, torch.stack([lin.suh for lin in lins]))
    y = exl3_gemv_tc(xh, xs, trellis, svh, bias, "mul1", 6144, torch.float32, group_blocks=(32, 40))
    for part, lin in zip(y.split([4096, 1024, 1024], dim=1), lins):
        ref = lin._forward_ref(x).float()
        assert (part - ref).abs().max() <= 6e-3 * ref.abs().max()
    # A member alone on its column slice of the concatenated trellis (the fused layer's views).
    xh0, xs0 = had_in(x, lins[1].suh)
    y1 = exl3_gemv_tc(xh0, xs0, trellis[:, 256:320], svh[4096:5120], bias[4096:5120], "mul1", 1024, torch.float32)
    ref = lins[1]._forward_ref(x).float()
    assert (y1 - ref).abs().max() <= 6e-3 * ref.abs().max()


@pytest.mark.gpu
def test_captured_graph_survives_a_larger_workspace():
    """A CUDA graph captured with the stream-K workspace of a small batch still computes the same after a
    larger batch made the workspace grow (the outgrown buffer must stay allocated: the graph holds it)."""
    from trellm.kernels import exl3_gemv as gemv_module
    from trellm.kernels.exl3_tc import exl3_gemv_tc
    from trellm.kernels.hadamard import had_in

    gemv_module._WORKSPACES.clear()
    lin, g = _tc_case(4096, 14336, 4, "mul1", False, 11)
    xh, xs = had_in(torch.randn(1, 4096, generator=g).cuda(), lin.suh)

    def call():
        return exl3_gemv_tc(xh, xs, lin.trellis, lin.svh, None, "mul1", 14336, torch.float32)

    want = call()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    small = gemv_module._WORKSPACES[xh.device][0].numel()
    bh, bs = had_in(torch.randn(64, 4096, generator=g).cuda(), lin.suh)
    exl3_gemv_tc(bh, bs, lin.trellis, lin.svh, None, "mul1", 14336, torch.float32)
    assert gemv_module._WORKSPACES[xh.device][0].numel() > small  # it grew
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.randn(2**26, device="cuda")  # reuse freed memory, if any
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4])
def test_dependent_launches_give_the_same_results_on_gpu(m, monkeypatch):
    """With programmatic dependent launch (trellm.kernels.PDL) the GEMVs start while the norm / act·mul
    before them runs and wait for their input: norm → GEMV → act·mul → GEMV gives bit for bit what serial
    launches give, eagerly and replayed from a CUDA graph; also with the first words requested before the
    wait (exl3_tc's PDL_EARLY)."""
    import trellm.kernels as kernels
    from trellm.kernels import exl3_gemv as gemv_mod
    from trellm.kernels import exl3_tc as tc_mod
    from trellm.kernels.exl3_dispatch import gemv_small
    from trellm.kernels.fused import act_mul_rotated, rms_norm_rotated

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90")
    up, g = _tc_case(1024, 2 * 2816, 4, "mul1", False, 7 + m)
    down, _ = _tc_case(2816, 1024, 3, "mul1", True, 8 + m)
    x = torch.randn(m, 1024, generator=g).cuda().to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn(1024, generator=g)).cuda().to(torch.bfloat16)

    def chain():
        _, _, rot = rms_norm_rotated(None, x, w, 1e-5, 0.0, False, up.suh[None])
        h = gemv_small(*rot, up.trellis, up.svh, None, "mul1", 2 * 2816, torch.bfloat16)
        _, rot2 = act_mul_rotated("silu", h[:, :2816], h[:, 2816:], down.suh[None])
        return gemv_small(*rot2, down.trellis, down.svh, down.bias, "mul1", 1024, torch.bfloat16)

    try:
        for pdl, early in ((False, False), (True, False), (True, True)):
            monkeypatch.setattr(tc_mod, "PDL_EARLY", early)
            gemv_mod._PLANS.clear()
            tc_mod._PLANS.clear()
            monkeypatch.setattr(kernels, "PDL", pdl)
            kernels.pdl_on.cache_clear()
            assert kernels.pdl_on(x.device) == pdl
            if not pdl:
                serial = chain()
                hr = up._forward_ref(torch.nn.functional.rms_norm(x.float(), (1024,), w.float(), 1e-5)).float()
                ref = down._forward_ref(torch.nn.functional.silu(hr[:, :2816]) * hr[:, 2816:]).float()
                assert (serial.float() - ref).abs().max() <= 0.02 * ref.abs().max()
                continue
            torch.testing.assert_close(chain(), serial, rtol=0, atol=0)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                chain()  # plans and compiles outside the capture
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = chain()
            for _ in range(3):
                graph.replay()
                torch.testing.assert_close(out, serial, rtol=0, atol=0)
    finally:
        kernels.pdl_on.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 9, 17, 64])
@pytest.mark.parametrize("bits, codebook", [(4, "mul1"), (5, "mcg")])
def test_tensor_core_gemv_coalesced_x_on_gpu(m, bits, codebook):
    """x rows loaded with 16-byte loads and moved into the mma operand through shared memory (x_coalesced),
    with and without the register prefetch, on runs of one and many iterations."""
    from trellm.kernels.exl3_tc import exl3_gemv_tc
    from trellm.kernels.hadamard import had_in

    lin, g = _tc_case(1664, 3000, bits, codebook, True, bits + m)
    x = torch.randn(m, 1664, generator=g).cuda()
    xh, xs = had_in(x, lin.suh)
    ref = lin._forward_ref(x).float()
    base = exl3_gemv_tc(xh, xs, lin.trellis, lin.svh, lin.bias, codebook, 3000, torch.float32)
    for prefetch in (False, True):
        for programs in (None, 100):
            y = exl3_gemv_tc(xh, xs, lin.trellis, lin.svh, lin.bias, codebook, 3000, torch.float32,
                             prefetch=prefetch, programs=programs, x_coalesced=True)
            assert (y - ref).abs().max() <= 6e-3 * ref.abs().max(), (prefetch, programs)
        # The same products in the same order: equal to the other load bit for bit. (The program count is
        # fixed: the variants' shared memory differs, so would their resident counts and stream-K splits.)
        torch.testing.assert_close(exl3_gemv_tc(xh, xs, lin.trellis, lin.svh, lin.bias, codebook, 3000,
                                                torch.float32, prefetch=prefetch, programs=100, x_coalesced=True),
                                   exl3_gemv_tc(xh, xs, lin.trellis, lin.svh, lin.bias, codebook, 3000,
                                                torch.float32, prefetch=prefetch, programs=100, x_coalesced=False),
                                   rtol=0, atol=0)
    assert base.shape == (m, 3000)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transform", ["dot", "fwht"])
def test_effective_weight_and_product_on_gpu(dtype, transform, monkeypatch):
    """The large-m path that folds both transforms into the decoded weight: W^T within dtype's rounding of the
    fp32 reference weight, and y = x @ W + bias against the reference layer, for padded shapes, a column
    range, several scratch chunks (SCRATCH_ELEMS made small) and chunks decoded on a side stream."""
    from trellm.kernels import exl3_dispatch
    from trellm.kernels.exl3_decode import dequantize_effective
    from trellm.quant import exl3_format as fmt
    from trellm.quant.exl3 import EXL3Linear
    from trellm.quant.exl3_writer import random_linear

    g = torch.Generator().manual_seed(5)
    tol = 2**-8 if dtype == torch.bfloat16 else 2**-10
    for k, n, bits, cb in ((4096, 1536, 4, "mul1"), (1000, 700, 6, "mcg"), (384, 256, 2, "3inst")):
        lin = EXL3Linear(k, n, True)
        tr, s1, s2 = random_linear(k, n, bits, generator=g)
        lin.set_tensors(tr, suh=s1, svh=s2, codebook=cb, bias=torch.randn(n, generator=g) * 0.1, device="cuda")
        ref_w = fmt.exl3_weight(lin.trellis, lin.suh, lin.svh, cb).T  # [n_pad, k_pad]
        w = dequantize_effective(lin.trellis, cb, lin.suh, lin.svh, dtype=dtype, transform=transform)
        # one rounding to dtype per weight (the dot form also rounds Q·H to fp16: an error on the scale of
        # the typical weight)
        assert ((w.float() - ref_w).abs() <= tol * (ref_w.abs() + ref_w.abs().mean())).all(), (k, n, bits, cb)
        part = dequantize_effective(lin.trellis, cb, lin.suh, lin.svh, cols=(128, 256), dtype=dtype,
                                    transform=transform)
        assert torch.equal(part, w[128:256])
        x = torch.randn(100, k, device="cuda", dtype=dtype)
        ref = lin._forward_ref(x.float())
        for elems in (exl3_dispatch.SCRATCH_ELEMS, 128 * lin.k_pad):  # one chunk, then 128 columns a chunk
            monkeypatch.setattr(exl3_dispatch, "SCRATCH_ELEMS", elems)
            y = exl3_dispatch.exl3_gemm_effective(x, lin, transform=transform)
            assert y.dtype == dtype and y.shape == (100, n)
            assert (y.float() - ref).abs().max() <= 1e-2 * ref.abs().max(), (k, n, bits, cb, elems)
        monkeypatch.setattr(exl3_dispatch, "SCRATCH_ELEMS", 64 * 2**20)
        for chunks in (2, 3, 8):  # decoded on a side stream ahead of the products (two buffers)
            y = exl3_dispatch.exl3_gemm_effective(x, lin, transform=transform, overlap=chunks)
            assert (y.float() - ref).abs().max() <= 1e-2 * ref.abs().max(), (k, n, bits, cb, chunks)


@pytest.mark.gpu
def test_large_batches_follow_the_large_m_switch(monkeypatch):
    """exl3_matmul sends m > small_m_limit to the effective path when LARGE_M says so and the precision
    rule allows (bf16 up to K = 6), else to the fp16 scratch path; both agree with the reference."""
    from trellm.kernels import exl3_dispatch
    from trellm.quant.exl3 import EXL3Linear
    from trellm.quant.exl3_writer import random_linear

    g = torch.Generator().manual_seed(6)
    calls = []
    real = exl3_dispatch.exl3_gemm_effective
    monkeypatch.setattr(exl3_dispatch, "exl3_gemm_effective", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for bits, expect in ((6, True), (7, False)):
        lin = EXL3Linear(512, 384, False)
        tr, s1, s2 = random_linear(512, 384, bits, generator=g)
        lin.set_tensors(tr, suh=s1, svh=s2, codebook="mul1", device="cuda")
        x = torch.randn(200, 512, device="cuda", dtype=torch.bfloat16)
        ref = lin._forward_ref(x.float())
        for mode in ("effective", "scratch"):
            monkeypatch.setattr(exl3_dispatch, "LARGE_M", mode)
            calls.clear()
            y = exl3_dispatch.exl3_matmul(x, lin)
            assert bool(calls) == (expect and mode == "effective"), (bits, mode)
            assert (y.float() - ref).abs().max() <= 1e-2 * ref.abs().max(), (bits, mode)
