"""Tool (function) calls for the chat endpoint: the grammar that forces a call, and the parser that
finds calls in what a model wrote.

Models write calls in one of two common shapes, both recognised:
- tagged, as Hermes / Qwen 2.5 templates teach: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
  (several tags = parallel calls; text outside the tags is the message content);
- the whole answer one JSON object (or a list of them) with "name" and "arguments" (or
  "parameters", as Llama 3.1 writes).
When streaming, `CallStream` lets ordinary text out as it comes and holds back only what may be
a call: everything from a `<tool_call>` tag on, an answer that opens with `{` or `[`, and a tail
that may be the start of a tag.
tool_choice "required" or a named function constrains the output (llguidance) to a JSON call
of one of the allowed functions with arguments matching its parameter schema.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from trellm.engine.constraints import Constraint
from trellm.engine.generator import held_back

_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def _function(tool: dict) -> dict:
    return tool.get("function", tool)


def check_tools(tools: list[dict] | None, tool_choice: Any) -> list[dict]:
    """The function specs of a request, validated; raises ValueError with the offending part."""
    specs = []
    for tool in tools or []:
        if tool.get("type", "function") != "function" or not isinstance(_function(tool).get("name"), str):
            raise ValueError("each tool must be {'type': 'function', 'function': {'name': ..., 'parameters': ...}}")
        specs.append(_function(tool))
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if name not in {s["name"] for s in specs}:
            raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
    elif tool_choice not in (None, "auto", "none", "required"):
        raise ValueError("tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                         "{'name': ...}}")
    elif tool_choice == "required" and not specs:
        raise ValueError("tool_choice 'required' needs tools")
    return specs


def forced_call(specs: list[dict], tool_choice: Any) -> Constraint | None:
    """The output constraint for tool_choice 'required' or a named function, else None."""
    if isinstance(tool_choice, dict):
        allowed = [s for s in specs if s["name"] == tool_choice["function"]["name"]]
    elif tool_choice == "required":
        allowed = specs
    else:
        return None
    options = [{"type": "object", "properties": {"name": {"const": s["name"]},
                                                  "arguments": s.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False} for s in allowed]
    return Constraint.json_schema(options[0] if len(options) == 1 else {"anyOf": options})


def _as_call(obj: Any, names: set[str]) -> dict | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}}


def parse_calls(text: str, specs: list[dict]) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of a model's answer; no calls found -> (text, [])."""
    names = {s["name"] for s in specs}
    tagged = _TAGGED.findall(text)
    if tagged:
        calls = []
        for body in tagged:
            try:
                call = _as_call(json.loads(body), names)
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []  # a malformed call: hand the text back untouched
            calls.append(call)
        content = _TAGGED.sub("", text).strip()
        return content or None, calls
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return text, []
    objs = obj if isinstance(obj, list) else [obj]
    calls = [_as_call(o, names) for o in objs]
    if objs and all(calls):
        return None, calls
    return text, []


TAG = "<tool_call>"


class CallStream:
    """One streamed answer of a request with tools: which text may go out now, and at the end the
    calls and the content not sent yet."""

    def __init__(self, specs: list[dict]):
        self.specs, self.text, self.sent = specs, "", 0

    def feed(self, piece: str) -> str:
        """Add the answer's next text; returns the part that is surely content (maybe empty)."""
        self.text += piece
        start = self.text.lstrip()
        if not start or start[0] in "{[":  # blank so far, or a JSON call may be coming: hold it all
            return ""
        tag = self.text.find(TAG, self.sent)  # nothing from the first tag on goes out
        limit = tag if tag >= 0 else len(self.text) - held_back(self.text, [TAG])
        out = self.text[self.sent : limit] if limit > self.sent else ""
        self.sent = max(self.sent, limit)
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """At the end of the answer: (content not sent yet, tool calls)."""
        content, calls = parse_calls(self.text, self.specs)
        if not calls:
            return self.text[self.sent :], []
        if self.sent == 0:
            return content or "", calls
        return _TAGGED.sub("", self.text[self.sent :]).strip(), calls  # the text before the first tag went out
