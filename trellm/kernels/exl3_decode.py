"""Decoding EXL3 trellis tiles inside Triton kernels, and the dequantize kernel.

`decode_block` turns TA × TC tiles of the trellis into a [16·TA, 16·TC] fp16 block of
Q in natural (row, column) order without ever gathering: the 256 weights of a tile
are split into 8 groups of 32 consecutive sequence positions p = 32g + p0. Within a
group every weight's 16-bit window starts at a bit offset known at compile time
(32·K·g is a whole number of words), so each of the 32 positions p0 is a straight-line
funnel shift of two word tensors loaded once per group, followed by the codebook.
The 32 results are joined along new register dimensions whose order makes the
final permute/reshape land each weight at its (row, col) of the tile (§3: row =
2(t mod 4) + j0 + 8·j1, col = t div 4 + 8·j2 for p = 8t + j).

Codebook output (CODEBOOK constexpr): 0 = mul1, 1 = mcg, 2 = 3inst. With RAW_MUL1 the
mul1 path returns h = 1024 + bytesum as fp16 (exact) instead of fma(h, C1, C2): the
affine map is applied once to the matmul result (C1·acc + C2·Σx), which saves an
fp16 fma per weight and is more precise than rounding every weight.

USE_ASM selects inline PTX (funnel shift, dp4a); without it the same arithmetic is
spelled in plain Triton so that TRITON_INTERPRET=1 can run it on a CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trellm.kernels.hadamard import _fwht128, hadamard_128
from trellm.quant import exl3_format as fmt

MUL1_C1 = float(fmt._fp16(fmt.MUL1_C1_BITS))
MUL1_C2 = float(fmt._fp16(fmt.MUL1_C2_BITS))
CODEBOOK_IDS = {"mul1": 0, "mcg": 1, "3inst": 2}


@triton.jit
def _window(hi, lo, OFF: tl.constexpr, USE_ASM: tl.constexpr):
    """The 16 bits starting OFF bits (MSB-first) into the 64-bit hi:lo, as uint32."""
    if OFF == 0:
        return hi >> 16
    elif OFF <= 16:
        return (hi >> (16 - OFF)) & 0xFFFF
    else:
        if USE_ASM:
            f = tl.inline_asm_elementwise(f"shf.l.clamp.b32 $0, $2, $1, {OFF};", "=r,r,r", [hi, lo],
                                          dtype=tl.uint32, is_pure=True, pack=1)
        else:
            f = (hi << OFF) | (lo >> (32 - OFF))
        return f >> 16


@triton.jit
def _codebook(state, CODEBOOK: tl.constexpr, RAW_MUL1: tl.constexpr, USE_ASM: tl.constexpr):
    """16-bit states (uint32) -> fp16 values."""
    if CODEBOOK == 0:
        x = state * 0x83DCD12D
        if USE_ASM:
            hb = tl.inline_asm_elementwise("dp4a.u32.u32 $0, $1, 16843009, 25600;", "=r,r", [x],
                                           dtype=tl.uint32, is_pure=True, pack=1)
        else:
            hb = 0x6400 + (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + (x >> 24)
        h = hb.to(tl.uint16).to(tl.float16, bitcast=True)  # 1024 + bytesum, exact
        if RAW_MUL1:
            return h
        else:
            return tl.fma(h.to(tl.float32), 0.00676727294921875, -10.3828125).to(tl.float16)  # C1, C2 = fp16 0x1EEE, 0xC931
    else:
        if CODEBOOK == 1:
            x = state * 0xCBAC1FED
        else:
            x = state * 89226354 + 64248484
        u = (x & 0x8FFF8FFF) ^ 0x3B603B60
        lo = (u & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
        hi = (u >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
        return lo + hi


@triton.jit
def _codebook_f32(state, CODEBOOK: tl.constexpr, USE_ASM: tl.constexpr):
    """16-bit states -> fp32 values for FMA accumulation; mul1 gives its raw byte sum b (the
    caller applies value = C1·(1024 + b) + C2 after the reduction)."""
    if CODEBOOK == 0:
        x = state * 0x83DCD12D
        if USE_ASM:
            # dp4a accumulating into the bits of 2^23: the float 2^23 + b, then one subtraction.
            fb = tl.inline_asm_elementwise("dp4a.u32.u32 $0, $1, 16843009, 1258291200;", "=r,r", [x],
                                           dtype=tl.uint32, is_pure=True, pack=1)
            return fb.to(tl.float32, bitcast=True) - 8388608.0
        else:
            return ((x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + (x >> 24)).to(tl.float32)
    else:
        return _codebook(state, CODEBOOK, False, USE_ASM).to(tl.float32)


@triton.jit
def split4(t):
    """[..., 4] -> its four slices along the last dimension (register renames when one thread holds all
    four, as after a 16-byte load)."""
    even, odd = tl.split(tl.reshape(t, t.shape[:-1] + [2, 2]))  # elements (0, 2) and (1, 3)
    e0, e2 = tl.split(even)
    e1, e3 = tl.split(odd)
    return e0, e1, e2, e3


@triton.jit
def load_group_words(tr_ptr, tile_a, tile_c, NT, K: tl.constexpr, TA: tl.constexpr, TC: tl.constexpr):
    """Words -1 .. K of every 32-weight group of TA × TC tiles: a tuple of K + 2 uint32 [TA, TC, 8]."""
    WORDS: tl.constexpr = 8 * K
    a = tl.arange(0, TA)[:, None, None]
    c = tl.arange(0, TC)[None, :, None]
    g = tl.arange(0, 8)[None, None, :]
    group = ((tile_a + a) * NT + (tile_c + c)) * WORDS  # [TA, TC, 1] first word of each tile
    prev = tl.load(tr_ptr + group + (g * K + WORDS - 1) % WORDS).to(tl.uint32, bitcast=True)  # word -1 (wraps)
    nxt = tl.load(tr_ptr + group + (g * K + K) % WORDS).to(tl.uint32, bitcast=True)  # word K (wraps)
    # The group's own K words are contiguous: fetch them in the widest aligned chunks (16 bytes for
    # K = 4, 8; 8 bytes for K = 2, 6; single words for odd K) and split the chunks in registers.
    V: tl.constexpr = 4 if K % 4 == 0 else (2 if K % 2 == 0 else 1)
    words = (prev,)
    for chunk in tl.static_range(K // V):
        base = tr_ptr + group + g * K + chunk * V  # [TA, TC, 8]
        if V == 1:
            words = words + (tl.load(base).to(tl.uint32, bitcast=True),)
        else:
            d = tl.arange(0, V)[None, None, None, :]
            part = tl.load(base[:, :, :, None] + d).to(tl.uint32, bitcast=True)  # [TA, TC, 8, V]
            if V == 2:
                w0, w1 = tl.split(part)
                words = words + (w0, w1)
            else:
                words = words + split4(part)
    return words + (nxt,)


@triton.jit
def group_state(words, P0: tl.constexpr, K: tl.constexpr, USE_ASM: tl.constexpr):
    """State of weight p = 32g + P0 in every group (uint32 [TA, TC, 8])."""
    start: tl.constexpr = (P0 + 1) * K - 16  # first bit of the window relative to the group (>= -15)
    d: tl.constexpr = (start + 32) // 32 - 1  # which word holds it: -1 .. K-1
    off: tl.constexpr = start - 32 * d
    return _window(words[d + 1], words[d + 2], off, USE_ASM)


@triton.jit
def _leaf(words, P0: tl.constexpr, K: tl.constexpr, CODEBOOK: tl.constexpr, RAW_MUL1: tl.constexpr,
          USE_ASM: tl.constexpr):
    """Weight p = 32g + P0 of every group: its window starts at a fixed offset from the group's words."""
    return _codebook(group_state(words, P0, K, USE_ASM), CODEBOOK, RAW_MUL1, USE_ASM)


# The join tree: p0 = 8·t0 + j with t0 = 2·t0_1 + t0_0 and j = 4·j2 + 2·j1 + j0. tl.join appends its
# new dimension last, so the innermost join comes first: joining j2, then j1, t0_1, t0_0 and j0
# (outermost) gives dims [..., j2, j1, t0_1, t0_0, j0], whose last four form the tile row
# 8·j1 + 4·t0_1 + 2·t0_0 + j0.
@triton.jit
def _join_j2(words, P: tl.constexpr, K: tl.constexpr, CODEBOOK: tl.constexpr, RAW_MUL1: tl.constexpr,
             USE_ASM: tl.constexpr):
    return tl.join(_leaf(words, P, K, CODEBOOK, RAW_MUL1, USE_ASM),
                   _leaf(words, P + 4, K, CODEBOOK, RAW_MUL1, USE_ASM))


@triton.jit
def _join_j1(words, P: tl.constexpr, K: tl.constexpr, CODEBOOK: tl.constexpr, RAW_MUL1: tl.constexpr,
             USE_ASM: tl.constexpr):
    return tl.join(_join_j2(words, P, K, CODEBOOK, RAW_MUL1, USE_ASM),
                   _join_j2(words, P + 2, K, CODEBOOK, RAW_MUL1, USE_ASM))


@triton.jit
def _join_t1(words, P: tl.constexpr, K: tl.constexpr, CODEBOOK: tl.constexpr, RAW_MUL1: tl.constexpr,
             USE_ASM: tl.constexpr):
    return tl.join(_join_j1(words, P, K, CODEBOOK, RAW_MUL1, USE_ASM),
                   _join_j1(words, P + 16, K, CODEBOOK, RAW_MUL1, USE_ASM))


@triton.jit
def _join_t0(words, P: tl.constexpr, K: tl.constexpr, CODEBOOK: tl.constexpr, RAW_MUL1: tl.constexpr,
             USE_ASM: tl.constexpr):
    return tl.join(_join_t1(words, P, K, CODEBOOK, RAW_MUL1, USE_ASM),
                   _join_t1(words, P + 8, K, CODEBOOK, RAW_MUL1, USE_ASM))


@triton.jit
def decode_block(tr_ptr, tile_a, tile_c, NT, K: tl.constexpr, TA: tl.constexpr, TC: tl.constexpr,
                 CODEBOOK: tl.constexpr, RAW_MUL1: tl.constexpr, USE_ASM: tl.constexpr):
    """Tiles [tile_a, tile_a+TA) × [tile_c, tile_c+TC) of a trellis with NT tile columns, as an fp16
    block [16·TA, 16·TC] in natural order. tr_ptr: the trellis viewed as int32 words (8·K per tile)."""
    words = load_group_words(tr_ptr, tile_a, tile_c, NT, K, TA, TC)
    v = tl.join(_join_t0(words, 0, K, CODEBOOK, RAW_MUL1, USE_ASM),
                _join_t0(words, 1, K, CODEBOOK, RAW_MUL1, USE_ASM))  # [TA, TC, 8, 2, 2, 2, 2, 2]
    v = tl.reshape(v, (TA, TC, 8, 2, 16))  # [a, c, g, j2, row]
    v = tl.permute(v, (0, 4, 1, 3, 2))  # [a, row, c, j2, g]: col = 8·j2 + g
    return tl.reshape(v, (16 * TA, 16 * TC))


@triton.jit
def _dequant_kernel(tr_ptr, q_ptr, NT, K_TOTAL, N_OUT, col0, K: tl.constexpr, TA: tl.constexpr, TC: tl.constexpr,
                    CODEBOOK: tl.constexpr, TRANSPOSED: tl.constexpr, USE_ASM: tl.constexpr):
    pid_a, pid_c = tl.program_id(0), tl.program_id(1)
    q = decode_block(tr_ptr, pid_a * TA, col0 // 16 + pid_c * TC, NT, K, TA, TC, CODEBOOK, False, USE_ASM)
    rows = pid_a * TA * 16 + tl.arange(0, 16 * TA)
    cols = pid_c * TC * 16 + tl.arange(0, 16 * TC)
    if TRANSPOSED:
        # Q^T [n, k]: each thread holds 16 consecutive rows of a column, so these stores vectorize.
        tl.store(q_ptr + cols[None, :] * K_TOTAL + rows[:, None], q)
    else:
        tl.store(q_ptr + rows[:, None] * N_OUT + cols[None, :], q)


def dequantize(trellis: torch.Tensor, codebook: str, *, cols: tuple[int, int] | None = None,
               out: torch.Tensor | None = None, transposed: bool = False, use_asm: bool | None = None
               ) -> torch.Tensor:
    """Q (fp16 [k, n], or Q^T [n, k] with transposed=True; columns cols[0]:cols[1], multiples of 128)
    decoded on the device, bit-exact."""
    kt, nt, depth = trellis.shape
    if depth % 16 or not 1 <= depth // 16 <= 8:
        raise ValueError(f"the Triton decoder handles integer K = 1..8, got trellis depth {depth}")
    c0, c1 = cols if cols is not None else (0, nt * 16)
    assert c0 % 128 == 0 and c1 % 128 == 0 and c1 <= nt * 16
    shape = (c1 - c0, kt * 16) if transposed else (kt * 16, c1 - c0)
    q = out if out is not None else torch.empty(shape, device=trellis.device, dtype=torch.float16)
    assert q.shape == shape and q.is_contiguous()
    ta, tc = 4, 8
    use_asm = trellis.device.type == "cuda" if use_asm is None else use_asm
    grid = (kt // ta, (c1 - c0) // (16 * tc))
    assert trellis.stride(2) == 1 and trellis.stride(1) == depth, "trellis tiles must be contiguous"
    row_stride = trellis.stride(0) // depth  # in tiles: a column slice of a wider trellis works in place
    _dequant_kernel[grid](trellis.view(torch.int32), q, row_stride, kt * 16, c1 - c0, c0, K=depth // 16, TA=ta, TC=tc,
                          CODEBOOK=CODEBOOK_IDS[codebook], TRANSPOSED=transposed, USE_ASM=use_asm)
    return q


def dequantize_ref(trellis: torch.Tensor, codebook: str, *, cols: tuple[int, int] | None = None) -> torch.Tensor:
    q = fmt.decode_trellis(trellis, codebook)
    return q if cols is None else q[:, cols[0] : cols[1]].contiguous()


@triton.jit
def _effective_kernel(tr_ptr, suh_ptr, svh_ptr, h_ptr, w_ptr, NT, K_TOTAL, col0, K: tl.constexpr,
                      CODEBOOK: tl.constexpr, DOT: tl.constexpr, USE_ASM: tl.constexpr):
    """One 128 × 128 block of W^T = (diag(suh)·H·Q·H·diag(svh))^T: both Hadamards act inside the block
    (they are blockwise), so the block needs only its own 8 × 8 tiles."""
    pid_a, pid_c = tl.program_id(0), tl.program_id(1)
    q = decode_block(tr_ptr, pid_a * 8, col0 // 16 + pid_c * 8, NT, K, 8, 8, CODEBOOK, False, USE_ASM)  # [k, n]
    if DOT:  # tensor cores, H = ±1 in fp16 (exact); Q·H rounds to fp16 once before the second product
        r = tl.arange(0, 128)
        h = tl.load(h_ptr + r[:, None] * 128 + r[None, :])
        qh = tl.dot(q, h).to(tl.float16)  # [k, n] = Q·H
        wt = tl.dot(tl.trans(qh), h)  # [n, k] = (Q·H)^T·H = (H·Q·H)^T
    else:  # butterflies in fp32
        wt = _fwht128(tl.trans(_fwht128(q.to(tl.float32))))
    rk = pid_a * 128 + tl.arange(0, 128)
    cn = pid_c * 128 + tl.arange(0, 128)  # within the requested columns
    scale_n = tl.load(svh_ptr + col0 + cn).to(tl.float32) * 0.0078125  # the two 128^-1/2 normalisations
    scale_k = tl.load(suh_ptr + rk).to(tl.float32)
    w = wt * scale_n[:, None] * scale_k[None, :]
    tl.store(w_ptr + cn[:, None] * K_TOTAL + rk[None, :], w.to(w_ptr.dtype.element_ty))


def dequantize_effective(trellis: torch.Tensor, codebook: str, suh: torch.Tensor, svh: torch.Tensor, *,
                         cols: tuple[int, int] | None = None, out: torch.Tensor | None = None,
                         dtype: torch.dtype = torch.bfloat16, transform: str = "dot",
                         use_asm: bool | None = None) -> torch.Tensor:
    """The layer's whole effective weight, transposed: W^T [n, k] = (diag(suh)·H·Q·H·diag(svh))^T for the
    columns cols[0]:cols[1] (multiples of 128; k and n padded), in `dtype` — the operand of a plain
    x @ W matmul, with no transform of x or y. transform: "dot" (two tensor-core products per block) or
    "fwht" (butterflies). Matches exl3_format.exl3_weight(...).T within `dtype`'s rounding."""
    kt, nt, depth = trellis.shape
    if depth % 16 or not 1 <= depth // 16 <= 8:
        raise ValueError(f"the Triton decoder handles integer K = 1..8, got trellis depth {depth}")
    c0, c1 = cols if cols is not None else (0, nt * 16)
    assert c0 % 128 == 0 and c1 % 128 == 0 and c1 <= nt * 16 and kt % 8 == 0
    assert suh.shape == (kt * 16,) and svh.shape[0] >= c1, (suh.shape, svh.shape, c1)
    w = out if out is not None else torch.empty(c1 - c0, kt * 16, device=trellis.device, dtype=dtype)
    assert w.shape == (c1 - c0, kt * 16) and w.is_contiguous()
    assert trellis.stride(2) == 1 and trellis.stride(1) == depth, "trellis tiles must be contiguous"
    use_asm = trellis.device.type == "cuda" if use_asm is None else use_asm
    grid = (kt // 8, (c1 - c0) // 128)
    h_pm1 = hadamard_128(trellis.device, unit=False)
    _effective_kernel[grid](trellis.view(torch.int32), suh, svh, h_pm1, w, trellis.stride(0) // depth, kt * 16, c0,
                            K=depth // 16, CODEBOOK=CODEBOOK_IDS[codebook], DOT=transform == "dot",
                            USE_ASM=use_asm, num_warps=8)
    return w
