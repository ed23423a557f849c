"""Writing EXL3 tensors and models (EXL3_FORMAT.md §1–2).

`linear_tensors` gives the stored tensors of one quantized linear; the converter
(issue 4) feeds it real trellis codes. `write_random_exl3_model` builds a whole
model with random codes — every bit pattern is a valid trellis — which is what
speed work and end-to-end tests need: the real shape, loaded through the real
reader, with no conversion run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from trellm.io.safetensors_writer import ShardedWriter, atomic_folder, write_json
from trellm.layers.linear import Linear
from trellm.models.config import ModelConfig
from trellm.models.decoder import DecoderModel
from trellm.models.registry import get_arch
from trellm.quant import exl3_format as fmt
from trellm.quant.exl3 import round_up
from trellm.quant.fp16 import FP16Method

WRITER_VERSION = "trellm-0.1"


def linear_tensors(prefix: str, trellis: torch.Tensor, suh: torch.Tensor, svh: torch.Tensor, codebook: str,
                   bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The tensors one quantized linear stores, by full name."""
    if codebook not in fmt.CODEBOOKS:
        raise ValueError(f"unknown codebook {codebook!r}")
    out = {f"{prefix}.trellis": trellis.to(torch.int16), f"{prefix}.suh": suh.to(torch.float16),
           f"{prefix}.svh": svh.to(torch.float16)}
    if codebook in fmt.MARKERS:
        out[f"{prefix}.{codebook}"] = torch.tensor(fmt.as_int32(fmt.MARKERS[codebook]), dtype=torch.int32)
    if bias is not None:
        out[f"{prefix}.bias"] = bias.to(torch.float16)
    return out


def random_linear(in_features: int, out_features: int, bits: int, *, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random trellis codes with random-sign scales, so W has entries of RMS ~ 1/sqrt(in_features)."""
    k, n = round_up(in_features, 128), round_up(out_features, 128)
    trellis = torch.randint(-(1 << 15), 1 << 15, (k // 16, n // 16, 16 * bits), dtype=torch.int16,
                            generator=generator)
    sign = lambda size: torch.randint(0, 2, (size,), generator=generator).float() * 2 - 1  # noqa: E731
    suh = sign(k)
    svh = sign(n) / math.sqrt(in_features)  # the codebooks' values have RMS ~1
    return trellis, suh, svh


def write_random_exl3_model(config: dict[str, Any], out_dir: str | Path, *, bits: int | None = 4, head_bits: int = 6,
                            codebook: str = "mul1", seed: int = 0, shard_bytes: int = 8 * 2**30,
                            dtype: torch.dtype = torch.bfloat16) -> Path:
    """An EXL3 model folder with the shape of `config` (a Hugging Face config.json dict) and random weights;
    bits=None writes the same model unquantized (random `dtype` weights of std 0.02), the 16-bit baseline."""
    cfg = ModelConfig.from_hf(config)
    spec = get_arch(cfg.architecture)
    skeleton = DecoderModel(cfg, spec, lambda name: FP16Method())  # names and shapes only; no weights
    g = torch.Generator().manual_seed(seed)
    qc = {"quant_method": "exl3", "version": WRITER_VERSION, "bits": float(bits or 16), "head_bits": head_bits,
          "codebook": codebook}
    with atomic_folder(out_dir, overwrite=True) as tmp:
        writer = ShardedWriter(tmp, shard_bytes=shard_bytes)
        writer.add("model.embed_tokens.weight", torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g).to(dtype))
        for module in skeleton.modules():
            if isinstance(module, Linear) and bits is None:
                writer.add(f"{module.name}.weight", (torch.randn(module.out_features, module.in_features, generator=g)
                                                     * 0.02).to(dtype))
                if module.impl.has_bias:
                    writer.add(f"{module.name}.bias", (torch.randn(module.out_features, generator=g) * 0.1).to(dtype))
            elif isinstance(module, Linear):
                k_bits = head_bits if module.name == "lm_head" else bits
                trellis, suh, svh = random_linear(module.in_features, module.out_features, k_bits, generator=g)
                bias = None
                if module.impl.has_bias:
                    bias = torch.randn(module.out_features, generator=g) * 0.1
                for name, t in linear_tensors(module.name, trellis, suh, svh, codebook, bias).items():
                    writer.add(name, t)
        norms = {"model.norm": skeleton.norm}
        for layer in skeleton.layers:
            norms |= layer.named_norms()
        for name, norm in norms.items():
            writer.add(f"{name}.weight", torch.full((norm.dim,), 1.0 - spec.norm_offset).to(dtype))
        writer.finish()
        base = {**config, "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch.")}
        write_json(tmp / "config.json", base if bits is None else {**base, "quantization_config": qc})
        if bits is not None:
            write_json(tmp / "quantization_config.json", qc)
    return Path(out_dir)
