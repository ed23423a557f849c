"""Tokenizer of a Hugging Face model folder, giving the ids transformers gives.

The heavy lifting is the ``tokenizers`` library reading ``tokenizer.json``. What this
module adds is the part of transformers' loading logic (version 5.x) that changes the
ids, so that ``Tokenizer.from_folder(p).encode(text)`` equals
``AutoTokenizer.from_pretrained(p)(text)["input_ids"]``:

* **BOS/EOS.** With a ``tokenizer.json`` present, transformers 5 drops
  ``add_bos_token``/``add_eos_token`` from ``tokenizer_config.json``
  (``PreTrainedTokenizerBase._from_pretrained``) and keeps the post-processor stored in
  ``tokenizer.json``: that post-processor alone decides whether BOS/EOS are added.
  Exception: ``GPTNeoXTokenizer`` rebuilds its post-processor from the (now absent)
  flags, so it never adds BOS/EOS.
* **Rebuilt pipelines.** A few tokenizer classes named by ``tokenizer_class`` have their
  own ``__init__`` that keeps only vocab, merges and post-processor from
  ``tokenizer.json`` and sets a fixed normalizer, pre-tokenizer, decoder and BPE options
  (``Qwen2Tokenizer`` adds NFC normalization, ``GPT2Tokenizer`` drops any normalizer,
  ``LlamaTokenizer`` uses a Metaspace pre-tokenizer...). Those classes are mirrored in
  ``_PIPELINES``; any other class loads ``tokenizer.json`` unchanged, as transformers'
  ``TokenizersBackend`` does.
* **Special tokens.** Named special tokens from the config that are not yet added
  tokens become special added tokens (matched whole in the text), as do
  ``added_tokens_decoder`` entries; truncation and padding stored in
  ``tokenizer.json`` are switched off (transformers only applies them on request).

Chat prompts are rendered by :class:`~trellm.io.chat_template.ChatTemplate` and
tokenized with ``add_special_tokens=False``, as transformers does: the template writes
the BOS itself, so the post-processor must not add a second one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors

from trellm.errors import ChatTemplateError, TokenizerError
from trellm.io.chat_template import ChatTemplate

logger = logging.getLogger(__name__)

__all__ = ["Tokenizer", "IncrementalDetokenizer"]

# The named special tokens transformers knows (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES).
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# transformers writes int(1e30) for "no limit" into model_max_length.
_NO_MAX_LENGTH = 10**29

# Qwen2Tokenizer's fixed pre-tokenization regex (the same one Qwen ships in tokenizer.json).
_QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


# ---------------------------------------------------------------------------------------
# Class-specific pipelines (transformers 5.x, models/<name>/tokenization_<name>.py)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Pipeline:
    """How a transformers tokenizer class rebuilds the backend from tokenizer.json."""

    # Called with (backend, tokenizer_config, unk_token) to set normalizer, pre-tokenizer,
    # decoder and BPE options in place.
    configure: Callable[[tokenizers.Tokenizer, Mapping[str, Any], str | None], None]
    # Class defaults for special tokens missing from the config (constructor defaults).
    defaults: Mapping[str, str | None]
    # None: keep tokenizer.json's post-processor; else (add_bos, add_eos) to rebuild it with.
    post_processor_flags: tuple[bool, bool] | None = None


def _set_bpe(backend: tokenizers.Tokenizer, **options: Any) -> None:
    model = backend.model
    if not isinstance(model, tokenizers.models.BPE):
        # The class expects BPE; a different model means the folder's tokenizer_class is
        # stale, and transformers itself would fail. Keep the model as stored.
        logger.warning("tokenizer.json holds a %s model where BPE was expected; using it unchanged", type(model).__name__)
        return
    options.setdefault("dropout", None)
    options.setdefault("ignore_merges", False)
    for name, value in options.items():
        setattr(model, name, value)


def _configure_qwen2(backend: tokenizers.Tokenizer, config: Mapping[str, Any], unk: str | None) -> None:
    _set_bpe(backend, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space") or False), use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()


def _configure_gemma(backend: tokenizers.Tokenizer, config: Mapping[str, Any], unk: str | None) -> None:
    _set_bpe(backend, unk_token=unk, fuse_unk=True, byte_fallback=True)
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])


def _configure_gpt2(backend: tokenizers.Tokenizer, config: Mapping[str, Any], unk: str | None) -> None:
    _set_bpe(backend, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space") or False))
    backend.decoder = decoders.ByteLevel()


def _configure_gpt_neox(backend: tokenizers.Tokenizer, config: Mapping[str, Any], unk: str | None) -> None:
    _set_bpe(backend, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=bool(config.get("add_prefix_space") or False),
        trim_offsets=bool(config.get("trim_offsets", True)),
    )
    backend.decoder = decoders.ByteLevel()


def _configure_cohere(backend: tokenizers.Tokenizer, config: Mapping[str, Any], unk: str | None) -> None:
    add_prefix_space = bool(config.get("add_prefix_space") or False)
    _set_bpe(backend, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, trim_offsets=True),
        ]
    )
    backend.decoder = decoders.ByteLevel(add_prefix_space=add_prefix_space, trim_offsets=True)


def _configure_llama(backend: tokenizers.Tokenizer, config: Mapping[str, Any], unk: str | None) -> None:
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    legacy = bool(config.get("legacy", False))
    # "first" prepends the SentencePiece space only at the very start of the text (not
    # after each special token); legacy Llama tokenizers prepended it everywhere.
    prepend_scheme = ("always" if legacy else "first") if add_prefix_space else "never"
    _set_bpe(backend, unk_token=None, fuse_unk=True, byte_fallback=True)
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)


_PIPELINES: dict[str, _Pipeline] = {
    "Qwen2Tokenizer": _Pipeline(
        _configure_qwen2, {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    ),
    "GemmaTokenizer": _Pipeline(
        _configure_gemma,
        {"unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "mask_token": "<mask>"},
    ),
    "GPT2Tokenizer": _Pipeline(
        _configure_gpt2, {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    ),
    "GPTNeoXTokenizer": _Pipeline(
        _configure_gpt_neox,
        {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|padding|>"},
        post_processor_flags=(False, False),
    ),
    "CohereTokenizer": _Pipeline(
        _configure_cohere,
        {
            "unk_token": "<UNK>",
            "bos_token": "<BOS_TOKEN>",
            "eos_token": "<|END_OF_TURN_TOKEN|>",
            "pad_token": "<PAD>",
            "cls_token": "<CLS>",
            "sep_token": "<SEP>",
            "mask_token": "<MASK_TOKEN>",
        },
    ),
    "LlamaTokenizer": _Pipeline(_configure_llama, {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}),
}

# The tokenizer class transformers registers for a model_type (TOKENIZER_MAPPING_NAMES),
# restricted to the classes mirrored above and to the model types registered as the
# plain backend ("" below). Unlisted model types defer to the folder's tokenizer_class.
_BACKEND = ""
_CLASS_FOR_MODEL_TYPE: dict[str, str] = {
    **dict.fromkeys(
        (
            "qwen2", "qwen2_moe", "qwen2_vl", "qwen2_5_vl", "qwen2_audio", "qwen2_5_omni", "qwen3",
            "qwen3_moe", "qwen3_next", "qwen3_vl", "qwen3_vl_moe", "qwen3_omni_moe", "internvl",
        ),
        "Qwen2Tokenizer",
    ),
    **dict.fromkeys(
        ("gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text", "recurrent_gemma", "t5gemma"),
        "GemmaTokenizer",
    ),
    **dict.fromkeys(("gpt2", "gpt_neo", "gptj", "codegen", "opt", "phi", "starcoder2", "dbrx"), "GPT2Tokenizer"),
    **dict.fromkeys(("gpt_neox", "olmo", "olmoe", "mpt", "mamba", "mamba2", "falcon_mamba"), "GPTNeoXTokenizer"),
    **dict.fromkeys(("cohere", "cohere2", "aya_vision"), "CohereTokenizer"),
    **dict.fromkeys(
        (
            "mistral", "mixtral", "mistral3", "ministral", "ministral3", "pixtral", "phi3", "phi3_v", "phimoe",
            "glm", "glm4", "glm4_moe", "glm4_moe_lite", "glm4v", "glm4v_moe", "olmo2", "olmo3", "flex_olmo",
            "ernie4_5", "ernie4_5_moe", "minimax_m2", "iquestcoder", "hyperclovax", "granite", "granitemoe",
            "granitemoehybrid", "granitemoeshared", "stablelm", "persimmon", "jamba", "internlm2", "internlm3",
            "nemotron", "gpt_bigcode", "kimi_linear", "minicpm3", "llava", "llava_next", "smolvlm", "arctic",
        ),
        _BACKEND,
    ),
}

# Model types whose Hub tokenizer_class transformers distrusts
# (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS): the registered class wins over it.
_HUB_CLASS_DISTRUSTED = frozenset(
    {
        "phi3", "phi3_v", "phimoe", "qwen2", "internlm2", "internlm3", "jamba", "minimax_m2", "ernie4_5",
        "ernie4_5_moe", "nemotron", "iquestcoder", "hyperclovax", "llava", "llava_next", "smolvlm", "arctic",
    }
)


def _is_byte_level(backend: tokenizers.Tokenizer) -> bool:
    """Whether any pipeline component of tokenizer.json is a ByteLevel one."""
    components = (backend.normalizer, backend.pre_tokenizer, backend.decoder, backend.post_processor)
    return any(c is not None and b'"ByteLevel"' in c.__getstate__() for c in components)


def _resolve_class(config: Mapping[str, Any], model_config: Mapping[str, Any], backend: tokenizers.Tokenizer) -> str | None:
    """Name of the transformers tokenizer class the folder loads as (None: plain backend).

    Follows AutoTokenizer.from_pretrained (transformers 5): the folder's tokenizer_class,
    unless the model_type registers another class, in which case a plain-backend
    registration or a distrusted Hub class gives the registered one.
    """
    hub = config.get("tokenizer_class") or model_config.get("tokenizer_class")
    hub = hub.removesuffix("Fast") if isinstance(hub, str) else None
    model_type = model_config.get("model_type")
    registered = _CLASS_FOR_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
    if hub is None:
        name = registered
    elif registered is not None and registered != hub:
        if registered == _BACKEND:
            name = None
        else:
            name = registered if model_type in _HUB_CLASS_DISTRUSTED else hub
    else:
        name = hub
    # transformers loads a "LlamaTokenizer" folder whose tokenizer.json is byte-level
    # (Llama 3 style) as a plain backend: LlamaTokenizer would force SentencePiece's Metaspace.
    if name == "LlamaTokenizer" and _is_byte_level(backend):
        name = None
    if name in ("TokenizersBackend", "PreTrainedTokenizer", _BACKEND):
        name = None
    if name is not None and name not in _PIPELINES:
        logger.debug("tokenizer class %s is not mirrored; using tokenizer.json as stored", name)
    return name


# ---------------------------------------------------------------------------------------
# Folder reading helpers
# ---------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path} is not valid JSON ({exc}); restore the file from the original model") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} should hold a JSON object; restore the file from the original model")
    return data


def _token_content(value: Any) -> str | None:
    """A special token given as a string or as an AddedToken dict ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _added_token(value: Any, *, special: bool) -> AddedToken | None:
    """An AddedToken from a string or a dict; ``special=True`` forces the special flag.

    transformers marks every named special token (bos_token...) special, whatever its
    dict says, so that ``skip_special_tokens`` drops it.
    """
    if isinstance(value, str):
        return AddedToken(value, special=special, normalized=not special)
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        known = ("single_word", "lstrip", "rstrip", "normalized", "special")
        kwargs = {k: bool(value[k]) for k in known if k in value}
        if special:
            kwargs["special"] = True
        return AddedToken(value["content"], **kwargs)
    return None


def _first_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, list) and value and isinstance(value[0], int) and not isinstance(value[0], bool):
        return value[0]
    return None


def _chat_template_sources(folder: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Named chat template sources; the unnamed one is "default".

    As in transformers, standalone .jinja files (``chat_template.jinja`` and
    ``additional_chat_templates/<name>.jinja``) replace any template stored in JSON.
    Among JSON sources, a processor's ``chat_template.json`` wins over
    ``tokenizer_config.json``.
    """
    templates: dict[str, str] = {}
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        templates["default"] = jinja_file.read_text(encoding="utf-8")
    extra_dir = folder / "additional_chat_templates"
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.stem] = path.read_text(encoding="utf-8")
    if templates:
        return templates

    raw: Any = config.get("chat_template")
    processor_file = _read_json(folder / "chat_template.json")
    if processor_file is not None and processor_file.get("chat_template") is not None:
        raw = processor_file["chat_template"]
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):
        for entry in raw:
            if not (
                isinstance(entry, Mapping) and isinstance(entry.get("name"), str) and isinstance(entry.get("template"), str)
            ):
                raise TokenizerError(
                    "chat_template in tokenizer_config.json must be a string or a list of {'name', 'template'} dicts; "
                    "fix the file or add a chat_template.jinja"
                )
            templates[entry["name"]] = entry["template"]
    elif isinstance(raw, Mapping):
        templates.update({str(k): v for k, v in raw.items() if isinstance(v, str)})
    elif raw is not None:
        raise TokenizerError("chat_template must be a string; fix tokenizer_config.json or add a chat_template.jinja")
    return templates


# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------


class Tokenizer:
    """Text <-> token ids, plus chat templates, for one model.

    Build it with :meth:`from_folder`. An instance can be shared between threads: the
    ``tokenizers`` backend is thread-safe and nothing here changes after loading except
    idempotent caches.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str] | None = None,
        chat_templates: Mapping[str, str] | None = None,
        fallback_bos_token_id: int | None = None,
        fallback_eos_token_id: int | None = None,
        model_max_length: int | None = None,
        name: str = "",
    ) -> None:
        self._backend = backend
        self._special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self._chat_template_sources = dict(chat_templates or {})
        self._compiled_templates: dict[str, ChatTemplate] = {}
        self._fallback_bos_token_id = fallback_bos_token_id
        self._fallback_eos_token_id = fallback_eos_token_id
        self.model_max_length = model_max_length
        self.name = name
        self._added = {i: t for i, t in backend.get_added_tokens_decoder().items()}
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._byte_fallback_ids: frozenset[int] | None = None

    # -- loading ----------------------------------------------------------------------

    @classmethod
    def from_folder(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load the tokenizer of a Hugging Face model folder."""
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"tokenizer folder {folder} does not exist; pass the model's folder")
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(
                f"{folder} has no tokenizer.json, which is required; copy it from the original model "
                "(a 'fast' tokenizer, e.g. saved by transformers' save_pretrained)"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust parser raises plain Exception
            raise TokenizerError(f"cannot read {tokenizer_file} ({exc}); restore it from the original model") from exc

        config = _read_json(folder / "tokenizer_config.json") or {}
        model_config = _read_json(folder / "config.json") or {}
        generation_config = _read_json(folder / "generation_config.json") or {}
        # Multimodal configs keep the language model's ids under text_config.
        text_config = model_config.get("text_config") if isinstance(model_config.get("text_config"), dict) else {}

        # transformers reads special_tokens_map.json only for old folders whose
        # tokenizer_config.json has no added_tokens_decoder, and then lets it override.
        if "added_tokens_decoder" not in config:
            special_map = _read_json(folder / "special_tokens_map.json") or {}
            config = {**config, **{k: v for k, v in special_map.items() if k.endswith("_token") or k.endswith("_tokens")}}

        class_name = _resolve_class(config, model_config, backend)
        pipeline = _PIPELINES.get(class_name) if class_name else None
        logger.debug("tokenizer %s loads as %s", folder, class_name or "TokenizersBackend")

        # Named special tokens: config values, else the class's constructor defaults.
        named: dict[str, Any] = dict(pipeline.defaults) if pipeline else {}
        for key in _NAMED_SPECIAL_TOKENS:
            if key in config:
                named[key] = config[key]
        # Model-specific named tokens (image_token, ...) are special tokens and template
        # variables in transformers 5 too.
        for key, value in config.items():
            if key.endswith("_token") and key not in named and _token_content(value) is not None:
                named[key] = value
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(extra, Mapping):
            named.update({k: v for k, v in extra.items() if _token_content(v) is not None})
            extra = []

        if pipeline is not None:
            pipeline.configure(backend, config, _token_content(named.get("unk_token")))

        # Tokens transformers adds on top of tokenizer.json: added_tokens_decoder entries and
        # special tokens that are not added tokens yet (so they match whole in text).
        present = {t.content for t in backend.get_added_tokens_decoder().values()}
        to_add: list[AddedToken] = []
        for _, value in sorted(_int_keyed(config.get("added_tokens_decoder") or {}).items()):
            token = _added_token(value, special=False)
            if token is not None and token.content not in present:
                to_add.append(token)
                present.add(token.content)
        for value in [*named.values(), *(extra if isinstance(extra, list) else [])]:
            token = _added_token(value, special=True)
            if token is not None and token.content not in present:
                to_add.append(token)
                present.add(token.content)
        # add_special_tokens would mark every token special; keep each token's own flag.
        if normal := [t for t in to_add if not t.special]:
            backend.add_tokens(normal)
        if special := [t for t in to_add if t.special]:
            backend.add_special_tokens(special)

        if pipeline is not None and pipeline.post_processor_flags is not None:
            backend.post_processor = _bos_eos_processor(backend, named, *pipeline.post_processor_flags)
        else:
            _log_ignored_bos_flags(config, backend, named)
        # transformers switches tokenizer.json's truncation/padding off for every call
        # unless asked; a stored truncation would silently cut prompts.
        backend.no_truncation()
        backend.no_padding()
        # split_special_tokens makes special-token strings in the text ordinary text.
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))

        special_strings = {k: _token_content(v) for k, v in named.items()}
        max_length = config.get("model_max_length")
        return cls(
            backend,
            special_tokens={k: v for k, v in special_strings.items() if v is not None},
            chat_templates=_chat_template_sources(folder, config),
            fallback_bos_token_id=_first_int(
                generation_config.get("bos_token_id", model_config.get("bos_token_id", text_config.get("bos_token_id")))
            ),
            fallback_eos_token_id=_first_int(
                generation_config.get("eos_token_id", model_config.get("eos_token_id", text_config.get("eos_token_id")))
            ),
            model_max_length=max_length if isinstance(max_length, int) and 0 < max_length < _NO_MAX_LENGTH else None,
            name=folder.name,
        )

    # -- vocabulary -------------------------------------------------------------------

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (treat as read-only)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (transformers' ``len(tokenizer)``)."""
        return self._vocab_size

    @property
    def added_tokens(self) -> dict[int, str]:
        """Added tokens (special or not) by id."""
        return {i: t.content for i, t in self._added.items()}

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens (``bos_token``, ``eos_token``...) as strings."""
        return dict(self._special_tokens)

    @property
    def special_token_ids(self) -> set[int]:
        """Ids of the special tokens: those ``decode(..., skip_special_tokens=True)`` drops.

        Every named special token (bos, eos, pad...) is among them: loading registers
        each as a special added token, as transformers does.
        """
        return {i for i, t in self._added.items() if t.special}

    def _named_id(self, name: str) -> int | None:
        content = self._special_tokens.get(name)
        return self._backend.token_to_id(content) if content is not None else None

    @property
    def bos_token(self) -> str | None:
        return self._special_tokens.get("bos_token")

    @property
    def bos_token_id(self) -> int | None:
        token_id = self._named_id("bos_token")
        return token_id if token_id is not None else self._fallback_bos_token_id

    @property
    def eos_token(self) -> str | None:
        return self._special_tokens.get("eos_token")

    @property
    def eos_token_id(self) -> int | None:
        token_id = self._named_id("eos_token")
        return token_id if token_id is not None else self._fallback_eos_token_id

    @property
    def pad_token(self) -> str | None:
        return self._special_tokens.get("pad_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._named_id("pad_token")

    @property
    def unk_token(self) -> str | None:
        return self._special_tokens.get("unk_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._named_id("unk_token")

    @property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of the ``<0xNN>`` byte tokens when the decoder does SentencePiece byte fallback."""
        if self._byte_fallback_ids is None:
            ids = {}
            for byte in range(256):
                token_id = self._backend.token_to_id(f"<0x{byte:02X}>")
                if token_id is not None:
                    ids[byte] = token_id
            # Tested by behaviour rather than by decoder type: a byte-fallback decoder turns
            # <0x41> into "A", any other decoder leaves the token's text alone.
            active = 0x41 in ids and self._backend.decode([ids[0x41]]) == "A"
            self._byte_fallback_ids = frozenset(ids.values()) if active else frozenset()
        return self._byte_fallback_ids

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (as stored in the vocabulary), or None."""
        return self._backend.token_to_id(token)

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        """Token strings of ids (one string for one int, like transformers)."""
        if isinstance(ids, int):
            return self._id_to_token(ids)
        return [self._id_to_token(i) for i in ids]

    def _id_to_token(self, token_id: int) -> str:
        token = self._backend.id_to_token(token_id) if 0 <= token_id else None
        if token is None:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{self._vocab_size - 1})")
        return token

    # -- encode / decode --------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` lets the post-processor add BOS/EOS.

        Special-token strings inside ``text`` (``<|im_start|>``...) become their ids.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. Incomplete UTF-8 at the end decodes to U+FFFD, as in transformers."""
        ids = list(ids)
        for token_id in ids:
            if not isinstance(token_id, int) or token_id < 0:
                raise TokenizerError(f"decode() takes non-negative int token ids, got {token_id!r}")
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    # -- chat templates ---------------------------------------------------------------

    @property
    def chat_template_names(self) -> list[str]:
        return sorted(self._chat_template_sources)

    def get_chat_template(self, name: str | None = None, *, tools: Any = None) -> ChatTemplate | None:
        """The named template, else (like transformers) "tool_use" when tools are given, else "default"."""
        sources = self._chat_template_sources
        if name is None:
            name = "tool_use" if tools is not None and "tool_use" in sources else "default"
            if name not in sources:
                return None
        elif name not in sources:
            available = ", ".join(sorted(sources)) or "none"
            raise ChatTemplateError(f"this model has no chat template named {name!r}; available: {available}")
        template = self._compiled_templates.get(name)
        if template is None:
            template = ChatTemplate(sources[name], self._special_tokens)
            self._compiled_templates[name] = template
        return template

    @property
    def chat_template(self) -> ChatTemplate | None:
        """The default chat template, or None when the model has none."""
        return self.get_chat_template()

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        tokenize: bool = False,
        template_name: str | None = None,
    ) -> str | list[int]:
        """Render a conversation with the model's chat template (ids when ``tokenize``).

        The ids come from ``encode(text, add_special_tokens=False)``: the template writes
        BOS itself where the model expects it, so the post-processor must not add another.
        """
        template = self.get_chat_template(template_name, tools=tools)
        if template is None:
            if self._chat_template_sources:
                names = ", ".join(sorted(self._chat_template_sources))
                raise ChatTemplateError(f"this model has several chat templates and no default; pick one of: {names}")
            raise ChatTemplateError(
                "this model has no chat template (it is probably a base model); use plain prompts "
                "(pass --mode completion, or the /v1/completions endpoint) or supply a chat template"
            )
        text = template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            **dict(chat_template_kwargs or {}),
        )
        if tokenize:
            return self.encode(text, add_special_tokens=False)
        return text

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self._vocab_size})"


def _int_keyed(mapping: Mapping[Any, Any]) -> dict[int, Any]:
    out = {}
    for key, value in mapping.items():
        try:
            out[int(key)] = value
        except (TypeError, ValueError):
            raise TokenizerError(
                f"added_tokens_decoder in tokenizer_config.json has the non-integer key {key!r}; fix the file"
            ) from None
    return out


def _bos_eos_processor(
    backend: tokenizers.Tokenizer, named: Mapping[str, Any], add_bos: bool, add_eos: bool
) -> processors.TemplateProcessing:
    """The post-processor transformers builds from add_bos_token / add_eos_token."""
    bos, eos = _token_content(named.get("bos_token")), _token_content(named.get("eos_token"))
    add_bos = add_bos and bos is not None and backend.token_to_id(bos) is not None
    add_eos = add_eos and eos is not None and backend.token_to_id(eos) is not None
    single = " ".join([*([f"{bos}:0"] if add_bos else []), "$A:0", *([f"{eos}:0"] if add_eos else [])])
    pair = " ".join([single, *([f"{bos}:1"] if add_bos else []), "$B:1", *([f"{eos}:1"] if add_eos else [])])
    special = [(t, backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _log_ignored_bos_flags(config: Mapping[str, Any], backend: tokenizers.Tokenizer, named: Mapping[str, Any]) -> None:
    # A config asking for BOS while tokenizer.json never adds it (or the reverse) is a
    # common source of "why does my prompt lack <s>?" questions; transformers follows
    # tokenizer.json, and so do we, but say so.
    if "add_bos_token" not in config:
        return
    bos = _token_content(named.get("bos_token"))
    bos_id = backend.token_to_id(bos) if bos is not None else None
    if bos_id is None:
        return
    adds_bos = bos_id in backend.encode("a", add_special_tokens=True).ids[:1]
    if bool(config["add_bos_token"]) != adds_bos:
        logger.info(
            "tokenizer_config.json sets add_bos_token=%s but tokenizer.json's post-processor %s BOS; "
            "following tokenizer.json as transformers 5 does",
            config["add_bos_token"],
            "adds" if adds_bos else "does not add",
        )


# ---------------------------------------------------------------------------------------
# Streaming detokenization
# ---------------------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces whose concatenation is ``decode(ids)``.

    Each :meth:`add` decodes only a short window of recent tokens: the "prefix" (tokens
    whose text was already emitted) plus the pending tokens, and emits the part of the
    window's text beyond the prefix's own text. Decoding the prefix on its own cancels
    decoder effects that depend on position, such as SentencePiece decoders stripping
    the space at the start of the text.

    A token can hold part of a multi-byte character, so text is held back until it is
    final:

    * byte-level BPE (GPT-2 style) decodes all bytes at once, replacing an incomplete
      sequence at the end with U+FFFD; characters before that trailing U+FFFD run are
      final (more bytes only change the run), so they are emitted at once;
    * SentencePiece byte fallback decodes each run of ``<0xNN>`` tokens as a group and
      turns the whole group into U+FFFD if any byte of it is invalid, so a group's text
      is emitted only when a non-byte token ends it.

    :meth:`flush` emits whatever is held back at the end, exactly as ``decode`` renders
    it. Text that already contains U+FFFD (invalid bytes the model produced) is
    reproduced too: the guarantee is equality with ``decode``, not clean text.
    """

    __slots__ = (
        "_tokenizer", "_skip_special", "_special_ids", "_byte_ids", "_ids", "_prefix_len", "_prefix_text", "_emitted"
    )

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        # tokenizers drops skipped tokens before running the decoder, so dropping them
        # here gives the same text and keeps them out of the window.
        self._special_ids = frozenset(tokenizer.special_token_ids) if skip_special_tokens else frozenset()
        self._byte_ids = tokenizer.byte_fallback_ids
        self._reset()

    def _reset(self) -> None:
        self._ids: list[int] = []  # the window: prefix tokens then pending tokens
        self._prefix_len = 0
        self._prefix_text = ""
        self._emitted = 0  # characters of the window's text beyond the prefix already emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.backend.decode(ids, skip_special_tokens=self._skip_special)

    def add(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly "")."""
        if token_id in self._special_ids:
            return ""
        if not isinstance(token_id, int) or token_id < 0:
            raise TokenizerError(f"IncrementalDetokenizer.add() takes a non-negative int token id, got {token_id!r}")
        self._ids.append(token_id)
        if token_id in self._byte_ids:
            return ""  # the byte group is still open
        text = self._decode(self._ids)
        start = len(self._prefix_text) + self._emitted
        if not text.startswith(self._prefix_text):
            # Only decoders that merge text across token boundaries do this (none of the
            # LLM decoders do); emitting by position keeps the stream going.
            logger.debug("decoder output of the window does not extend its prefix's output")
        if text.endswith("\ufffd"):
            stable = len(text.rstrip("\ufffd"))
            if stable <= start:
                return ""
            piece = text[start:stable]
            self._emitted += len(piece)
            return piece
        piece = text[start:]
        # The pending tokens become the next prefix. A prefix whose own text is empty
        # (a lone SentencePiece space that the decoder strips) would let the decoder
        # strip the next token's space instead, so such a prefix keeps the older tokens.
        pending = self._ids[self._prefix_len :]
        pending_text = self._decode(pending)
        if pending_text:
            self._ids = pending
            self._prefix_text = pending_text
        else:
            self._prefix_text = text
        self._prefix_len = len(self._ids)
        self._emitted = 0
        return piece

    def flush(self) -> str:
        """Return any held-back text (an incomplete character decodes to U+FFFD) and reset."""
        if self._prefix_len == len(self._ids):
            self._reset()
            return ""
        text = self._decode(self._ids)
        piece = text[len(self._prefix_text) + self._emitted :]
        self._reset()
        return piece
