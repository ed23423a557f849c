"""Tokenizer: same ids as transformers, clear errors, and exact streaming detokenization.

Synthetic tokenizers (a byte-level BPE and a SentencePiece-style BPE with byte
fallback) are trained in fixtures with the `tokenizers` library, so most tests need no
download. Tests marked `real_models` compare against transformers on the real models.
"""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

import pytest
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from trellm.errors import ChatTemplateError, TokenizerError
from trellm.io.tokenizer import IncrementalDetokenizer, Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2024-01-31",
    "Hello, world! How are you doing today? I'm fine, thanks.",
    "    indented    text   with   runs   of   spaces\n\n\n",
    "Café crème brûlée naïve façade résumé Ångström",
    "日本語の文章です。中文句子。",
]

# Texts the tokenizers never saw much of: CJK, emoji (4-byte UTF-8, ZWJ sequences,
# skin-tone modifiers), combining marks and NFD text, runs of spaces and newlines.
TEXTS = [
    "Hello world",
    " leading space and trailing space ",
    "def f(x):\n\treturn x ** 2  # 平方\n",
    "1234567890 + 3.14159 = ?",
    "日本語のテキスト、한국어, 中文。",
    "emoji 😀👍🏽 👨‍👩‍👧 🇫🇷!",
    "e\u0301 cafe\u0301 " + unicodedata.normalize("NFD", "Ångström naïve"),
    "a" * 40 + "     \n\n\n  b",
    "",
    "\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<s>already has bos</s> and more <s>",
    "x<think>y</think><tool>z",
    "  <|im_start|>  spaced <|im_end|>",
]

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SP_SPECIALS = ["<unk>", "<s>", "</s>"]

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# --------------------------------------------------------------------------------------
# Fixtures: tiny tokenizers trained on the fly, saved as Hugging Face folders
# --------------------------------------------------------------------------------------


def _byte_level_json() -> dict:
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    return json.loads(tok.to_str())


def _sentencepiece_json() -> dict:
    """A Llama-2-style BPE: '▁' for spaces, <0xNN> byte tokens, BOS by the post-processor."""
    tok = Backend(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SP_SPECIALS, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    data = json.loads(tok.to_str())
    # Byte-fallback tokens live in the model vocabulary (ids 3..258), not among the
    # added tokens, as in SentencePiece conversions.
    learned = [t for t, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1]) if t not in SP_SPECIALS]
    ordered = SP_SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + learned
    data["model"]["vocab"] = {t: i for i, t in enumerate(ordered)}
    for added in data["added_tokens"]:
        added["id"] = data["model"]["vocab"][added["content"]]
    return _with(
        data, post_processor=processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    )


@pytest.fixture(scope="session")
def tokenizer_jsons() -> dict[str, dict]:
    return {"byte": _byte_level_json(), "sp": _sentencepiece_json()}


def make_folder(
    root: Path,
    tokenizer_json: dict,
    config: dict | None = None,
    *,
    model_config: dict | None = None,
    jinja: str | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    if config is not None:
        (root / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if model_config is not None:
        (root / "config.json").write_text(json.dumps(model_config), encoding="utf-8")
    if jinja is not None:
        (root / "chat_template.jinja").write_text(jinja, encoding="utf-8")
    for name, text in (extra_files or {}).items():
        (root / name).write_text(text, encoding="utf-8")
    return root


def _with(data: dict, **components) -> dict:
    """A copy of a tokenizer.json with some pipeline components replaced."""
    tok = Backend.from_str(json.dumps(data))
    for name, component in components.items():
        setattr(tok, name, component)
    return json.loads(tok.to_str())


CHATML_CONFIG = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None}
LLAMA_CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

# (name, which json, tokenizer_config, config.json, what the variant exercises)
VARIANTS = [
    ("byte-backend", "byte", {**CHATML_CONFIG, "tokenizer_class": "PreTrainedTokenizerFast"}, None),
    # The json has no normalizer; Qwen2Tokenizer adds NFC (changes NFD text).
    ("byte-qwen2", "byte", {**CHATML_CONFIG, "tokenizer_class": "Qwen2Tokenizer"}, None),
    # No tokenizer_class: the model_type's registered class (Qwen2Tokenizer) applies.
    ("byte-qwen2-by-model-type", "byte", CHATML_CONFIG, {"model_type": "qwen3"}),
    # add_bos_token in the config is ignored when tokenizer.json exists.
    ("byte-add-bos-ignored", "byte", {**CHATML_CONFIG, "bos_token": "<|endoftext|>", "add_bos_token": True}, None),
    ("byte-gpt2", "byte", {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}, None),
    # A new special token that is not in the vocabulary becomes an added token.
    ("byte-new-special", "byte", {**CHATML_CONFIG, "additional_special_tokens": ["<|tool|>"], "mask_token": "<|mask|>"}, None),
    # A byte-level tokenizer.json labelled LlamaTokenizer (Llama 3 style) loads as the plain backend.
    ("byte-llama3", "byte", {**CHATML_CONFIG, "tokenizer_class": "LlamaTokenizerFast"}, {"model_type": "llama"}),
    # added_tokens_decoder entries missing from tokenizer.json, one of them not special.
    (
        "byte-added-decoder",
        "byte",
        {
            **CHATML_CONFIG,
            "added_tokens_decoder": {
                "420": {"content": "<think>", "special": False, "normalized": False, "lstrip": False, "rstrip": False},
                "421": {"content": "<tool>", "special": True, "normalized": False},
            },
        },
        None,
    ),
    # Special-token strings in the text stay text.
    ("byte-split-special", "byte", {**CHATML_CONFIG, "split_special_tokens": True}, None),
    ("sp-backend", "sp", {**LLAMA_CONFIG, "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False}, None),
    ("sp-llama", "sp", {**LLAMA_CONFIG, "tokenizer_class": "LlamaTokenizer", "legacy": False}, None),
    ("sp-llama-legacy", "sp", {**LLAMA_CONFIG, "tokenizer_class": "LlamaTokenizer", "legacy": True}, None),
    ("sp-llama-no-prefix", "sp", {**LLAMA_CONFIG, "tokenizer_class": "LlamaTokenizerFast", "add_prefix_space": False}, None),
    # Mistral registers the plain backend: its Hub "LlamaTokenizer" is overridden.
    ("sp-mistral", "sp", {**LLAMA_CONFIG, "tokenizer_class": "LlamaTokenizer"}, {"model_type": "mistral"}),
    ("sp-gemma", "sp", {"tokenizer_class": "GemmaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>"}, None),
]


@pytest.fixture(scope="session")
def variant_folders(tmp_path_factory, tokenizer_jsons) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    folders = {}
    for name, kind, config, model_config in VARIANTS:
        data = tokenizer_jsons[kind]
        if name == "byte-gpt2":
            data = _with(data, normalizer=normalizers.NFC())  # GPT2Tokenizer drops it
        folders[name] = make_folder(root / name, data, config, model_config=model_config, jinja=CHATML)
    # GPT-NeoX rebuilds its post-processor without BOS even though tokenizer.json adds one.
    folders["byte-gpt-neox"] = make_folder(
        root / "byte-gpt-neox",
        _with(
            tokenizer_jsons["byte"],
            post_processor=processors.TemplateProcessing(
                single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
            ),
        ),
        {"tokenizer_class": "GPTNeoXTokenizer", "add_bos_token": True},
        jinja=CHATML,
    )
    return folders


@pytest.fixture(scope="session")
def byte_tok(variant_folders) -> Tokenizer:
    return Tokenizer.from_folder(variant_folders["byte-backend"])


@pytest.fixture(scope="session")
def sp_tok(variant_folders) -> Tokenizer:
    return Tokenizer.from_folder(variant_folders["sp-llama"])


# --------------------------------------------------------------------------------------
# Loading and properties
# --------------------------------------------------------------------------------------


def test_missing_tokenizer_json_names_folder(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=rf"{tmp_path.name}.*tokenizer\.json.*required"):
        Tokenizer.from_folder(tmp_path)
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_folder(tmp_path / "nope")


def test_corrupt_files(tmp_path, tokenizer_jsons):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    make_folder(tmp_path, tokenizer_jsons["byte"])
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_folder(tmp_path)


def test_properties(sp_tok, byte_tok, variant_folders):
    assert (sp_tok.bos_token, sp_tok.bos_token_id, sp_tok.eos_token_id, sp_tok.unk_token_id) == ("<s>", 1, 2, 0)
    assert sp_tok.pad_token_id is None and sp_tok.chat_template is not None
    assert sp_tok.vocab_size == 300 + 256 or sp_tok.vocab_size > 259
    assert {0, 1, 2} <= sp_tok.special_token_ids and 3 not in sp_tok.special_token_ids  # <0x00> is not special
    assert sp_tok.token_to_id("<0x41>") == 68 and sp_tok.convert_ids_to_tokens([1, 68]) == ["<s>", "<0x41>"]
    assert byte_tok.bos_token_id is None and byte_tok.eos_token_id == 2 and byte_tok.pad_token_id == 0
    assert byte_tok.added_tokens == {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>"}
    extra = Tokenizer.from_folder(variant_folders["byte-new-special"])
    assert extra.vocab_size == byte_tok.vocab_size + 2
    assert extra.encode("x<|tool|>y")[1] == extra.token_to_id("<|tool|>") in extra.special_token_ids
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        sp_tok.convert_ids_to_tokens(10**6)
    with pytest.raises(TokenizerError, match="non-negative"):
        sp_tok.decode([1, -5])


def test_fallback_ids_from_generation_config(tmp_path, tokenizer_jsons):
    folder = make_folder(
        tmp_path, tokenizer_jsons["byte"], {"eos_token": None}, extra_files={"generation_config.json": '{"bos_token_id": 1, "eos_token_id": [2, 0]}'}
    )
    tok = Tokenizer.from_folder(folder)
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.eos_token is None


def test_special_tokens_map_and_token_dicts(tmp_path, tokenizer_jsons):
    """Old folders: tokens as {"content": ...} dicts, special_tokens_map.json overriding."""
    folder = make_folder(
        tmp_path,
        tokenizer_jsons["sp"],
        {"bos_token": {"content": "<s>", "lstrip": False, "normalized": False, "special": True}, "eos_token": "<unk>", "model_max_length": 4096},
        extra_files={"special_tokens_map.json": json.dumps({"eos_token": {"content": "</s>", "special": True}})},
    )
    tok = Tokenizer.from_folder(folder)
    assert (tok.bos_token, tok.eos_token, tok.eos_token_id, tok.model_max_length) == ("<s>", "</s>", 2, 4096)


# --------------------------------------------------------------------------------------
# Same ids as transformers
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def transformers_auto():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer


@pytest.mark.parametrize("variant", [v[0] for v in VARIANTS] + ["byte-gpt-neox"])
def test_matches_transformers(variant, variant_folders, transformers_auto):
    folder = variant_folders[variant]
    ref = transformers_auto.from_pretrained(str(folder))
    tok = Tokenizer.from_folder(folder)
    assert tok.vocab_size == len(ref)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert tok.special_token_ids >= set(ref.all_special_ids)
    for text in TEXTS:
        for add_special in (True, False):
            ids = tok.encode(text, add_special_tokens=add_special)
            assert ids == ref(text, add_special_tokens=add_special)["input_ids"], (variant, text, add_special)
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), (variant, text)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 😀"}]
    for tokenize in (False, True):
        ours = tok.apply_chat_template(messages, tokenize=tokenize)
        theirs = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=tokenize, return_dict=False)
        assert ours == theirs


def test_bos_rules(variant_folders):
    """tokenizer.json's post-processor decides BOS; config flags are ignored (transformers 5)."""
    sp = Tokenizer.from_folder(variant_folders["sp-backend"])  # add_bos_token: false in the config
    assert sp.encode("hi")[0] == sp.bos_token_id and sp.encode("hi", add_special_tokens=False)[0] != sp.bos_token_id
    byte = Tokenizer.from_folder(variant_folders["byte-add-bos-ignored"])  # add_bos_token: true, no BOS in json
    assert byte.encode("hi")[0] != byte.bos_token_id
    neox = Tokenizer.from_folder(variant_folders["byte-gpt-neox"])  # json adds BOS, the class removes it
    assert neox.encode("hi") == neox.encode("hi", add_special_tokens=False)


def test_chat_template_bos_not_doubled(tmp_path, tokenizer_jsons):
    template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
    tok = Tokenizer.from_folder(make_folder(tmp_path, tokenizer_jsons["sp"], LLAMA_CONFIG, jinja=template))
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=True)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids == tok.encode(tok.apply_chat_template([{"role": "user", "content": "hello"}]), add_special_tokens=False)


# --------------------------------------------------------------------------------------
# Chat template loading
# --------------------------------------------------------------------------------------


def test_no_chat_template_error(tmp_path, tokenizer_jsons):
    tok = Tokenizer.from_folder(make_folder(tmp_path, tokenizer_jsons["byte"], CHATML_CONFIG))
    assert tok.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template.*plain prompts"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_sources(tmp_path, tokenizer_jsons):
    named = [
        {"name": "default", "template": "D{{ messages[0]['content'] }}"},
        {"name": "tool_use", "template": "T{{ tools | length }}"},
        {"name": "rag", "template": "R{{ documents[0]['title'] }}"},
    ]
    tok = Tokenizer.from_folder(make_folder(tmp_path / "a", tokenizer_jsons["byte"], {**CHATML_CONFIG, "chat_template": named}))
    msgs = [{"role": "user", "content": "x"}]
    assert tok.chat_template_names == ["default", "rag", "tool_use"]
    assert tok.apply_chat_template(msgs) == "Dx"
    assert tok.apply_chat_template(msgs, tools=[{"type": "function", "function": {"name": "f"}}]) == "T1"
    assert tok.apply_chat_template(msgs, template_name="rag", documents=[{"title": "doc", "text": "t"}]) == "Rdoc"
    with pytest.raises(ChatTemplateError, match="no chat template named 'nope'.*default, rag, tool_use"):
        tok.apply_chat_template(msgs, template_name="nope")
    # chat_template.jinja wins over the config's template; chat_template.json is read too.
    tok = Tokenizer.from_folder(
        make_folder(tmp_path / "b", tokenizer_jsons["byte"], {"chat_template": "config"}, jinja="jinja")
    )
    assert tok.apply_chat_template(msgs) == "jinja"
    tok = Tokenizer.from_folder(
        make_folder(tmp_path / "c", tokenizer_jsons["byte"], {"chat_template": "config"},
                    extra_files={"chat_template.json": json.dumps({"chat_template": "json"})})
    )
    assert tok.apply_chat_template(msgs) == "json"
    # A broken template does not stop plain tokenization; it errors when used.
    tok = Tokenizer.from_folder(make_folder(tmp_path / "d", tokenizer_jsons["byte"], jinja="{% if %}"))
    assert tok.encode("ok")
    with pytest.raises(ChatTemplateError, match="syntax error at line 1"):
        tok.apply_chat_template(msgs)


# --------------------------------------------------------------------------------------
# Streaming detokenization
# --------------------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], skip: bool = False) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    return [detok.add(i) for i in ids] + [detok.flush()]


def _check_stream(tok: Tokenizer, ids: list[int], skip: bool = False) -> list[str]:
    chunks = _stream(tok, ids, skip)
    full = tok.decode(ids, skip_special_tokens=skip)
    assert "".join(chunks) == full, (ids, chunks, full)
    if "\ufffd" not in full:
        assert not any("\ufffd" in c for c in chunks), chunks
    return chunks


@pytest.mark.parametrize("which", ["byte-backend", "sp-llama", "sp-gemma", "sp-llama-no-prefix"])
def test_stream_multibyte_text(which, variant_folders):
    tok = Tokenizer.from_folder(variant_folders[which])
    for text in TEXTS + ["👍🏽" * 5 + "字" * 5 + "e\u0301\u0302" * 3]:
        ids = tok.encode(text)
        for skip in (False, True):
            chunks = _check_stream(tok, ids, skip)
            # Each multi-byte character arrives whole: never a piece of one.
            assert all(c.encode("utf-8").decode("utf-8") == c for c in chunks)


def test_stream_holds_partial_characters(byte_tok, sp_tok):
    for tok in (byte_tok, sp_tok):
        ids = tok.encode("x😀y", add_special_tokens=False)
        emoji = [tok.token_to_id(t) for t in (["ð", "Ł", "ĺ", "Ģ"] if tok is byte_tok else ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"])]
        at = ids.index(emoji[0])
        assert ids[at : at + 4] == emoji  # one token per UTF-8 byte: the emoji was never seen in training
        chunks = _stream(tok, ids)
        assert chunks[at : at + 3] == ["", "", ""] and "".join(chunks) == tok.decode(ids)
        assert "😀" in "".join(chunks[at + 3 : at + 5])
        # A stream cut in the middle of a character: flush gives what decode gives.
        cut = _stream(tok, ids[: at + 2])
        assert "".join(cut) == tok.decode(ids[: at + 2]) and cut[-1].endswith("\ufffd")
        assert not any("\ufffd" in c for c in cut[:-1])


def test_stream_random_ids(byte_tok, sp_tok):
    """Arbitrary id sequences, invalid UTF-8 and special tokens included."""
    rng = random.Random(1234)
    for tok in (byte_tok, sp_tok):
        for _ in range(300):
            ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 25))]
            _check_stream(tok, ids, skip=rng.random() < 0.5)


def test_stream_leading_space_decoders(sp_tok):
    """SentencePiece decoders strip the first space of the text, and only that one."""
    space = sp_tok.token_to_id("▁")
    word = sp_tok.encode("Hello", add_special_tokens=False)
    assert space is not None
    for ids in ([space, space, *word, space, *word], [*word, space, space, space, *word], [1, space, *word, 2, space]):
        _check_stream(sp_tok, ids)
        _check_stream(sp_tok, ids, skip=True)


def test_stream_decodes_small_windows(byte_tok, monkeypatch):
    """Each step decodes a few recent tokens, not the whole sequence."""
    sizes: list[int] = []
    original = IncrementalDetokenizer._decode

    def spy(self, ids):
        sizes.append(len(ids))
        return original(self, ids)

    monkeypatch.setattr(IncrementalDetokenizer, "_decode", spy)
    ids = byte_tok.encode("日本語 😀 text, more text 👍🏽. " * 40)
    assert len(ids) > 400
    _check_stream(byte_tok, ids)
    assert max(sizes) <= 8


# --------------------------------------------------------------------------------------
# Real models
# --------------------------------------------------------------------------------------

REAL_MODELS = ["SmolLM2-135M-Instruct", "gemma-3-270m", "Qwen2.5-Coder-0.5B-Instruct"]


@pytest.fixture(scope="module")
def real_folder(request):
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            try:
                ensure_model = request.getfixturevalue("real_model_path")
            except ImportError:
                pytest.skip("trellm.io.model_zoo is not available")
            cache[name] = ensure_model(name)
        return cache[name]

    return get


@pytest.mark.real_models
@pytest.mark.parametrize("name", REAL_MODELS)
def test_real_model_matches_transformers(name, real_folder, transformers_auto):
    folder = real_folder(name)
    ref = transformers_auto.from_pretrained(str(folder))
    tok = Tokenizer.from_folder(folder)
    assert tok.vocab_size == len(ref)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    specials = [t for t in (tok.bos_token, tok.eos_token, tok.pad_token) if t]
    texts = TEXTS + ["".join(f"{s} x{s}" for s in specials), "for i in range(10):\n    print(i ** 2)\n" * 3]
    for text in texts:
        for add_special in (True, False):
            ids = tok.encode(text, add_special_tokens=add_special)
            assert ids == ref(text, add_special_tokens=add_special)["input_ids"], (name, text, add_special)
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == ref.decode(ref.encode(text, add_special_tokens=False))
        _check_stream(tok, ids)
    # Round trip of text the tokenizer does not normalize away.
    plain = "Hello, world! 日本語 😀 1234   spaces\n\nnew line"
    assert tok.decode(tok.encode(plain, add_special_tokens=False)) == plain


@pytest.mark.real_models
def test_real_gemma_base_has_no_chat_template(real_folder):
    tok = Tokenizer.from_folder(real_folder("gemma-3-270m"))
    assert tok.bos_token == "<bos>" and tok.encode("hi")[0] == tok.bos_token_id
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
