"""Chat templates: rendering identical to transformers, and one clear error per mistake."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers

from trellm.errors import ChatTemplateError
from trellm.io.chat_template import ChatTemplate
from trellm.io.tokenizer import Tokenizer

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}

# A ChatML template in the style of Qwen's, with a system default, tools rendered as
# JSON, tool calls and tool responses, and a thinking switch: it uses trim_blocks,
# lstrip_blocks, namespace, loop controls, tojson and the {% generation %} tag.
TEMPLATE = """\
{%- set ns = namespace(system_seen=false) %}
{%- if messages[0]['role'] == 'system' %}
    {%- set ns.system_seen = true %}
{%- endif %}
{%- if tools %}
<|im_start|>system
{{ messages[0]['content'] if ns.system_seen else 'You are a helpful assistant.' }}

# Tools
<tools>
{% for tool in tools %}
{{ tool | tojson }}
{% endfor %}
</tools><|im_end|>
{% elif not ns.system_seen %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif %}
{% for message in messages %}
    {%- if message['role'] == 'system' and tools %}{% continue %}{% endif %}
    {%- if message['role'] == 'assistant' %}
<|im_start|>assistant
{% generation %}
{% if message.reasoning_content is defined %}<think>{{ message.reasoning_content }}</think>
{% endif %}
{{ message['content'] | default('') }}
{%- for call in message.tool_calls | default([]) %}
<tool_call>{{ call.function | tojson(indent=2, sort_keys=true) }}</tool_call>
{%- endfor %}<|im_end|>
{% endgeneration %}
    {%- else %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endif %}
{% endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% endif %}
{%- endif %}"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city — e.g. Zürich or 東京 <fast> & 'free'",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
                "required": ["city"],
            },
        },
    }
]

CONVERSATION = [
    {"role": "system", "content": "Answer in French."},
    {"role": "user", "content": "What's the weather in Zürich?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}],
    },
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "Il fait 21 °C.", "reasoning": "The tool said 21."},
    {"role": "user", "content": "Merci 🙏"},
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A transformers tokenizer to render templates with (its vocabulary is irrelevant)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    folder: Path = tmp_path_factory.mktemp("ref")
    backend = Backend(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **SPECIAL}))
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def _render_both(reference, source: str, messages, **kwargs) -> tuple[str, str]:
    ours = ChatTemplate(source, SPECIAL).render(messages, **kwargs)
    theirs = reference.apply_chat_template(messages, chat_template=source, tokenize=False, **kwargs)
    return ours, theirs


@pytest.mark.parametrize(
    "messages,kwargs",
    [
        (CONVERSATION[1:2], {"add_generation_prompt": True}),
        (CONVERSATION[:2], {"add_generation_prompt": False}),
        (CONVERSATION, {"add_generation_prompt": True}),
        (CONVERSATION, {"add_generation_prompt": True, "tools": TOOLS}),
        (CONVERSATION[1:], {"add_generation_prompt": True, "tools": TOOLS, "enable_thinking": False}),
        (CONVERSATION, {"add_generation_prompt": True, "enable_thinking": True}),
    ],
)
def test_matches_transformers(reference, messages, kwargs):
    ours, theirs = _render_both(reference, TEMPLATE, messages, **kwargs)
    assert ours == theirs


def test_rendering_details():
    template = ChatTemplate(TEMPLATE, SPECIAL)
    text = template.render(CONVERSATION, add_generation_prompt=True, tools=TOOLS, enable_thinking=False)
    assert text.startswith("<|im_start|>system\nAnswer in French.\n\n# Tools\n<tools>\n")
    # tojson keeps non-ASCII and does not HTML-escape; indent and sort_keys work.
    assert '"description": "Weather for a city — e.g. Zürich or 東京 <fast> & \'free\'"' in text
    assert '{\n  "arguments": {\n    "city": "Zürich"\n  },\n  "name": "get_weather"\n}' in text
    assert "<think>The tool said 21.</think>" in text  # "reasoning" is exposed as reasoning_content
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "Merci 🙏<|im_end|>" in text
    plain = template.render(CONVERSATION[1:2], add_generation_prompt=False)
    assert plain == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat's the weather in Zürich?<|im_end|>\n"
    )


def test_special_tokens_and_kwargs():
    template = ChatTemplate("{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ custom | default('none') }}", SPECIAL)
    msgs = [{"role": "user", "content": "x"}]
    assert template.render(msgs, add_generation_prompt=False) == "<s>|</s>|<pad>|none"
    # Keyword arguments override special tokens of the same name, as in transformers.
    assert template.render(msgs, add_generation_prompt=False, bos_token="[B]", custom=3) == "[B]|</s>|<pad>|3"


def test_globals():
    source = (
        "{{ strftime_now('%Y') }}|{{ dict(a=1) | tojson }}|{{ dict.fromkeys(['k'], 0) | tojson }}|"
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m.content }}{% endfor %}|"
        "{{ [3, 1] | tojson(separators=(',', ':')) }}|{{ tools | tojson }}|{{ documents[0].title }}"
    )
    msgs = [{"role": "user", "content": c} for c in "abc"]
    out = ChatTemplate(source, {}).render(msgs, add_generation_prompt=True, documents=[{"title": "T", "text": "t"}])
    assert out == f'{datetime.now().year}|{{"a": 1}}|{{"k": 0}}|ab|[3,1]|null|T'


def test_raise_exception_message():
    template = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with a user message') }}{% endif %}ok",
        SPECIAL,
    )
    assert template.render([{"role": "user", "content": "hi"}], add_generation_prompt=True) == "ok"
    with pytest.raises(ChatTemplateError, match="rejected the conversation: Conversations must start with a user message"):
        template.render([{"role": "assistant", "content": "hi"}], add_generation_prompt=True)


def test_syntax_error_has_line_number():
    with pytest.raises(ChatTemplateError, match=r"syntax error at line 3: .*endfor"):
        ChatTemplate("{% for m in messages %}\n{{ m.content }}\n{% endif %}", SPECIAL)
    with pytest.raises(ChatTemplateError, match="must be a string"):
        ChatTemplate(None, SPECIAL)  # type: ignore[arg-type]


def test_undefined_and_type_errors():
    msgs = [{"role": "user", "content": "hi"}]
    # A bare undefined name renders as "", exactly like transformers.
    assert ChatTemplate("[{{ not_passed }}]", {}).render(msgs, add_generation_prompt=True) == "[]"
    with pytest.raises(ChatTemplateError, match="undefined value.*'system_prompt' is undefined"):
        ChatTemplate("{{ system_prompt.strip() }}", {}).render(msgs, add_generation_prompt=True)
    with pytest.raises(ChatTemplateError, match="undefined value.*has no attribute 'name'"):
        ChatTemplate("{{ messages[0].name.upper() }}", {}).render(msgs, add_generation_prompt=True)
    with pytest.raises(ChatTemplateError, match="TypeError"):
        ChatTemplate("{{ messages[0]['content'] + 1 }}", {}).render(msgs, add_generation_prompt=True)


@pytest.mark.parametrize(
    "messages,match",
    [
        ("hello", "must be a list of dicts"),
        ({"role": "user", "content": "x"}, "must be a list of dicts"),
        ([], "messages is empty"),
        (["hello"], r"messages\[0\] is a str, not a dict"),
        ([{"content": "x"}], r"messages\[0\] has no string 'role'"),
        ([{"role": "user", "content": "x"}, {"role": "assistant"}], r"messages\[1\] \(role 'assistant'\) has no 'content'"),
        ([{"role": "user", "content": 5}], r"messages\[0\]\['content'\] is a int"),
    ],
)
def test_bad_messages(messages, match):
    with pytest.raises(ChatTemplateError, match=match):
        ChatTemplate("x", {}).render(messages, add_generation_prompt=True)


def test_bad_tools_and_documents():
    msgs = [{"role": "user", "content": "x"}]

    def get_weather(city: str) -> str:
        return city

    with pytest.raises(ChatTemplateError, match=r"tools\[0\].*not a Python function"):
        ChatTemplate("x", {}).render(msgs, add_generation_prompt=True, tools=[get_weather])
    with pytest.raises(ChatTemplateError, match="tools must be a list"):
        ChatTemplate("x", {}).render(msgs, add_generation_prompt=True, tools=TOOLS[0])
    with pytest.raises(ChatTemplateError, match="documents must be a list"):
        ChatTemplate("x", {}).render(msgs, add_generation_prompt=True, documents="text")


def test_sandbox():
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(ChatTemplateError, match="unsafe|undefined"):
        ChatTemplate("{{ ''.__class__.__mro__ }}", {}).render(msgs, add_generation_prompt=True)
    with pytest.raises(ChatTemplateError, match="underscore"):
        ChatTemplate("{% set ns = namespace(_x=1) %}", {}).render(msgs, add_generation_prompt=True)
    with pytest.raises(ChatTemplateError, match="unsafe|failed"):
        ChatTemplate("{% set _ = messages.append(1) %}", {}).render(msgs, add_generation_prompt=True)


def test_message_objects_become_plain_data():
    class Opaque:
        secret = "hidden"

    msgs = [{"role": "user", "content": [{"type": "image", "image": Opaque()}, {"type": "text", "text": "hi"}]}]
    out = ChatTemplate("{{ messages[0].content | tojson }}", {}).render(msgs, add_generation_prompt=False)
    assert json.loads(out) == [{"type": "image", "image": "<Opaque>"}, {"type": "text", "text": "hi"}]


# --------------------------------------------------------------------------------------
# Real models
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_pair(request):
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            transformers = pytest.importorskip("transformers")
            try:
                ensure_model = request.getfixturevalue("real_model_path")
            except ImportError:
                pytest.skip("trellm.io.model_zoo is not available")
            folder = ensure_model(name)
            cache[name] = (Tokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(str(folder)))
        return cache[name]

    return get


CHATS = [
    [{"role": "user", "content": "Hello! 你好 😀"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?\n  Explain   briefly."},
    ],
]


@pytest.mark.real_models
@pytest.mark.parametrize("name", ["SmolLM2-135M-Instruct", "Qwen2.5-Coder-0.5B-Instruct"])
def test_real_chat_template_matches_transformers(name, real_pair):
    tok, ref = real_pair(name)
    assert tok.chat_template is not None
    for messages in CHATS:
        for add_generation_prompt in (True, False):
            kw = {"add_generation_prompt": add_generation_prompt}
            assert tok.apply_chat_template(messages, **kw) == ref.apply_chat_template(messages, tokenize=False, **kw)
            ids = ref.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)
            assert tok.apply_chat_template(messages, tokenize=True, **kw) == ids


@pytest.mark.real_models
def test_real_qwen_tools(real_pair):
    tok, ref = real_pair("Qwen2.5-Coder-0.5B-Instruct")
    messages = [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "Weather in Zürich?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}],
        },
        {"role": "tool", "name": "get_weather", "content": '{"temp": 21}'},
    ]
    for msgs in (messages[:2], messages):
        ours = tok.apply_chat_template(msgs, tools=TOOLS)
        assert ours == ref.apply_chat_template(msgs, tools=TOOLS, add_generation_prompt=True, tokenize=False)
        assert "get_weather" in ours and "Zürich" in ours
