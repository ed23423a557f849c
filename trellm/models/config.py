"""ModelConfig: what the generic decoder needs to know about a model, parsed from config.json.

config.json comes in several generations of key names (`rope_theta` + `rope_scaling`
vs `rope_parameters`, `torch_dtype` vs `dtype`, text models nested under
`text_config`); `ModelConfig.from_hf` accepts all of them and produces one
normalised, validated description. Architecture-specific keys are read by the
architecture's own `adapt_config` hook (see models/registry.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from trellm.errors import ConfigError
from trellm.io.hf_folder import as_id_list

FULL = "full_attention"
SLIDING = "sliding_attention"
LAYER_TYPES = (FULL, SLIDING)

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
# Older names for the same RoPE variants found in published configs.
_ROPE_ALIASES = {"su": "longrope", "mrope": "default"}


@dataclass(slots=True)
class RopeConfig:
    """One RoPE variant (a model may use different ones per layer type, e.g. Gemma 3)."""

    rope_type: str = "default"
    theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    # llama3
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    # yarn
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    # longrope
    short_factor: list[float] | None = None
    long_factor: list[float] | None = None

    def __post_init__(self) -> None:
        self.rope_type = _ROPE_ALIASES.get(self.rope_type, self.rope_type)
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"RoPE type {self.rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
            )
        if not self.theta or self.theta <= 0:
            raise ConfigError(f"rope_theta must be positive, got {self.theta!r}")
        if not 0 < self.partial_rotary_factor <= 1:
            raise ConfigError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        needs = {
            "linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            "yarn": ("factor", "original_max_position_embeddings"),
            "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
        }.get(self.rope_type, ())
        missing = [k for k in needs if getattr(self, k) is None]
        if missing:
            raise ConfigError(f"RoPE type {self.rope_type!r} needs {', '.join(missing)} in its rope parameters")

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, theta: float | None, max_position_embeddings: int,
                  partial_rotary_factor: float | None = None,
                  original_max_position_embeddings: int | None = None) -> RopeConfig:
        """Build from a `rope_scaling` / `rope_parameters` dict, filling what the config holds elsewhere."""
        d = dict(d or {})
        rope_type = d.get("rope_type") or d.get("type") or "default"
        theta = d.get("rope_theta", theta)
        kw: dict[str, Any] = {
            "rope_type": rope_type,
            "theta": float(theta) if theta is not None else 10000.0,
            "partial_rotary_factor": float(d.get("partial_rotary_factor") or partial_rotary_factor or 1.0),
        }
        names = {f.name for f in fields(cls)} - {"rope_type", "theta", "partial_rotary_factor"}
        for k in names:
            if d.get(k) is not None:
                kw[k] = d[k]
        rope_type = _ROPE_ALIASES.get(rope_type, rope_type)
        if rope_type in ("llama3", "yarn", "longrope"):
            # Phi-3 keeps the pretraining length outside the rope dict; it takes precedence there.
            if original_max_position_embeddings is not None:
                kw["original_max_position_embeddings"] = original_max_position_embeddings
            kw.setdefault("original_max_position_embeddings", max_position_embeddings)
        if rope_type in ("yarn", "longrope") and kw.get("factor") is None:
            omax = kw.get("original_max_position_embeddings")
            if omax:
                kw["factor"] = max_position_embeddings / omax
        return cls(**kw)


@dataclass(slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    layer_types: list[str] = field(default_factory=list)
    sliding_window: int | None = None
    rope: dict[str, RopeConfig] = field(default_factory=dict)
    attn_scale: float | None = None  # softmax scale; None = head_dim ** -0.5
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    quantization_config: dict[str, Any] | None = None
    model_type: str = ""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"config value {name} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"
            )
        if not self.layer_types:
            self.layer_types = [FULL] * self.num_layers
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ConfigError(f"unsupported layer types {bad} (supported: {', '.join(LAYER_TYPES)})")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ConfigError("the config has sliding-attention layers but no sliding_window size")
        for t in set(self.layer_types):
            if t not in self.rope:
                raise ConfigError(f"no RoPE parameters for layer type {t!r}")

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    def rope_switch_length(self) -> int | None:
        """Sequence length beyond which longrope uses its long factors (None without longrope).

        Keys cached before the switch were rotated with the short factors; generation
        recomputes the cache once when a sequence crosses this length, as Phi-3 does.
        """
        lengths = [r.original_max_position_embeddings for r in self.rope.values() if r.rope_type == "longrope"]
        return min(lengths) if lengths else None

    def window(self, layer_idx: int) -> int | None:
        """Sliding window of a layer in tokens (a query sees itself and window-1 earlier keys), None = global."""
        return self.sliding_window if self.layer_types[layer_idx] == SLIDING else None

    # ---- parsing ---------------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, raw: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
        """Parse a Hugging Face config.json (and generation_config.json) dict."""
        from trellm.models.registry import get_arch

        archs = raw.get("architectures") or []
        if not isinstance(archs, list) or not archs:
            raise ConfigError("config.json has no 'architectures' list; it is not a Hugging Face model config")
        spec = get_arch(archs[0])
        # Multimodal configs nest the language model; top-level keys (dtype, quantization) still apply.
        text = dict(raw.get("text_config") or {})
        cfg = {**{k: v for k, v in raw.items() if k != "text_config"}, **text} if text else dict(raw)
        for k, v in spec.config_defaults.items():
            cfg.setdefault(k, v)  # an explicit null stays null (Mistral's "sliding_window": null)

        def need(key: str, *alts: str) -> Any:
            for k in (key, *alts):
                if cfg.get(k) is not None:
                    return cfg[k]
            raise ConfigError(f"config.json is missing {key!r}, which a {archs[0]} model needs")

        hidden = need("hidden_size", "n_embd", "d_model")
        heads = need("num_attention_heads", "n_head")
        max_pos = cfg.get("max_position_embeddings") or 4096
        head_dim = cfg.get("head_dim") or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else 0)
        generation = generation or {}
        eos = as_id_list(generation.get("eos_token_id")) or as_id_list(cfg.get("eos_token_id"))
        bos = as_id_list(generation.get("bos_token_id", cfg.get("bos_token_id")))
        pad = as_id_list(generation.get("pad_token_id", cfg.get("pad_token_id")))

        kw: dict[str, Any] = dict(
            architecture=archs[0],
            model_type=str(cfg.get("model_type", "")),
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size", "ffn_dim"),
            num_layers=need("num_hidden_layers", "n_layer"),
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps") or 1e-6),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            hidden_act=str(cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu"),
            qkv_bias=bool(cfg.get("attention_bias", False)),
            o_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            layer_types=list(cfg.get("layer_types") or []),
            sliding_window=cfg.get("sliding_window"),
            attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
            bos_token_id=bos[0] if bos else None,
            eos_token_ids=eos,
            pad_token_id=pad[0] if pad else None,
            quantization_config=raw.get("quantization_config") or cfg.get("quantization_config"),
        )
        if not kw["layer_types"] and kw["sliding_window"]:
            kw["layer_types"] = [SLIDING] * kw["num_layers"]
        spec.adapt_config(cfg, kw)
        if "rope" not in kw:
            kw["rope"] = parse_rope(cfg, kw["layer_types"] or [FULL], max_pos)
        if not any(t == SLIDING for t in kw["layer_types"]):
            kw["sliding_window"] = None
        try:
            return cls(**kw)
        except TypeError as e:  # a wrong JSON type reached a numeric check
            raise ConfigError(f"config.json has a value of the wrong type: {e}") from e


def parse_rope(cfg: dict[str, Any], layer_types: list[str], max_pos: int) -> dict[str, RopeConfig]:
    """RoPE parameters per layer type from either the old or the new config form."""
    params = cfg.get("rope_parameters")
    common = dict(
        theta=cfg.get("rope_theta"),
        max_position_embeddings=max_pos,
        partial_rotary_factor=cfg.get("partial_rotary_factor"),
        original_max_position_embeddings=cfg.get("original_max_position_embeddings"),
    )
    if isinstance(params, dict) and any(k in params for k in LAYER_TYPES):
        out = {}
        for t in LAYER_TYPES:
            if params.get(t) is not None:
                out[t] = RopeConfig.from_dict(params[t], **common)
        for t in set(layer_types) - set(out):
            out[t] = RopeConfig.from_dict({}, **common)
        return out
    if params is not None and not isinstance(params, dict):
        raise ConfigError("config.json 'rope_parameters' must be an object")
    d = params if isinstance(params, dict) else (cfg.get("rope_scaling") or {})
    if not isinstance(d, dict):
        raise ConfigError("config.json 'rope_scaling' must be an object or null")
    rope = RopeConfig.from_dict(d, **common)
    return {t: rope for t in set(layer_types) | {FULL}}
