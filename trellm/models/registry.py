"""The architecture registry.

An architecture is described by an `ArchSpec`: only the ways it differs from the
Llama-shaped generic decoder (models/decoder.py). Adding a Llama-like model is a
few lines in a new file under models/architectures/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from trellm.errors import UnsupportedArchitectureError


def _no_adapt(cfg: dict[str, Any], kw: dict[str, Any]) -> None:
    return None


@dataclass(frozen=True, slots=True)
class ArchSpec:
    name: str  # Hugging Face architecture string, e.g. "LlamaForCausalLM"
    # Values used when config.json omits a key (the defaults of the HF config class).
    config_defaults: dict[str, Any] = field(default_factory=dict)
    # Hook reading architecture-specific config keys: (merged config dict, ModelConfig kwargs) -> None.
    adapt_config: Callable[[dict[str, Any], dict[str, Any]], None] = _no_adapt
    # Norms: Gemma scales by (1 + w) and stores w; everybody else scales by w.
    norm_offset: float = 0.0
    # Gemma-style norms round only at the end; Llama-style round before multiplying by w.
    norm_weight_in_fp32: bool = False
    # Gemma 2/3 "sandwich" norms: an extra norm after attention and after the MLP.
    sandwich_norms: bool = False
    # Per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3).
    qk_norm: bool = False
    # Multiply token embeddings by sqrt(hidden_size) (Gemma).
    scale_embeddings: bool = False
    # Checkpoint tensors that hold several of our linears stacked on dim 0 (Phi-3):
    # fused name -> names of the parts, in order. Sizes come from the config.
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Names of the four norm slots around attention and MLP in the checkpoint.
    attn_norm: str = "input_layernorm"
    attn_post_norm: str = "post_attention_layernorm"  # only with sandwich_norms
    mlp_norm: str = "post_attention_layernorm"
    mlp_post_norm: str = "post_feedforward_layernorm"  # only with sandwich_norms


_REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    _REGISTRY[spec.name] = spec
    return spec


def supported_architectures() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_arch(name: str) -> ArchSpec:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {name!r} is not supported; supported: {', '.join(sorted(_REGISTRY))}"
        ) from None


def _load_builtin() -> None:
    # Importing the package registers every built-in architecture.
    import trellm.models.architectures  # noqa: F401
