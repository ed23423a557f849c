"""The exl3 QuantMethod: loading, padding, validation errors, and whole EXL3 models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from trellm.errors import ConfigError, TensorError
from trellm.io.safetensors import CheckpointReader
from trellm.io.weights import WeightSource
from trellm.quant import exl3_format as fmt
from trellm.quant.exl3 import EXL3Linear
from trellm.quant.exl3_writer import linear_tensors, random_linear, write_random_exl3_model

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 200, "intermediate_size": 330,
        "num_hidden_layers": 2, "num_attention_heads": 5, "num_key_value_heads": 1, "max_position_embeddings": 128}


def _layer_files(tmp_path, k, n, bits, codebook="mul1", bias=True, tweak=None):
    g = torch.Generator().manual_seed(k * n + bits)
    trellis, suh, svh = random_linear(k, n, bits, generator=g)
    tensors = linear_tensors("layer", trellis, suh, svh, codebook, torch.randn(n, generator=g) if bias else None)
    if tweak:
        tweak(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    return WeightSource(CheckpointReader(tmp_path))


@pytest.mark.parametrize("k, n, bits, codebook", [(200, 300, 4, "mul1"), (128, 130, 2, "mcg"), (257, 128, 5, "3inst")])
def test_padded_layer_equals_its_dense_weight(tmp_path, k, n, bits, codebook):
    lin = EXL3Linear(k, n, True)
    lin.load(_layer_files(tmp_path, k, n, bits, codebook), "layer", device="cpu", dtype=torch.float32)
    assert lin.bits == bits and lin.codebook == codebook and lin.describe() == f"exl3 {bits}-bit {codebook}"
    x = torch.randn(3, 4, k)
    y = lin(x)
    assert y.shape == (3, 4, n)
    dense = x @ lin.dense_weight().T + lin.bias.float()
    torch.testing.assert_close(y, dense, rtol=1e-4, atol=1e-4 * dense.abs().max().item())


def test_legacy_sign_fields(tmp_path):
    def legacy(t):
        t.pop("layer.suh")
        t["layer.su"] = torch.tensor([-1] * 8, dtype=torch.int16)  # 128 signs, all negative
    lin = EXL3Linear(128, 128, True)
    lin.load(_layer_files(tmp_path, 128, 128, 3, tweak=legacy), "layer", device="cpu", dtype=torch.float32)
    assert (lin.suh == -1).all()


@pytest.mark.parametrize("tweak, words", [
    (lambda t: t.update({"layer.trellis": t["layer.trellis"][..., :36].contiguous()}), "not a multiple of 16"),
    (lambda t: t.update({"layer.trellis": torch.zeros(8, 8, 144, dtype=torch.int16)}), "9 bits"),
    (lambda t: t.update({"layer.suh": t["layer.suh"][:100]}), "layer.suh has shape"),
    (lambda t: t.update({"layer.mcg": torch.tensor(fmt.as_int32(fmt.MCG_MULT), dtype=torch.int32)}), "both"),
    (lambda t: t.update({"layer.mul1": torch.tensor(7, dtype=torch.int32)}), "expected 0x83dcd12d"),
    (lambda t: t.update({"layer.trellis": torch.zeros(4, 8, 64, dtype=torch.int16)}), "tiles"),
    (lambda t: t.pop("layer.svh"), "layer.svh is missing"),
    (lambda t: t.update({"layer.trellis": t["layer.trellis"].float()}), "int16"),
])
def test_corrupt_layers_name_the_tensor(tmp_path, tweak, words):
    source = _layer_files(tmp_path, 128, 128, 4, tweak=tweak)
    with pytest.raises(TensorError, match=words):
        EXL3Linear(128, 128, True).load(source, "layer", device="cpu", dtype=torch.float32)


def test_half_integer_bits_need_mul1(tmp_path):
    def half(t):
        t["layer.trellis"] = torch.zeros(8, 8, 40, dtype=torch.int16)  # K = 2.5
        t.pop("layer.mul1")
        t["layer.mcg"] = torch.tensor(fmt.as_int32(fmt.MCG_MULT), dtype=torch.int32)
    with pytest.raises(TensorError, match="half-integer"):
        EXL3Linear(128, 128, True).load(_layer_files(tmp_path, 128, 128, 4, tweak=half), "layer", device="cpu",
                                        dtype=torch.float32)


def test_unknown_quant_method(tmp_path, tiny_model_dir):
    from trellm.models.loader import load_model
    import shutil

    src, _ = tiny_model_dir("llama")
    shutil.copytree(src, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="gptq"):
        load_model(tmp_path / "m", device="cpu")


@pytest.fixture(scope="module")
def tiny_exl3(tmp_path_factory):
    path = tmp_path_factory.mktemp("exl3") / "model"
    write_random_exl3_model(TINY, path, bits=3, head_bits=5, codebook="mul1", seed=1)
    return path


def test_exl3_model_matches_transformers_on_its_dense_weights(tiny_exl3, tmp_path):
    """Write every EXL3 linear's dense weight into a plain HF folder; transformers must give our logits."""
    transformers = pytest.importorskip("transformers")
    from trellm.cache.contiguous import ContiguousKVCache
    from trellm.layers.linear import Linear
    from trellm.models.loader import load_model

    model = load_model(tiny_exl3, device="cpu", dtype="float32")
    assert model.lm_head.impl.describe() == "exl3 5-bit mul1"
    tensors = {k: v.float() for k, v in load_file(tiny_exl3 / "model.safetensors").items()
               if k.endswith(".weight")}
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            tensors[f"{module.name}.weight"] = module.dense_weight().float().contiguous()
    dense = tmp_path / "dense"
    dense.mkdir()
    save_file(tensors, dense / "model.safetensors")
    cfg = json.loads((tiny_exl3 / "config.json").read_text())
    cfg.pop("quantization_config")
    (dense / "config.json").write_text(json.dumps(cfg))
    ref = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
    cache = ContiguousKVCache(model.config, batch_size=2, max_len=9, device="cpu", dtype=torch.float32)
    got = model(ids, torch.arange(9)[None].expand(2, -1), cache.step(9), max_seq_len=9)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_inspect_reports_bits(tiny_exl3, capsys):
    from trellm.cli.main import main

    assert main(["inspect", str(tiny_exl3), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["quantization"] == "exl3" and d["exl3"]["bits"] == 3 and d["exl3"]["head_bits"] == 5
    assert d["exl3"]["bits_per_layer"] == {"0": 3, "1": 3}
    assert d["parameters"] > 300 * 200  # logical weights, not int16 words


@pytest.mark.gpu
def test_exl3_model_same_logits_through_kernels_and_reference(tiny_exl3):
    from trellm.cache.contiguous import ContiguousKVCache
    from trellm.models.loader import load_model

    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    outs = []
    for device in ("cpu", "cuda"):
        model = load_model(tiny_exl3, device=device, dtype="float32")
        for t in (20, 1):  # prefill (m = 20: dequant + cuBLAS) and one decode step (m = 1: fused kernel)
            cache = ContiguousKVCache(model.config, batch_size=1, max_len=21, device=device, dtype=torch.float32)
            x = ids[:, :t].to(device)
            outs.append((device, t, model(x, torch.arange(t, device=device)[None], cache.step(t), max_seq_len=t).cpu()))
    for t in (20, 1):
        cpu = [o for d, tt, o in outs if d == "cpu" and tt == t][0]
        gpu = [o for d, tt, o in outs if d == "cuda" and tt == t][0]
        assert (gpu - cpu).abs().max() <= 2e-2 * cpu.abs().max()


FUSABLE = dict(TINY, hidden_size=256, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [TINY, FUSABLE], ids=["separate", "fused"])
def test_input_transform_inside_the_norm_and_act_kernels(config, tmp_path, monkeypatch):
    """On CUDA the norms and act·mul write the next linears' had_in output (LinearGroup.rotation): the
    only had_in launches left are o_proj's, and the logits match the model with the transforms as
    their own launches (had_in's two forms round differently: within fp16 noise)."""
    from trellm.cache.contiguous import ContiguousKVCache
    from trellm.kernels import hadamard
    from trellm.models.loader import load_model

    write_random_exl3_model(config, tmp_path / "m", bits=4, head_bits=6, codebook="mul1", seed=3)
    model = load_model(tmp_path / "m", device="cuda", dtype="bfloat16")
    layers = model.layers
    assert all(lr.self_attn.qkv.rotation is not None and lr.mlp.gate_up.rotation is not None for lr in layers)
    assert (layers[0].self_attn.qkv.fused is not None) == (config is FUSABLE)
    calls = []
    original = hadamard.had_in
    monkeypatch.setattr(hadamard, "had_in", lambda *a: calls.append(1) or original(*a))
    import trellm.kernels.exl3_dispatch as dispatch
    monkeypatch.setattr(dispatch, "had_in", hadamard.had_in)
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(0)).cuda()

    def logits() -> list[torch.Tensor]:
        out = []
        for t in (20, 1):
            cache = ContiguousKVCache(model.config, batch_size=1, max_len=21, device="cuda", dtype=torch.bfloat16)
            out.append(model(ids[:, :t], torch.arange(t, device="cuda")[None], cache.step(t), max_seq_len=t).float())
        return out

    fused = logits()
    assert len(calls) == 2 * len(layers)  # o_proj's, at t = 20 and t = 1
    groups = [g for lr in layers for g in (lr.self_attn.qkv, lr.mlp.gate_up, lr.mlp.down)] + [model.head]
    saved = [g.rotation for g in groups]
    for g in groups:
        g.rotation = None
    calls.clear()
    plain = logits()
    # Per layer: q/k/v, o, gate/up, down = 7 transforms at t = 20 (the prefill runs each member alone),
    # 4 at t = 1 where the members fuse; and the head's at both.
    assert len(calls) == len(layers) * (7 + (4 if config is FUSABLE else 7)) + 2
    for g, r in zip(groups, saved):
        g.rotation = r
    for a, b in zip(fused, plain):
        assert (a - b).abs().max() <= 3e-2 * b.abs().max(), (a - b).abs().max()


@pytest.mark.gpu
def test_large_batches_on_the_effective_path_skip_every_transform(tmp_path, monkeypatch):
    """With TRELLM_LARGE_M=effective a 100-token prefill multiplies x itself in every linear: no had_in
    launch, no input transform made by the norm or act·mul kernels, and logits that match the fp16
    scratch path (bf16 rounding of the effective weights: within bf16 noise)."""
    from trellm.cache.contiguous import ContiguousKVCache
    from trellm.kernels import exl3_dispatch, fused, hadamard
    from trellm.models.loader import load_model

    write_random_exl3_model(FUSABLE, tmp_path / "m", bits=4, head_bits=6, codebook="mul1", seed=4)
    model = load_model(tmp_path / "m", device="cuda", dtype="bfloat16")
    calls, made = [], []
    original = hadamard.had_in
    monkeypatch.setattr(exl3_dispatch, "had_in", lambda *a: calls.append(1) or original(*a))
    norm = fused.rms_norm_rotated
    monkeypatch.setattr(fused, "rms_norm_rotated", lambda *a: made.append(a[-1] is not None) or norm(*a))
    ids = torch.randint(0, 300, (1, 100), generator=torch.Generator().manual_seed(1)).cuda()

    def logits() -> torch.Tensor:
        cache = ContiguousKVCache(model.config, batch_size=1, max_len=100, device="cuda", dtype=torch.bfloat16)
        return model(ids, torch.arange(100, device="cuda")[None], cache.step(100), max_seq_len=100).float()

    monkeypatch.setattr(exl3_dispatch, "LARGE_M", "scratch")
    plain = logits()
    assert calls and any(made)
    calls.clear(), made.clear()
    monkeypatch.setattr(exl3_dispatch, "LARGE_M", "effective")
    effective = logits()
    assert not calls and made and not any(made)
    assert (effective - plain).abs().max() <= 3e-2 * plain.abs().max()


@pytest.mark.gpu
def test_o_proj_transform_inside_the_attention_combine(tmp_path, monkeypatch):
    """Decoding through the paged kernel with key splits and 128-wide heads, the kernel that combines the
    splits writes o_proj's had_in output (PagedStep.attend_rotated): no had_in launch is left in a decode
    step, and the logits match the step with o_proj's transform as its own launch (fp16 noise)."""
    from trellm.cache.paged import PagedKVCache, Segment
    from trellm.kernels import hadamard
    from trellm.models.loader import load_model

    config = dict(TINY, hidden_size=256, intermediate_size=384, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=128)
    write_random_exl3_model(config, tmp_path / "m", bits=4, head_bits=6, codebook="mul1", seed=5)
    model = load_model(tmp_path / "m", device="cuda", dtype="bfloat16")
    assert all(lr.self_attn.o.rotation is not None for lr in model.layers)
    calls = []
    original = hadamard.had_in
    monkeypatch.setattr(hadamard, "had_in", lambda *a: calls.append(1) or original(*a))
    import trellm.kernels.exl3_dispatch as dispatch
    monkeypatch.setattr(dispatch, "had_in", hadamard.had_in)
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0)).cuda()
    cache = PagedKVCache(model.config, num_pages=4, page_size=16, device="cuda", dtype=torch.bfloat16)
    pages = [2, 0, 3]
    model(ids[:, :39], torch.arange(39, device="cuda")[None], cache.step([Segment(0, 0, 39, pages)]), max_seq_len=39)

    def decode() -> torch.Tensor:
        step = cache.step([Segment(0, 39, 1, pages)])
        assert step.splits > 1
        return model(ids[:, 39:], torch.tensor([[39]], device="cuda"), step, max_seq_len=40).float()

    calls.clear()
    fused = decode()
    assert not calls  # the norms, act·mul and now the attention combine write every transform
    saved = [lr.self_attn.o.rotation for lr in model.layers]
    for lr in model.layers:
        lr.self_attn.o.rotation = None
    plain = decode()
    assert len(calls) == len(model.layers)  # o_proj's own had_in
    for lr, r in zip(model.layers, saved):
        lr.self_attn.o.rotation = r
    assert (fused - plain).abs().max() <= 3e-2 * plain.abs().max(), (fused - plain).abs().max()


@pytest.mark.parametrize("key, codebook", [("k2.5_mul1", "mul1"), ("k4_mcg", "mcg"), ("k3_3inst", "3inst")])
def test_golden_layers_through_the_quant_method(key, codebook):
    from pathlib import Path

    from safetensors import safe_open

    path = Path(__file__).resolve().parents[3] / "shared" / "golden" / "exl3_linear_golden.safetensors"
    if not path.exists():
        pytest.skip("golden vectors not available")
    with safe_open(str(path), "pt") as f:
        g = {k: f.get_tensor(k) for k in f.keys() if k.startswith(key + "_")}
    lin = EXL3Linear(256, 384, False)
    lin.set_tensors(g[f"{key}_trellis"], suh=g[f"{key}_suh"], svh=g[f"{key}_svh"], codebook=codebook)
    y, want = lin(g[f"{key}_x"].float()), g[f"{key}_y"].float()
    assert (y - want).abs().max() <= 5e-3 * want.abs().max()


def test_the_random_writer_also_writes_the_16_bit_baseline(tmp_path):
    import json

    from trellm.models.loader import load_model

    write_random_exl3_model(TINY, tmp_path / "dense", bits=None, seed=2, dtype=torch.float16)
    cfg = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in cfg and not (tmp_path / "dense" / "quantization_config.json").exists()
    model = load_model(tmp_path / "dense", device="cpu", dtype="float32")
    assert "exl3" not in model.lm_head.impl.describe()
    w = model.lm_head.dense_weight()
    assert w.shape == (TINY["vocab_size"], TINY["hidden_size"]) and 0.015 < float(w.std()) < 0.025
