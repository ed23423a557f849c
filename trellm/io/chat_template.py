"""Hugging Face chat templates, rendered the way transformers renders them.

A chat template is a Jinja2 program stored with the tokenizer (``chat_template.jinja``
or the ``chat_template`` key of ``tokenizer_config.json``). Models are trained on the
exact text their template produces, so the rendering must match transformers'
``apply_chat_template`` byte for byte. The facts mirrored here (transformers 5.x,
``utils/chat_template_utils.py``):

* an ``ImmutableSandboxedEnvironment`` (templates come from the Hub: untrusted code)
  with ``trim_blocks=True``, ``lstrip_blocks=True`` and the ``loopcontrols`` extension;
* a ``{% generation %}...{% endgeneration %}`` block tag (used to mark assistant turns
  for training masks), which renders its body unchanged;
* a ``tojson`` filter that is plain ``json.dumps`` (no HTML escaping, non-ASCII kept)
  with ``indent``, ``separators`` and ``sort_keys``;
* globals ``raise_exception(message)`` and ``strftime_now(format)``, a ``dict`` and a
  ``namespace`` that refuse underscore-prefixed names;
* context ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the named
  special tokens (``bos_token``, ``eos_token``...) and any extra keyword arguments
  (``enable_thinking``...), the extra arguments winning over the special tokens;
* messages are reduced to plain JSON data, keys whose value is ``None`` are dropped,
  and a message's reasoning is exposed under ``reasoning_content`` and ``thinking``.

Undefined variables follow Jinja's default (they render as the empty string), as in
transformers; only using an undefined value (``foo.bar``, ``foo()``) is an error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

from trellm.errors import ChatTemplateError

logger = logging.getLogger(__name__)

__all__ = ["ChatTemplate"]

# Names under which OpenAI-compatible clients and chat templates pass a message's
# reasoning. Templates read ``reasoning_content`` (Qwen3, DeepSeek...) or ``thinking``
# (gpt-oss), so a message carrying any of them gets both.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class _TemplateRaised(jinja2.exceptions.TemplateError):
    """Raised by ``raise_exception`` so it can be told apart from Jinja's own errors."""


def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(str(message))


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's built-in tojson escapes <, >, & and ' for HTML; prompts are not HTML and
    # the model was trained on plain JSON, so it is replaced by json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _check_public_name(name: Any) -> None:
    # Underscore attributes are how sandbox escapes start (``__class__``...); a
    # namespace or dict that stores them would hand the template a way around the
    # sandbox's attribute checks.
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"chat templates may not use the underscore-prefixed name {name!r}")


class _SafeNamespace(jinja2.utils.Namespace):
    """``namespace(...)`` for templates, refusing underscore-prefixed attributes."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same calling trick as jinja2.utils.Namespace
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _check_public_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_public_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


class _SafeDict:
    """``dict(...)`` and ``dict.fromkeys(...)`` for templates, without the type object itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: marks assistant text, renders it as is.

    transformers uses the tag to compute which tokens the assistant produced (for
    training masks); inference only needs the text, but templates that use the tag
    must still parse.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _make_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _SafeDict()
    env.globals["namespace"] = _SafeNamespace
    return env


def _plain(value: Any) -> Any:
    """Rebuild ``value`` out of JSON-like types only.

    The sandbox blocks private attributes, but the public methods of arbitrary objects
    (arrays, images, files) can still do harm, so the template only ever sees plain
    data. Objects that are not data become an inert ``"<TypeName>"`` placeholder.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models, e.g. OpenAI client messages
        return _plain(value.model_dump())
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return _plain(value.item())  # numpy / torch scalars
    return f"<{type(value).__name__}>"


def _normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check ``messages`` and turn it into the plain list of dicts the template sees."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(
            f"messages must be a list of dicts like {{'role': 'user', 'content': '...'}}, got {type(messages).__name__}"
        )
    if len(messages) == 0:
        raise ChatTemplateError("messages is empty; pass at least one {'role': ..., 'content': ...} message")
    out: list[dict[str, Any]] = []
    for index, raw in enumerate(messages):
        message = _plain(raw)
        if not isinstance(message, dict):
            raise ChatTemplateError(
                f"messages[{index}] is a {type(raw).__name__}, not a dict; "
                "each message must look like {'role': 'user', 'content': '...'}"
            )
        # OpenAI-style clients send ``content: None`` beside ``tool_calls``; templates
        # test for a missing key, not for None (transformers drops these keys too).
        message = {k: v for k, v in message.items() if v is not None}
        role = message.get("role")
        if not isinstance(role, str):
            raise ChatTemplateError(
                f"messages[{index}] has no string 'role'; each message needs a role such as 'system', 'user' or 'assistant'"
            )
        if "content" not in message and "tool_calls" not in message:
            raise ChatTemplateError(
                f"messages[{index}] (role {role!r}) has no 'content'; give it a content string (or tool_calls)"
            )
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ChatTemplateError(
                f"messages[{index}]['content'] is a {type(content).__name__}; it must be a string or a list of content parts"
            )
        reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _normalize_tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if isinstance(tools, Mapping) or not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise ChatTemplateError(
            "tools must be a list of JSON-schema dicts like {'type': 'function', 'function': {'name': ..., 'parameters': ...}}"
        )
    out = []
    for index, tool in enumerate(tools):
        tool = _plain(tool)
        if not isinstance(tool, dict):
            raise ChatTemplateError(
                f"tools[{index}] is a {type(tool).__name__}; pass each tool as a JSON-schema dict "
                "({'type': 'function', 'function': {...}}), not a Python function"
            )
        out.append(tool)
    return out


def _normalize_documents(documents: Any) -> list[dict[str, Any]] | None:
    if documents is None:
        return None
    if isinstance(documents, Mapping) or not isinstance(documents, Sequence) or isinstance(documents, (str, bytes)):
        raise ChatTemplateError("documents must be a list of dicts like {'title': ..., 'text': ...}")
    out = []
    for index, document in enumerate(documents):
        document = _plain(document)
        if not isinstance(document, dict):
            raise ChatTemplateError(f"documents[{index}] is a {type(document).__name__}; pass dicts with 'title' and 'text'")
        out.append(document)
    return out


class ChatTemplate:
    """One compiled Hugging Face chat template.

    ``special_tokens`` maps names such as ``bos_token`` to their strings; they are
    visible to the template, as in transformers. Construction compiles the template
    and raises :class:`ChatTemplateError` on a syntax error.
    """

    __slots__ = ("source", "special_tokens", "_template")

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        if not isinstance(source, str):
            raise ChatTemplateError(f"a chat template must be a string of Jinja source, got {type(source).__name__}")
        self.source = source
        self.special_tokens: dict[str, str] = {
            str(k): str(v) for k, v in (special_tokens or {}).items() if v is not None
        }
        try:
            self._template = _make_environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ChatTemplateError(
                f"chat template syntax error at line {exc.lineno}: {exc.message}; fix the template "
                "(chat_template.jinja or tokenizer_config.json) or pass another one"
            ) from exc

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to the prompt text the model was trained on.

        Extra keyword arguments (``enable_thinking=False``...) become template
        variables and override special tokens of the same name.
        """
        context: dict[str, Any] = dict(self.special_tokens)
        context.update(_plain(kwargs))
        context.update(
            messages=_normalize_messages(messages),
            tools=_normalize_tools(tools),
            documents=_normalize_documents(documents),
            add_generation_prompt=bool(add_generation_prompt),
        )
        try:
            return self._template.render(**context)
        except _TemplateRaised as exc:
            raise ChatTemplateError(f"the chat template rejected the conversation: {exc.message}") from exc
        except jinja2.exceptions.UndefinedError as exc:
            raise ChatTemplateError(
                f"chat template used an undefined value ({exc.message}); pass the missing variable "
                "through chat_template_kwargs or fix the template"
            ) from exc
        except jinja2.exceptions.SecurityError as exc:
            raise ChatTemplateError(f"chat template attempted an unsafe operation ({exc}); the template is not usable") from exc
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed while rendering: {exc}; check the template") from exc
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError) as exc:
            raise ChatTemplateError(
                f"chat template failed while rendering ({type(exc).__name__}: {exc}); "
                "check that the messages, tools and kwargs have the shapes this template expects"
            ) from exc

    def __repr__(self) -> str:
        return f"ChatTemplate({len(self.source)} chars)"
