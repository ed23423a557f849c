"""Exceptions raised by trellm.

Every error a user can cause derives from :class:`TrellmError` and carries a
message that says what is wrong and how to fix it. The CLI prints the message
without a traceback; the server maps these to 4xx responses.
"""

from __future__ import annotations


class TrellmError(Exception):
    """Base class of all user-facing trellm errors."""


class ConfigError(TrellmError):
    """config.json / generation_config.json is missing, unreadable or inconsistent."""


class UnsupportedArchitectureError(TrellmError):
    """The model's architecture is not in the registry."""


class TensorError(TrellmError):
    """A checkpoint tensor is missing or has the wrong shape or dtype."""


class SafetensorsError(TrellmError):
    """A .safetensors file or its index is corrupt or inconsistent."""


class GGUFError(TrellmError):
    """A GGUF file cannot be read or converted."""


class TokenizerError(TrellmError):
    """The tokenizer files are missing or unusable."""


class ChatTemplateError(TrellmError):
    """The chat template is missing, cannot be parsed, or raised while rendering."""


class GenerationError(TrellmError):
    """A generation request is invalid (prompt too long, bad sampling parameters...)."""
