"""Checkpoint reading: shards, lazy loading, and one clear error per kind of damage."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from trellm.errors import SafetensorsError, TensorError
from trellm.io.safetensors import CheckpointReader
from trellm.io.weights import FusedPart, WeightSource
from trellm.models.loader import load_model


def test_sharded_index_and_slices(tmp_path):
    a, b = torch.randn(6, 4), torch.randn(3)
    save_file({"a": a}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": b}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    r = CheckpointReader(tmp_path)
    assert sorted(r.names()) == ["a", "b"] and r.info("a").shape == (6, 4) and r.total_bytes() == 4 * 27
    torch.testing.assert_close(r.get("b"), b)
    torch.testing.assert_close(r.get("a", rows=(2, 5)), a[2:5])
    src = WeightSource(r, {"x.q": FusedPart("x.qk", 0, 2)})
    with pytest.raises(TensorError, match="missing"):
        src.get("m.x.q.weight")


def test_fused_rows(tmp_path):
    w = torch.randn(5, 3)
    save_file({"layer.x.qk.weight": w}, tmp_path / "model.safetensors")
    src = WeightSource(CheckpointReader(tmp_path), {"x.q": FusedPart("x.qk", 0, 2), "x.k": FusedPart("x.qk", 2, 5)})
    torch.testing.assert_close(src.get("layer.x.k.weight", shape=(3, 3)), w[2:])
    with pytest.raises(TensorError, match=r"\[2, 3\].*\[2, 4\]"):
        src.get("layer.x.q.weight", shape=(2, 4))


def test_missing_index_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(SafetensorsError, match="gone.safetensors"):
        CheckpointReader(tmp_path)


def test_no_safetensors_at_all(tmp_path):
    with pytest.raises(SafetensorsError, match="no .safetensors files"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda raw: raw[:5], "only 5 bytes"),
        (lambda raw: (10**9).to_bytes(8, "little") + raw[8:], "header length"),
        (lambda raw: raw[:8] + b"\xff" * (len(raw) - 8), "not valid JSON"),
        (lambda raw: raw[: len(raw) - 16], "truncated or corrupt"),
    ],
)
def test_corrupt_files_name_the_problem(tmp_path, damage, words):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(8, 8)}, path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(SafetensorsError, match=words) as e:
        CheckpointReader(tmp_path)
    assert str(path) in str(e.value)


def _model_tensors(tiny_model_dir, kind="llama"):
    from safetensors.torch import load_file

    path, _ = tiny_model_dir(kind)
    return path, load_file(path / "model.safetensors")


def test_missing_tensor_is_named(tiny_model_dir, tmp_path):
    path, tensors = _model_tensors(tiny_model_dir)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(TensorError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_model(tmp_path, device="cpu")


def test_misshapen_tensor_names_expected_and_found(tiny_model_dir, tmp_path):
    path, tensors = _model_tensors(tiny_model_dir)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(5, 72)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(TensorError) as e:
        load_model(tmp_path, device="cpu")
    msg = str(e.value)
    assert "model.layers.0.self_attn.k_proj.weight" in msg and "[5, 72]" in msg and "[24, 72]" in msg


def test_loading_is_lazy(tmp_path):
    """Opening a 512 MB checkpoint and reading one small tensor must not read the rest into RAM."""
    big = {f"t{i}": torch.zeros(4096, 4096, dtype=torch.float32) for i in range(8)} | {"small": torch.ones(3)}
    save_file(big, tmp_path / "model.safetensors")
    del big
    code = textwrap.dedent(f"""
        import resource, torch
        from trellm.io.safetensors import CheckpointReader
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        r = CheckpointReader({str(tmp_path)!r})
        assert r.total_bytes() > 500e6
        assert r.get("small").tolist() == [1.0, 1.0, 1.0]
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    grown_mb = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    assert grown_mb < 64, f"reading one tensor grew the process by {grown_mb} MB"
