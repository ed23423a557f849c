"""Constrained output through llguidance: JSON schemas, regular expressions and Lark grammars.

A job with a `Constraint` gets a matcher; before each of its tokens is sampled, the
matcher's token mask (the tokens that keep the output inside the grammar) sets every
other logit to -inf, and the sampled token advances the matcher. When the grammar is
complete and allows nothing more, the job stops ("stop"). llguidance is an optional
dependency (the `server` extra); without it a constrained job is refused with a message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from trellm.errors import GenerationError
from trellm.io.tokenizer import Tokenizer

KINDS = ("json_schema", "json_object", "regex", "lark")


@dataclass(frozen=True, slots=True)
class Constraint:
    kind: str  # one of KINDS
    spec: Any = None  # the schema (dict or JSON text), the regex, or the Lark grammar

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GenerationError(f"unknown constraint kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.kind != "json_object" and not self.spec:
            raise GenerationError(f"a {self.kind} constraint needs its {self.kind.replace('_', ' ')}")

    @staticmethod
    def json_schema(schema: dict | str) -> Constraint:
        return Constraint("json_schema", schema)

    @staticmethod
    def json_object() -> Constraint:
        return Constraint("json_object")

    @staticmethod
    def regex(pattern: str) -> Constraint:
        return Constraint("regex", pattern)

    @staticmethod
    def lark(grammar: str) -> Constraint:
        return Constraint("lark", grammar)


class Matcher:
    """One job's position in its grammar."""

    def __init__(self, matcher, vocab_size: int):
        import llguidance.torch as lt

        self._m, self._lt = matcher, lt
        self._mask = lt.allocate_token_bitmask(1, vocab_size)  # int32 [1, ceil(V / 32)]

    def apply(self, logits: torch.Tensor) -> None:
        """Set the logits [V] of every token the grammar forbids now to -inf (in place)."""
        self._lt.fill_next_token_bitmask(self._m, self._mask, 0)
        row = logits[None]
        self._lt.apply_token_bitmask_inplace(row, self._mask.to(logits.device))

    def consume(self, token: int) -> None:
        self._m.consume_token(token)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last num_tokens consumed tokens (a banned string sent the job back)."""
        if num_tokens:
            self._m.rollback(num_tokens)

    @property
    def done(self) -> bool:
        """The grammar is complete and allows no more tokens (or the matcher failed)."""
        return self._m.is_stopped()

    @property
    def error(self) -> str:
        return self._m.get_error()


class ConstraintCompiler:
    """Builds matchers for one tokenizer (the llguidance view of the vocabulary is made once)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int]):
        try:
            import llguidance
        except ImportError as exc:
            raise GenerationError("constrained output needs llguidance: pip install 'trellm[server]' "
                                  "(or pip install llguidance)") from exc
        self._ll = llguidance
        self.vocab_size = vocab_size
        self._tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                                 eos_token=eos_token_ids or None)

    def matcher(self, constraint: Constraint) -> Matcher:
        m = self._ll.LLMatcher
        try:
            if constraint.kind in ("json_schema", "json_object"):
                spec = constraint.spec if constraint.kind == "json_schema" else {"type": "object"}
                spec = spec if isinstance(spec, str) else json.dumps(spec)
                # Compact JSON (", " and ": " separators, no free whitespace): a model that drifts into
                # whitespace cannot pad the output forever, and schemas may still ask otherwise
                # through their own "x-guidance" options.
                grammar = m.grammar_from_json_schema(spec, defaults={"whitespace_flexible": False})
            elif constraint.kind == "regex":
                grammar = m.grammar_from_regex(constraint.spec)
            else:
                grammar = m.grammar_from_lark(constraint.spec)
        except ValueError as exc:
            raise GenerationError(f"invalid {constraint.kind.replace('_', ' ')}: {exc}") from exc
        matcher = m(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GenerationError(f"invalid {constraint.kind.replace('_', ' ')}: {matcher.get_error()}")
        return Matcher(matcher, self.vocab_size)
