"""Built-in architectures. Each module registers one or more ArchSpecs on import."""

from trellm.models.architectures import gemma3, llama, mistral, phi3, qwen2, qwen3  # noqa: F401
