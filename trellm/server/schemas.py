"""Request bodies of the OpenAI-compatible API (pydantic v2). Ranges are checked here, so a bad
parameter becomes a 400 naming it; unknown fields are ignored, as OpenAI's API does."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Sampling(BaseModel):
    """Sampling fields shared by both endpoints; the ones OpenAI lacks come as extra body fields."""

    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    # trellm extras
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    typical_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    xtc_threshold: float = Field(0.1, ge=0, le=1)
    xtc_probability: float = Field(0.0, ge=0, le=1)
    dry_multiplier: float = Field(0.0, ge=0)
    dry_base: float = Field(1.75, ge=1)
    dry_allowed_length: int = Field(2, ge=1)
    min_tokens: int = Field(0, ge=0)
    banned_strings: list[str] = Field(default_factory=list, max_length=64)  # never in the output

    @property
    def include_usage(self) -> bool:
        """stream_options.include_usage: end a stream with a chunk carrying the usage."""
        return bool((self.stream_options or {}).get("include_usage"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class EncodeRequest(BaseModel):
    text: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DecodeRequest(BaseModel):
    tokens: list[int]
    skip_special_tokens: bool = False


class LoadRequest(BaseModel):
    model: str = Field(min_length=1)  # a folder name inside the server's model directory
