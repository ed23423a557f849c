"""Import a GGUF file as a Hugging Face-style model folder.

GGUF (llama.cpp's format) keeps the model config, the tokenizer and the weights
in one file, under llama.cpp's own names. The rest of trellm, and transformers,
read Hugging Face folders, so :func:`import_gguf` translates once:

* ``config.json`` / ``generation_config.json`` from the ``{arch}.*`` metadata,
* ``tokenizer.json`` / ``tokenizer_config.json`` (+ ``chat_template.jinja``)
  rebuilt with the ``tokenizers`` library from the ``tokenizer.ggml.*`` metadata,
* bf16 safetensors with Hugging Face tensor names, dequantized one tensor at a
  time by the ``gguf`` package and streamed to disk.

Two layout differences between llama.cpp and Hugging Face are undone here:

* llama.cpp's converter reorders the rows of the q/k projections of the
  ``llama`` architecture so that its RoPE can rotate adjacent pairs (GPT-J
  style); Hugging Face rotates the two halves of each head (GPT-NeoX style).
* For Gemma, Hugging Face's RMSNorm multiplies by ``1 + w`` while ggml
  multiplies by ``w``, so the converter stored ``w + 1``; we subtract 1 again.

Usage: ``python -m trellm.io.gguf_import MODEL.gguf OUT_DIR [--overwrite]``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trellm.errors import GGUFError

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED_ARCHITECTURES", "import_gguf"]

# GGUF token types (llama.cpp copied SentencePiece's piece types).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_SPIECE_SPACE = "\u2581"  # "▁": how SentencePiece spells a space inside tokens
_RECONVERT = "re-create the GGUF with a current llama.cpp converter"


# ---------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------

# GGUF per-block tensor name -> Hugging Face name inside `model.layers.N.`.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# Tensors that only carry RoPE parameters; they end up in config.json.
_ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


@dataclass(frozen=True, slots=True)
class _Arch:
    hf_class: str
    model_type: str
    # llama.cpp permuted q/k rows for interleaved RoPE (see module docstring).
    permute_qk: bool = False
    # Added to every `*norm.weight` by llama.cpp's converter; subtracted here.
    norm_offset: float = 0.0
    block_names: dict[str, str] = field(default_factory=dict)


_ARCHS: dict[str, _Arch] = {
    "llama": _Arch("LlamaForCausalLM", "llama", permute_qk=True),
    "qwen2": _Arch("Qwen2ForCausalLM", "qwen2"),
    "qwen3": _Arch("Qwen3ForCausalLM", "qwen3"),
    "gemma3": _Arch(
        "Gemma3ForCausalLM",
        "gemma3_text",
        norm_offset=1.0,
        block_names={
            "ffn_norm": "pre_feedforward_layernorm",
            "post_attention_norm": "post_attention_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
        },
    ),
    # Phi-3 keeps q/k/v and gate/up fused in both formats, in the same order.
    "phi3": _Arch(
        "Phi3ForCausalLM",
        "phi3",
        block_names={"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
    ),
}

SUPPORTED_ARCHITECTURES = tuple(_ARCHS)

# Gemma 3 alternates five sliding-window layers with one global layer; llama.cpp
# hard-codes this period for gemma3 instead of storing it in the file.
_GEMMA3_SLIDING_PATTERN = 6
_GEMMA3_LOCAL_ROPE_BASE = 10_000.0


# ---------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------


class _Meta:
    """Typed access to a GGUFReader's key/value metadata."""

    def __init__(self, reader: Any, path: Path) -> None:
        self._fields = reader.fields
        self._path = path
        self.arch: str = self.get("general.architecture", "")

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def get(self, key: str, default: Any = None) -> Any:
        fld = self._fields.get(key)
        if fld is None:
            return default
        return fld.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise GGUFError(f"{self._path} lacks the metadata key {key!r}; {_RECONVERT}")
        return value

    def arch_key(self, suffix: str, default: Any = None) -> Any:
        """An architecture-scoped key, e.g. arch_key("block_count") -> llama.block_count."""
        return self.get(f"{self.arch}.{suffix}", default)

    def arch_int(self, suffix: str, default: int | None = None) -> int:
        value = self.arch_key(suffix, default)
        if value is None:
            raise GGUFError(f"{self._path} lacks the metadata key '{self.arch}.{suffix}'; {_RECONVERT}")
        if isinstance(value, list):
            # Per-layer values (e.g. OpenELM's head counts) have no equivalent in these configs.
            if len(set(value)) != 1:
                raise GGUFError(f"{self._path}: per-layer '{self.arch}.{suffix}' values are not supported")
            value = value[0]
        return int(value)


def _open_reader(path: Path) -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise GGUFError("reading GGUF files needs the gguf package: pip install gguf") from exc
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # the reader raises ValueError, struct/numpy errors, ... on bad input
        raise GGUFError(f"{path} is not a readable GGUF file: {exc}") from exc
    # GGUFReader maps tensors lazily, so a truncated file only fails when a tensor is
    # read; check the extents now so the error comes before any output is written.
    size = path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise GGUFError(
                f"{path} is not a readable GGUF file: tensor {tensor.name} ends at byte {end} "
                f"but the file has {size} bytes (truncated download?)"
            )
    return reader


# ---------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------


def _f32(value: Any) -> float:
    """A float32 metadata value as its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _token_id(meta: _Meta, name: str) -> int | None:
    value = meta.get(f"tokenizer.ggml.{name}_token_id")
    return None if value is None else int(value)


def _rope_scaling(meta: _Meta, reader: Any, head_dim: int, rope_theta: float) -> dict[str, Any]:
    """Rope-scaling entries for `rope_parameters` (empty for plain RoPE)."""
    kind = meta.arch_key("rope.scaling.type")
    factor = meta.arch_key("rope.scaling.factor")
    orig_ctx = meta.arch_key("rope.scaling.original_context_length")
    if kind in (None, "none") or (kind == "linear" and not factor):
        params: dict[str, Any] = {}
    elif kind == "linear":
        params = {"rope_type": "linear", "factor": _f32(factor)}
    elif kind == "yarn":
        params = {"rope_type": "yarn", "factor": _f32(factor)}
        if orig_ctx:
            params["original_max_position_embeddings"] = int(orig_ctx)
    else:
        raise GGUFError(f"{meta.arch}: rope scaling type {kind!r} is not supported (supported: linear, yarn)")

    freqs = _rope_tensor(reader, "rope_freqs.weight")
    if freqs is not None:
        params = _llama3_rope(freqs, head_dim, rope_theta)
    return params


def _rope_tensor(reader: Any, name: str) -> list[float] | None:
    import gguf

    for tensor in reader.tensors:
        if tensor.name == name:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            return [float(x) for x in np.asarray(values, dtype=np.float32).reshape(-1)]
    return None


def _llama3_rope(freq_factors: list[float], head_dim: int, rope_theta: float) -> dict[str, Any]:
    """Recover Llama 3.x `rope_type: llama3` parameters from llama.cpp's rope_freqs tensor.

    llama.cpp stores the per-frequency divisors instead of the parameters. Every
    released Llama 3.x uses low/high frequency factors 1 and 4 over an 8192-token
    original context, so we rebuild the divisors from those and accept them only
    if they reproduce the stored tensor.
    """
    factor = max(freq_factors)
    if factor <= 1.0 + 1e-6:
        return {}
    low, high, orig = 1.0, 4.0, 8192
    expected = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * rope_theta ** (i / head_dim)
        if wavelen < orig / high:
            expected.append(1.0)
        elif wavelen > orig / low:
            expected.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            expected.append(1.0 / ((1 - smooth) / factor + smooth))
    if len(expected) != len(freq_factors) or not np.allclose(expected, freq_factors, rtol=1e-3):
        raise GGUFError(
            "rope_freqs.weight does not match Llama 3 rope scaling; this GGUF's RoPE variant is not supported"
        )
    return {
        "rope_type": "llama3",
        "factor": _f32(factor),
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": orig,
    }


def _layer_types(meta: _Meta, num_layers: int) -> list[str]:
    pattern = meta.arch_key("attention.sliding_window_pattern", _GEMMA3_SLIDING_PATTERN)
    if isinstance(pattern, list):  # one flag per layer, true = sliding window
        sliding = [bool(x) for x in pattern]
    else:
        sliding = [(i + 1) % int(pattern) != 0 for i in range(num_layers)]
    return ["sliding_attention" if s else "full_attention" for s in sliding]


def _gemma3_query_scalar(meta: _Meta, hidden: int, heads: int, head_dim: int) -> float:
    """Gemma 3 scales queries by query_pre_attn_scalar**-0.5; the GGUF rarely stores it.

    It is head_dim for every size except 27B (62 layers), which uses
    hidden_size / num_heads (168 there); llama.cpp special-cases it the same way.
    """
    scale = meta.arch_key("attention.scale")
    if scale:
        return 1.0 / float(scale) ** 2
    if meta.arch_int("block_count") == 62:
        return hidden // heads
    return head_dim


def _build_config(meta: _Meta, reader: Any, arch: _Arch, tensors: dict[str, Any]) -> dict[str, Any]:
    hidden = meta.arch_int("embedding_length")
    heads = meta.arch_int("attention.head_count")
    kv_heads = meta.arch_int("attention.head_count_kv", heads)
    layers = meta.arch_int("block_count")
    head_dim = meta.arch_int("attention.key_length", hidden // heads)
    rope_theta = _f32(meta.arch_key("rope.freq_base", 10_000.0))
    vocab_size = int(tensors["token_embd.weight"].shape[-1])  # ggml order: [hidden, vocab]
    rotary_dim = meta.arch_int("rope.dimension_count", head_dim)
    scaling = _rope_scaling(meta, reader, rotary_dim, rope_theta)

    cfg: dict[str, Any] = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": meta.arch_int("feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": meta.arch_int("context_length"),
        "rms_norm_eps": _f32(meta.arch_key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta, **scaling},
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": "output.weight" not in tensors,
        "use_cache": True,
        "bos_token_id": _token_id(meta, "bos"),
        "eos_token_id": _token_id(meta, "eos"),
        "pad_token_id": _token_id(meta, "padding"),
        # transformers 5 reads `dtype`; older readers (and most Hub configs) use `torch_dtype`.
        "dtype": "bfloat16",
        "torch_dtype": "bfloat16",
    }
    if rotary_dim != head_dim and arch.model_type != "phi3":
        raise GGUFError(f"{meta.arch}: partial rotary embeddings ({rotary_dim} of {head_dim} dims) are not supported")

    if arch.model_type == "llama":
        cfg["mlp_bias"] = False
    elif arch.model_type == "qwen2":
        # Qwen2 always has q/k/v biases; the flag is not a Qwen2 config field.
        del cfg["attention_bias"]
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=layers)
    elif arch.model_type == "qwen3":
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=layers)
    elif arch.model_type == "gemma3_text":
        local_theta = _f32(meta.arch_key("rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_BASE))
        del cfg["hidden_act"]
        cfg.update(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=_gemma3_query_scalar(meta, hidden, heads, head_dim),
            sliding_window=meta.arch_int("attention.sliding_window"),
            sliding_window_pattern=_GEMMA3_SLIDING_PATTERN,
            layer_types=_layer_types(meta, layers),
            rope_local_base_freq=local_theta,
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": rope_theta, **scaling},
                "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
            },
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
            use_bidirectional_attention=False,
        )
    elif arch.model_type == "phi3":
        # Phi-3 has no head_dim field: it derives hidden_size // num_attention_heads.
        del cfg["head_dim"], cfg["attention_bias"]
        orig_ctx = meta.arch_int("rope.scaling.original_context_length", cfg["max_position_embeddings"])
        rope = {"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": rotary_dim / head_dim}
        long_factor = _rope_tensor(reader, "rope_factors_long.weight")
        short_factor = _rope_tensor(reader, "rope_factors_short.weight")
        if long_factor is not None and short_factor is not None:
            rope.update(rope_type="longrope", long_factor=long_factor, short_factor=short_factor)
            attn_factor = meta.arch_key("rope.scaling.attn_factor")
            if attn_factor is not None:
                rope["attention_factor"] = _f32(attn_factor)
        cfg.update(
            original_max_position_embeddings=orig_ctx,
            partial_rotary_factor=rotary_dim / head_dim,
            rope_parameters=rope,
            sliding_window=meta.arch_key("attention.sliding_window"),
        )
    return cfg


def _generation_config(meta: _Meta, tokens: list[str] | None) -> dict[str, Any]:
    eos = [_token_id(meta, name) for name in ("eos", "eot", "eom")]
    # Hugging Face's Gemma 3 generation config also stops at the end of a chat turn.
    if meta.arch == "gemma3" and tokens is not None and "<end_of_turn>" in tokens:
        eos.append(tokens.index("<end_of_turn>"))
    eos_ids = list(dict.fromkeys(i for i in eos if i is not None))
    gen: dict[str, Any] = {"bos_token_id": _token_id(meta, "bos")}
    gen["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None)
    if _token_id(meta, "padding") is not None:
        gen["pad_token_id"] = _token_id(meta, "padding")
    return gen


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

# Pre-tokenizer split regexes of the original Hugging Face tokenizers, keyed by
# llama.cpp's `tokenizer.ggml.pre` names. The BPE merges were learned on words
# cut this way, so a different split gives different (worse) ids.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
}
# Llama 3's tokenizer.json sets `ignore_merges`: a word found whole in the vocab is not re-merged.
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx"}
# Tokenizers that normalize to NFC before splitting (Qwen2's tokenizer.json does).
_NFC = {"qwen2", "deepseek-r1-qwen"}
# Plain GPT-2 byte-level splitting (optionally with one token per digit, as StarCoder/SmolLM do).
_GPT2_PRE = {"default", "gpt2", "gpt-2", "starcoder", "refact", "smollm"}
_SINGLE_DIGITS = {"starcoder", "refact", "smollm"}


@dataclass(slots=True)
class _Vocab:
    model: str
    tokens: list[str]
    types: list[int]
    add_bos: bool
    add_eos: bool
    bos: int | None
    eos: int | None
    unk: int | None
    pad: int | None


def _read_vocab(meta: _Meta) -> _Vocab | None:
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        return None
    tokens = meta.require("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFError(f"{meta._path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    # llama.cpp adds BOS for SentencePiece vocabularies that do not say otherwise.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))
    return _Vocab(
        model=model,
        tokens=tokens,
        types=[int(t) for t in types],
        add_bos=add_bos,
        add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        bos=_token_id(meta, "bos"),
        eos=_token_id(meta, "eos"),
        unk=_token_id(meta, "unknown"),
        pad=_token_id(meta, "padding"),
    )


def _spm_merges(tokens: list[str], types: list[int], scores: list[float]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece BPE vocabulary.

    SentencePiece BPE stores no merge list: it repeatedly joins the adjacent pair
    whose joined piece has the highest score. The same rule as a ranked merge
    list: (a, b) exists when a, b and a+b are normal pieces, ranked by the score
    of a+b (ties broken by the ids of a and b).
    """
    ids = {t: i for i, t in enumerate(tokens) if types[i] == _NORMAL}
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, piece_id in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            left_id, right_id = ids.get(left), ids.get(right)
            if left_id is not None and right_id is not None:
                ranked.append((-scores[piece_id], left_id, right_id, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _build_tokenizer(meta: _Meta, vocab: _Vocab) -> Any:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    tokens = list(vocab.tokens)
    if vocab.model == "llama":
        # llama.cpp writes SentencePiece user-defined pieces with real spaces (so its
        # own matcher finds "  " in raw text); Hugging Face spells them with "▁".
        tokens = [
            t.replace(" ", _SPIECE_SPACE) if vocab.types[i] == _USER_DEFINED else t for i, t in enumerate(tokens)
        ]
    ids: dict[str, int] = {}
    for i, t in enumerate(tokens):
        ids.setdefault(t, i)  # a duplicated piece keeps its first id, as llama.cpp does
    if len(ids) != len(tokens):
        dupes = len(tokens) - len(ids)
        logger.warning("GGUF vocabulary has %d duplicated tokens; the later copies are unreachable", dupes)

    merges_raw = meta.get("tokenizer.ggml.merges")
    pre = meta.get("tokenizer.ggml.pre", "default")

    if vocab.model == "gpt2":
        if merges_raw is None:
            raise GGUFError(f"{meta._path}: a gpt2 (byte-level BPE) vocabulary needs tokenizer.ggml.merges")
        merges = [_split_merge(m) for m in merges_raw]
        bpe = BPE(vocab=ids, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=pre in _IGNORE_MERGES)
        tok = Tokenizer(bpe)
        if pre in _SPLITS:
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        else:
            if pre not in _GPT2_PRE:
                logger.warning("unknown tokenizer.ggml.pre %r: splitting words the GPT-2 way; ids may differ", pre)
            steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
            if pre in _SINGLE_DIGITS:
                steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
            tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
        if pre in _NFC:
            tok.normalizer = normalizers.NFC()
        tok.decoder = decoders.ByteLevel()
        base_processor = processors.ByteLevel(trim_offsets=False)
    elif vocab.model == "llama":
        if merges_raw is not None:
            merges = [_split_merge(m) for m in merges_raw]
        else:
            scores = meta.get("tokenizer.ggml.scores")
            if scores is None:
                raise GGUFError(f"{meta._path}: a SentencePiece vocabulary needs tokenizer.ggml.scores or merges")
            merges = _spm_merges(tokens, vocab.types, [float(s) for s in scores])
        unk = tokens[vocab.unk] if vocab.unk is not None else None
        tok = Tokenizer(BPE(vocab=ids, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
        add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        steps = [normalizers.Replace(" ", _SPIECE_SPACE)]
        if add_prefix:
            steps.insert(0, normalizers.Prepend(_SPIECE_SPACE))
        tok.normalizer = normalizers.Sequence(steps)
        dec = [decoders.Replace(_SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix:
            dec.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(dec)
        base_processor = None
    else:
        raise GGUFError(
            f"{meta._path}: tokenizer model {vocab.model!r} is not supported (supported: gpt2, llama); "
            "convert the original Hugging Face tokenizer instead"
        )

    # Control tokens (<|im_start|>, <eos>, ...) are special: matched whole, skippable when
    # decoding. User-defined ones (<tool_call>, "\n\n" in Gemma) are matched whole but
    # are ordinary text. SentencePiece matches user-defined pieces after normalization.
    added = []
    for i, t in enumerate(tokens):
        kind = vocab.types[i]
        if kind in (_CONTROL, _UNKNOWN):
            added.append(AddedToken(t, special=True, normalized=False))
        elif kind == _USER_DEFINED:
            added.append(AddedToken(t, special=False, normalized=vocab.model == "llama"))
    tok.add_special_tokens([a for a in added if a.special])
    tok.add_tokens([a for a in added if not a.special])

    template = _bos_eos_processor(vocab, tokens)
    steps = [p for p in (base_processor, template) if p is not None]
    if len(steps) == 1:
        tok.post_processor = steps[0]
    elif steps:
        tok.post_processor = processors.Sequence(steps)

    size = tok.get_vocab_size(with_added_tokens=True)
    if size != len(ids):
        raise GGUFError(f"{meta._path}: rebuilt tokenizer has {size} tokens, expected {len(ids)}; report this file")
    return tok


def _split_merge(merge: str) -> tuple[str, str]:
    parts = merge.split(" ")
    if len(parts) != 2:
        raise GGUFError(f"malformed merge {merge!r} in tokenizer.ggml.merges; the GGUF file is corrupt")
    return parts[0], parts[1]


def _bos_eos_processor(vocab: _Vocab, tokens: list[str]) -> Any:
    from tokenizers import processors

    add_bos = vocab.add_bos and vocab.bos is not None
    add_eos = vocab.add_eos and vocab.eos is not None
    if not (add_bos or add_eos):
        return None
    bos = tokens[vocab.bos] if add_bos else None
    eos = tokens[vocab.eos] if add_eos else None
    single = " ".join(x for x in (bos, "$A", eos) if x)
    pair = " ".join(x for x in (bos, "$A", eos, f"{bos}:1" if bos else None, "$B:1", f"{eos}:1" if eos else None) if x)
    specials = [(t, i) for t, i in ((bos, vocab.bos), (eos, vocab.eos)) if t]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _tokenizer_config(meta: _Meta, vocab: _Vocab, max_len: int) -> dict[str, Any]:
    def name(token_id: int | None) -> str | None:
        return vocab.tokens[token_id] if token_id is not None and 0 <= token_id < len(vocab.tokens) else None

    cfg: dict[str, Any] = {
        # transformers 5 loads tokenizer.json as is under this class; model-specific
        # classes would rebuild parts of the pipeline from their own defaults.
        "tokenizer_class": "TokenizersBackend",
        "bos_token": name(vocab.bos),
        "eos_token": name(vocab.eos),
        "pad_token": name(vocab.pad),
        "unk_token": name(vocab.unk),
        "add_bos_token": vocab.add_bos,
        "add_eos_token": vocab.add_eos,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    return cfg


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Planned:
    hf_name: str
    tensor: Any  # gguf ReaderTensor
    shape: tuple[int, ...]  # Hugging Face order: [out_features, in_features]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * 2  # bf16


_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias)$")
_TOP_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")


def _hf_name(gguf_name: str, arch: _Arch) -> str:
    m = _BLOCK_RE.match(gguf_name)
    if m:
        layer, base, kind = m.groups()
        hf = arch.block_names.get(base, _BLOCK_NAMES.get(base))
        if hf is not None:
            return f"model.layers.{layer}.{hf}.{kind}"
    else:
        m = _TOP_RE.match(gguf_name)
        if m and m.group(1) in _TOP_NAMES:
            return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    raise GGUFError(
        f"tensor {gguf_name!r} has no Hugging Face equivalent for {arch.hf_class}; this GGUF variant is not supported"
    )


def _sort_key(name: str) -> tuple[int, int, str]:
    # Embeddings first, then layers in numeric order, then the final norm and head,
    # so that shards hold consecutive layers.
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)), name)
    return (0 if "embed_tokens" in name else 2, 0, name)


def _plan(reader: Any, arch: _Arch) -> list[_Planned]:
    planned = []
    for t in reader.tensors:
        if t.name in _ROPE_TENSORS:
            continue
        # ggml lists dimensions fastest-first; Hugging Face (row-major) the reverse.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        planned.append(_Planned(_hf_name(t.name, arch), t, shape))
    planned.sort(key=lambda p: _sort_key(p.hf_name))
    return planned


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (per head: pairs interleaved -> two halves).

    llama.cpp's converter views each head's rows as [2, head_dim/2] and transposes
    to [head_dim/2, 2], so RoPE can rotate adjacent rows. We transpose back.
    """
    rows = w.shape[0]
    head_dim = rows // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def _load_tensor(p: _Planned, arch: _Arch, heads: int, kv_heads: int) -> np.ndarray:
    import gguf

    t = p.tensor
    try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as exc:
        raise GGUFError(
            f"tensor {t.name} uses {t.tensor_type.name}, which this gguf package cannot dequantize; pip install -U gguf"
        ) from exc
    # F32/F16 tensors come back as read-only views of the memory-mapped file; torch wants writable memory.
    w = np.require(w, np.float32, ["C", "W"]).reshape(p.shape)
    if arch.permute_qk:
        if ".self_attn.q_proj." in p.hf_name:
            w = _unpermute_rows(w, heads)
        elif ".self_attn.k_proj." in p.hf_name:
            w = _unpermute_rows(w, kv_heads)
    if arch.norm_offset and t.name.endswith("norm.weight"):
        w = w - arch.norm_offset
    return w


def _to_bf16_bytes(w: np.ndarray) -> memoryview:
    import torch

    # numpy has no bfloat16: round in torch, then hand the raw 16-bit words to the file without a copy.
    return memoryview(torch.from_numpy(w).to(torch.bfloat16).view(torch.int16).numpy()).cast("B")


def _shards(planned: list[_Planned], shard_bytes: int) -> list[list[_Planned]]:
    shards: list[list[_Planned]] = [[]]
    size = 0
    for p in planned:
        if shards[-1] and size + p.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return shards


def _write_safetensors(path: Path, tensors: list[_Planned], load: Callable[[_Planned], np.ndarray]) -> None:
    """Stream tensors into one safetensors file without holding them all in memory.

    The header (names, dtypes, shapes, byte ranges) is known from the GGUF
    metadata before any tensor is dequantized, so it is written first and each
    tensor's bytes follow as soon as it is converted.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for p in tensors:
        header[p.hf_name] = {"dtype": "BF16", "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the spec pads the header so tensor data is 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for p in tensors:
            data = _to_bf16_bytes(load(p))
            if len(data) != p.nbytes:
                raise GGUFError(f"tensor {p.tensor.name} dequantized to {len(data)} bytes, expected {p.nbytes}")
            f.write(data)


def _write_weights(
    out: Path, planned: list[_Planned], shard_bytes: int, load: Callable[[_Planned], np.ndarray]
) -> None:
    shards = _shards(planned, shard_bytes)
    if len(shards) == 1:
        _write_safetensors(out / "model.safetensors", shards[0], load)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(out / name, shard, load)
        weight_map.update({p.hf_name: name for p in shard})
    index = {"metadata": {"total_size": sum(p.nbytes for p in planned)}, "weight_map": weight_map}
    _write_json(out / "model.safetensors.index.json", index)


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise GGUFError(f"{out_dir} exists and is not a folder; choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise GGUFError(
            f"{out_dir} already exists and is not empty; pass overwrite=True (--overwrite) or choose another folder"
        )


def import_gguf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    shard_bytes: int = 4 * 2**30,
) -> Path:
    """Convert a GGUF file into a Hugging Face model folder at `out_dir`.

    The folder holds config.json, generation_config.json, tokenizer.json,
    tokenizer_config.json (+ chat_template.jinja when the GGUF has one) and bf16
    safetensors (sharded at `shard_bytes`). It is written to a temporary sibling
    folder and renamed into place, so `out_dir` is either complete or absent.
    Raises GGUFError for unreadable files, unsupported architectures or an
    existing non-empty `out_dir` (unless `overwrite`).
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise GGUFError(f"{gguf_path} does not exist or is not a file; check the path")
    if shard_bytes <= 0:
        raise GGUFError(f"shard_bytes must be positive, got {shard_bytes}")
    _check_target(out_dir, overwrite)

    reader = _open_reader(gguf_path)
    meta = _Meta(reader, gguf_path)
    arch = _ARCHS.get(meta.arch)
    if arch is None:
        raise GGUFError(
            f"{gguf_path}: GGUF architecture {meta.arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{gguf_path} has no token_embd.weight tensor; the file is incomplete")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        config = _build_config(meta, reader, arch, tensors)
        planned = _plan(reader, arch)
        vocab = _read_vocab(meta)

        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", _generation_config(meta, vocab.tokens if vocab else None))
        if vocab is None:
            logger.warning("%s has no tokenizer metadata; the folder will have no tokenizer", gguf_path)
        else:
            _build_tokenizer(meta, vocab).save(str(tmp / "tokenizer.json"))
            tok_cfg = _tokenizer_config(meta, vocab, config["max_position_embeddings"])
            _write_json(tmp / "tokenizer_config.json", tok_cfg)
            if "chat_template" in tok_cfg:
                (tmp / "chat_template.jinja").write_text(tok_cfg["chat_template"], encoding="utf-8")

        heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        _write_weights(tmp, planned, shard_bytes, lambda p: _load_tensor(p, arch, heads, kv_heads))
        _replace_dir(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("imported %s (%s) into %s", gguf_path, arch.hf_class, out_dir)
    return out_dir


def _replace_dir(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished folder into place (re-checking: another writer may have won)."""
    _check_target(out_dir, overwrite)
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m trellm.io.gguf_import MODEL.gguf OUT_DIR [--overwrite]."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Import a GGUF file as a Hugging Face model folder.")
    parser.add_argument("gguf", help="path of the .gguf file")
    parser.add_argument("out_dir", help="folder to create")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = import_gguf(args.gguf, args.out_dir, overwrite=args.overwrite)
    except GGUFError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
