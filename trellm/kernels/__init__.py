"""Triton kernels beside their torch references."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (an H100's 132 elsewhere: interpreter runs)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


# Programmatic dependent launch (sm_90+): the small-m GEMVs are launched so that they may start while the
# kernel before them (the norm, act·mul or had_in that makes their input) still runs; they ask L2 for their
# first weights, then wait for that kernel's output (grid_wait), and the producing kernels let them in at
# their own start (grid_release). Whole 8B model on an H100 (benchmarks/RESULTS.md): decode +5 % at batch 1,
# +6 % at batch 16. TRELLM_PDL=0 turns it off (A/B timing).
PDL = os.environ.get("TRELLM_PDL", "1") == "1"


@functools.lru_cache(maxsize=None)
def pdl_on(device: torch.device) -> bool:
    """Whether launches on this device use programmatic dependent launch (PDL and Hopper or newer)."""
    return PDL and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


# Iterations of its first span whose weights a dependent GEMV asks L2 for before it waits (0: none); for
# A/B timing (TRELLM_PDL_PREFETCH).
PDL_PREFETCH = int(os.environ.get("TRELLM_PDL_PREFETCH", "0"))
if PDL_PREFETCH not in (0, 1, 2, 4):
    raise ValueError(f"TRELLM_PDL_PREFETCH={PDL_PREFETCH}: expected 0, 1, 2 or 4 iterations")
# A dependent exl3_tc issues its first iteration's word loads before it waits (TRELLM_PDL_EARLY=0 turns it
# off). Whole 8B model on an H100 with exl3_tc at m = 1 too: 256 -> 276 tok/s at batch 1, 3,559 -> 3,652 at
# batch 16 (the two changes together; RESULTS.md). exl3_gemv's m = 1 form went to 255 registers with it.
PDL_EARLY = os.environ.get("TRELLM_PDL_EARLY", "1") == "1"


@triton.jit
def prefetch_tiles_l2(tile_ptr, go, K: tl.constexpr):
    """Ask L2 for every 128-byte line of the trellis tiles (32·K bytes each) that start at tile_ptr, where
    go; no register waits on it. Elementwise on the caller's tensors, so Triton and Gluon kernels share it.
    (Asked every iteration for later iterations, this made the small-m kernels 2-20 % slower on an H100.)"""
    B: tl.constexpr = 32 * K  # tiles of 96, 160, 192, 224 bytes may straddle one more line: their last word
    NL: tl.constexpr = (B + 127) // 128 + (1 if B % 128 != 0 and 128 % B != 0 else 0)
    for q in tl.static_range(NL):
        line = (tile_ptr + (32 * q if 32 * q < 8 * K else 8 * K - 1)).to(tl.int64, bitcast=True)
        tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.u32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                                  "=r,l,r", [line, go.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def grid_wait():
    """Wait until the grid this one depends on has finished and its writes are visible (returns at once
    when the launch was not a dependent one)."""
    tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def grid_release():
    """Let the dependent grid launch once every program of this one has released or exited (it still waits
    for this grid's completion before reading what it writes)."""
    tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32, is_pure=False,
                              pack=1)
