"""Lazy, memory-mapped reading of safetensors checkpoints (single file or sharded).

Headers are parsed here (not only by the safetensors library) so that a corrupt
file produces an error that names the file and what is wrong with it, and so
that `trellm inspect` can count parameters and bytes without touching tensor
data. Tensor data is read through `safetensors.safe_open`, which memory-maps the
file: a tensor costs RAM only while it is being copied to its destination.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from trellm.errors import SafetensorsError, TensorError

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# Bytes per element of every dtype the safetensors format defines.
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

# A header larger than this is not a real checkpoint header (the format caps it at 100 MB).
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives and what it looks like, read from a header."""

    name: str
    file: Path
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _DTYPE_BYTES[self.dtype]


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one .safetensors header: tensor infos and the metadata dict."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{path} is not a safetensors file: it is only {size} bytes long")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > _MAX_HEADER or 8 + hlen > size:
                raise SafetensorsError(
                    f"{path} has a corrupt safetensors header (header length {hlen} for a {size}-byte file); "
                    "the file is truncated or not a safetensors file: download it again"
                )
            raw = f.read(hlen)
    except OSError as e:
        raise SafetensorsError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(
            f"{path} has a corrupt safetensors header (not valid JSON: {e}); download the file again"
        ) from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path} has a corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - hlen
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(f"{path}: header entry for tensor {name!r} is malformed") from e
        if dtype not in _DTYPE_BYTES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        info = TensorInfo(name, path, dtype, shape)
        if not (0 <= start <= end <= data_len) or end - start != info.nbytes:
            raise SafetensorsError(
                f"{path}: tensor {name!r} ({dtype}, shape {list(shape)}) points outside the file or has the wrong "
                f"byte length (offsets {start}..{end}, data section {data_len} bytes); the file is truncated or corrupt"
            )
        infos[name] = info
    return infos, metadata


class CheckpointReader:
    """All tensors of a model folder, by name, loaded on demand.

    Accepts a folder with `model.safetensors`, or with `model.safetensors.index.json`
    and its shards, or with any set of `*.safetensors` files (names must not collide).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        files = self._find_files()
        self._infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for file in files:
            infos, meta = read_header(file)
            self.metadata.update(meta)
            for name, info in infos.items():
                if name in self._infos:
                    raise SafetensorsError(
                        f"tensor {name!r} appears in both {self._infos[name].file.name} and {file.name}; "
                        "remove the stray file from the folder"
                    )
                self._infos[name] = info
        self._handles: dict[Path, object] = {}

    def _find_files(self) -> list[Path]:
        index = self.folder / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise SafetensorsError(f"{index} is not a valid safetensors index ({e}); download it again") from e
            files = sorted({self.folder / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise SafetensorsError(
                    f"{index.name} lists shards that are not in {self.folder}: {', '.join(missing)}; "
                    "download the missing files"
                )
            return files
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise SafetensorsError(
                f"no .safetensors files in {self.folder}: trellm reads safetensors checkpoints "
                "(convert .bin/.pt checkpoints first, or import a GGUF file with `trellm import-gguf`)"
            )
        return files

    # ---- metadata -------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise TensorError(
                f"tensor {name!r} is missing from the checkpoint in {self.folder}; "
                "the model files are incomplete or were written for a different architecture"
            ) from None

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    # ---- data -----------------------------------------------------------------------------------------

    def _handle(self, file: Path):
        h = self._handles.get(file)
        if h is None:
            from safetensors import safe_open

            try:
                h = safe_open(str(file), framework="pt", device="cpu")
            except Exception as e:  # the library raises its own error type
                raise SafetensorsError(f"cannot open {file}: {e}") from e
            self._handles[file] = h
        return h

    def get(
        self,
        name: str,
        *,
        shape: tuple[int, ...] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Load one tensor (optionally rows [start, end) of dim 0), check its shape, convert and move it."""
        info = self.info(name)
        h = self._handle(info.file)
        try:
            if rows is None:
                t = h.get_tensor(name)
            else:
                t = h.get_slice(name)[rows[0] : rows[1]]
        except Exception as e:
            raise SafetensorsError(f"cannot read tensor {name!r} from {info.file}: {e}") from e
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise TensorError(
                f"tensor {name!r} has shape {list(t.shape)} but the model config implies {list(shape)}; "
                "config.json does not match the weights"
            )
        if dtype is not None or device is not None:
            t = t.to(device=device, dtype=dtype)
        return t

    def close(self) -> None:
        self._handles.clear()
