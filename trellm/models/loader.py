"""load_model: a Hugging Face model folder -> a DecoderModel on a device."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from trellm.errors import ConfigError
from trellm.io.hf_folder import read_generation_config, read_model_config
from trellm.io.safetensors import CheckpointReader
from trellm.io.weights import WeightSource
from trellm.models.config import ModelConfig
from trellm.models.decoder import DecoderModel, fused_parts
from trellm.models.registry import get_arch
from trellm.quant.base import MethodFor
from trellm.quant.exl3 import EXL3Method
from trellm.quant.fp16 import FP16Method

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "half": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name.removeprefix("torch.")]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; use one of float32, float16, bfloat16") from None


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """The checkpoint's 16-bit dtype on GPUs; float32 on CPUs, where 16-bit matmuls are slow or missing."""
    if device.type == "cpu":
        return torch.float32
    if cfg.torch_dtype in ("float16", "bfloat16"):
        return _DTYPES[cfg.torch_dtype]
    return torch.bfloat16


def method_chooser(cfg: ModelConfig, source: WeightSource) -> MethodFor:
    """Which QuantMethod stores each linear, from quantization_config and the tensors present.

    EXL3 files quantize every linear including the head; a linear stored as a plain
    `.weight` in the same file (some writers keep small layers in 16 bits) stays fp16.
    """
    qc = cfg.quantization_config
    fp16 = FP16Method()
    if not qc:
        return lambda name: fp16
    name = qc.get("quant_method") if isinstance(qc, dict) else None
    if name == "exl3":
        exl3 = EXL3Method()
        return lambda layer: exl3 if f"{layer}.trellis" in source else fp16
    raise ConfigError(
        f"quantization method {name!r} in config.json is not supported; trellm runs 16-bit and EXL3 models "
        "(convert this model from its unquantized original with `trellm convert`)"
    )


def load_config(path: str | Path) -> ModelConfig:
    return ModelConfig.from_hf(read_model_config(path), read_generation_config(path))


def load_model(
    path: str | Path, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
    fuse: bool = True,
) -> DecoderModel:
    """fuse=False keeps every linear a separate call (the converter hooks and replaces single linears)."""
    path = Path(path)
    cfg = load_config(path)
    spec = get_arch(cfg.architecture)
    dev = torch.device(device) if device is not None else default_device()
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but torch sees no CUDA device; use --device cpu")
    if dev.type == "cuda" and dev.index is not None:
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {dev} was requested but torch sees {torch.cuda.device_count()} CUDA device(s)")
        # Triton kernels launch on the current device and CUDA graphs capture on it: make it the model's.
        torch.cuda.set_device(dev)
    dt = parse_dtype(dtype) if dtype is not None else default_dtype(cfg, dev)
    source = WeightSource(CheckpointReader(path), fused_parts(cfg, spec))
    model = DecoderModel(cfg, spec, method_chooser(cfg, source))
    model.load(source, device=dev, dtype=dt)
    if fuse:
        model.fuse_projections()
    model.eval()
    log.info("loaded %s (%s) on %s in %s", path.name, cfg.architecture, dev, dt)
    return model
