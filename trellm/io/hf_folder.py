"""Reading the JSON files of a Hugging Face model folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trellm.errors import ConfigError


def read_json(path: Path, *, what: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: {what} is required in a model folder") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); fix or re-download it") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def read_model_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder: pass the model's folder (with config.json and *.safetensors)")
    return read_json(folder / "config.json", what="config.json")


def read_generation_config(folder: str | Path) -> dict[str, Any]:
    """generation_config.json, or {} when the folder has none."""
    path = Path(folder) / "generation_config.json"
    return read_json(path, what="generation_config.json") if path.exists() else {}


def as_id_list(value: Any) -> list[int]:
    """Normalise a token-id field that may be null, an int or a list of ints."""
    if value is None:
        return []
    if isinstance(value, bool):
        raise ConfigError(f"token id {value!r} must be an integer")
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise ConfigError(f"token id field {value!r} must be an integer or a list of integers")
