"""trellm: make large language models small and fast.

The public API is what this module exports; everything else may change.
"""

from __future__ import annotations

from trellm.errors import (
    ChatTemplateError,
    ConfigError,
    GenerationError,
    GGUFError,
    SafetensorsError,
    TensorError,
    TokenizerError,
    TrellmError,
    UnsupportedArchitectureError,
)

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "GenerationRequest",
    "GenerationStats",
    "ModelConfig",
    "SamplingParams",
    "Tokenizer",
    "generate_tokens",
    "import_gguf",
    "load_model",
    "supported_architectures",
    "ChatTemplateError",
    "ConfigError",
    "GenerationError",
    "GGUFError",
    "SafetensorsError",
    "TensorError",
    "TokenizerError",
    "TrellmError",
    "UnsupportedArchitectureError",
]

# torch-heavy names load on first use, so `import trellm` stays cheap (CLI start-up, --help).
_LAZY = {
    "LLM": "trellm.engine.llm",
    "GenerationRequest": "trellm.engine.generate",
    "GenerationStats": "trellm.engine.generate",
    "generate_tokens": "trellm.engine.generate",
    "SamplingParams": "trellm.engine.sampling",
    "ModelConfig": "trellm.models.config",
    "load_model": "trellm.models.loader",
    "supported_architectures": "trellm.models.registry",
    "Tokenizer": "trellm.io.tokenizer",
    "import_gguf": "trellm.io.gguf_import",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trellm' has no attribute {name!r}")
