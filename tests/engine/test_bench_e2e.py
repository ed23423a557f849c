"""benchmarks/bench_e2e.py on a CPU: the tiny preset end to end, and its A/B switches."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_e2e_variants_on_cpu(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "benchmarks")]))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_e2e.py"), "--preset", "tiny",
                           "--out", str(tmp_path / "m"), "--device", "cpu", "--batches", "1,2", "--new", "4",
                           "--variants", "base|TRELLM_SMALL_M=tc,TRELLM_PDL=0", "--rounds", "2"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["round"], r["variant"]) for r in runs] == [(0, "base"), (0, "TRELLM_SMALL_M=tc,TRELLM_PDL=0"),
                                                          (1, "base"), (1, "TRELLM_SMALL_M=tc,TRELLM_PDL=0")]
    for r in runs:
        assert [row["batch"] for row in r["rows"]] == [1, 2]
        assert all(row["tokens"] == 4 * row["batch"] and row["decode_tok_s"] > 0 for row in r["rows"])
    table = proc.stdout.splitlines()[-2:]
    assert table[0].startswith("base") and table[1].startswith("TRELLM_SMALL_M=tc,TRELLM_PDL=0")


def test_bench_e2e_switches_reach_the_kernels(monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_e2e
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    import trellm.kernels as kernels
    from trellm.kernels import exl3_dispatch, exl3_gemv, exl3_tc

    for name in ("PDL", "PDL_PREFETCH", "PDL_EARLY"):
        monkeypatch.setattr(kernels, name, getattr(kernels, name))
    monkeypatch.setattr(exl3_gemv, "PDL_PREFETCH", exl3_gemv.PDL_PREFETCH)
    for name in ("PDL_PREFETCH", "PDL_EARLY", "XCOAL_M"):
        monkeypatch.setattr(exl3_tc, name, getattr(exl3_tc, name))
    monkeypatch.setattr(exl3_dispatch, "SMALL_M_KERNEL", exl3_dispatch.SMALL_M_KERNEL)
    monkeypatch.setattr(exl3_dispatch, "TC_MAX_M", exl3_dispatch.TC_MAX_M)
    from trellm.engine import generator

    monkeypatch.setattr(generator, "OVERLAP", generator.OVERLAP)
    from trellm.cache import paged

    monkeypatch.setattr(paged, "ATTN_ROTATE", paged.ATTN_ROTATE)
    try:
        bench_e2e.set_switch("TRELLM_PDL", "0")
        assert kernels.PDL is False
        bench_e2e.set_switch("TRELLM_PDL_PREFETCH", "2")
        assert kernels.PDL_PREFETCH == exl3_gemv.PDL_PREFETCH == exl3_tc.PDL_PREFETCH == 2
        bench_e2e.set_switch("TRELLM_PDL_EARLY", "1")
        assert kernels.PDL_EARLY is exl3_tc.PDL_EARLY is True
        bench_e2e.set_switch("TRELLM_SMALL_M", "fma")
        bench_e2e.set_switch("TRELLM_TC_MAX_M", "32")
        assert (exl3_dispatch.SMALL_M_KERNEL, exl3_dispatch.TC_MAX_M) == ("fma", 32)
        bench_e2e.set_switch("TRELLM_TC_XCOAL_M", "65")
        assert exl3_tc.XCOAL_M == 65
        bench_e2e.set_switch("TRELLM_OVERLAP", "0")
        assert generator.OVERLAP is False
        bench_e2e.set_switch("TRELLM_ATTN_ROTATE", "0")
        assert paged.ATTN_ROTATE is False
        with pytest.raises(SystemExit, match="not a switch"):
            bench_e2e.set_switch("TRELLM_NOPE", "1")
    finally:
        kernels.pdl_on.cache_clear()


def test_prefill_timing_refuses_prompts_served_from_the_prefix_cache(tmp_path):
    """The prefill figure counts computed tokens only: distinct prompts pass; a prompt run before (its pages
    in the prefix cache) is refused — the bug that inflated every prefill figure until 2026-12-07."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_e2e
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    from trellm.engine.generator import Generator
    from trellm.models.loader import load_model
    from trellm.quant.exl3_writer import write_random_exl3_model

    cfg = bench_e2e.PRESETS["tiny"]
    write_random_exl3_model(cfg, tmp_path / "m", bits=4, head_bits=6)
    model = load_model(tmp_path / "m", device="cpu", dtype="float32")
    gen = Generator(model, max_batch_tokens=2048, max_seqs=2)
    assert bench_e2e.measure_prefill(gen, 600, cfg["vocab_size"], rounds=3, seed=5) > 0
    with pytest.raises(AssertionError, match="reused 512 cached tokens"):
        bench_e2e.measure_prefill(gen, 600, cfg["vocab_size"], rounds=1, seed=5)  # the same first prompt again
