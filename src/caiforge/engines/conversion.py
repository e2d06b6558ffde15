"""llama.cpp's safetensors -> GGUF conversion, for the managed llama.cpp launchers (`caiforge.engines.serving`).

A role's safetensors directory is converted with llama.cpp's own `convert_hf_to_gguf.py`, the one the pinned
llama-cpp-python release vendors, and the GGUF is cached by the weights' fingerprint, the GGUF type and the
converter's hash. The converter needs no C++ build: `converter` finds it or unpacks it from the sdist uv.lock pins.
A model the converter refuses is a one-line error naming the directory and the converter's reason.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from caiforge import io

log = logging.getLogger(__name__)

LLAMA_CPP_VERSION = "0.3.36"
"""The llama-cpp-python release whose vendored llama.cpp `.ci/build-llama-server` builds (binary and converter)."""


def default_llama_dir() -> Path:
    """Where `.ci/build-llama-server` installs `llama-server` and the GGUF converter."""
    return Path.home() / ".cache" / "caiforge" / f"llama-server-{LLAMA_CPP_VERSION}"


def converter_version() -> str:
    """A short hash of llama.cpp's converter script: part of the GGUF cache key and of the row identity."""
    return hashlib.sha256(converter().read_bytes()).hexdigest()[:12]


SCRIPT = "convert_hf_to_gguf.py"
PARTS = (SCRIPT, "conversion", "gguf-py")
"""The converter and the two folders it imports from (the script is copied last: the mark that all is there)."""


def converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py, found or made without a C++ build: $CAIFORGE_LLAMA_CONVERTER; else the
    one `.ci/build-llama-server` installs beside llama-server; else one unpacked (once) from the llama-cpp-python
    sdist uv.lock pins, taken from uv's cache (where `uv sync --group server` left it) or downloaded from PyPI and
    checked against the lock's sha256."""
    stated = os.environ.get("CAIFORGE_LLAMA_CONVERTER")
    if stated:
        if not Path(stated).is_file():
            raise FileNotFoundError(
                f"{stated}: $CAIFORGE_LLAMA_CONVERTER names no file (point it at a convert_hf_to_gguf.py beside its "
                "conversion/ and gguf-py/ folders, or unset it)"
            )
        return Path(stated)
    for home in (default_llama_dir(), unpacked_dir()):
        if (home / SCRIPT).is_file():
            return home / SCRIPT
    return unpack(unpacked_dir(), vendored_tree() or _download_sdist())


def unpacked_dir() -> Path:
    return Path.home() / ".cache" / "caiforge" / f"llama-converter-{LLAMA_CPP_VERSION}"


def vendored_tree(uv_cache: Path | None = None) -> Path | None:
    """The llama.cpp tree of the pinned llama-cpp-python sdist in uv's cache (None: not there)."""
    root = uv_cache or Path(
        os.environ.get("UV_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "uv"
    )
    pattern = f"sdists-v*/pypi/llama-cpp-python/{LLAMA_CPP_VERSION}/*/src/vendor/llama.cpp/{SCRIPT}"
    found = sorted(root.glob(pattern))
    return found[-1].parent if found else None


def unpack(dest: Path, source: Path) -> Path:
    """Copy the converter's parts from `source` (a llama.cpp tree, or an sdist .tar.gz) into `dest`, atomically;
    returns the script's path there."""
    import tarfile

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}-") as tmp:
        staged = Path(tmp) / dest.name
        staged.mkdir()
        if source.is_dir():
            if not (source / SCRIPT).is_file():
                raise FileNotFoundError(f"{source}: holds no llama.cpp {SCRIPT}")
            for part in PARTS:
                copy = shutil.copytree if (source / part).is_dir() else shutil.copy2
                copy(source / part, staged / part)
        else:
            prefix = f"llama_cpp_python-{LLAMA_CPP_VERSION}/vendor/llama.cpp/"
            with tarfile.open(source) as tar:
                members = [m for m in tar.getmembers() if m.name.removeprefix(prefix).split("/")[0] in PARTS]
                members = [m for m in members if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
                for m in members:
                    m.name = m.name.removeprefix(prefix)
                tar.extractall(staged, members=members, filter="data")
        if not (staged / SCRIPT).is_file():
            raise FileNotFoundError(f"{source}: holds no llama.cpp {SCRIPT}")
        if dest.exists():
            shutil.rmtree(dest)
        staged.rename(dest)
    log.info("llama.cpp's GGUF converter unpacked from %s into %s", source, dest)
    return dest / SCRIPT


def locked_sdist(lock: Path) -> tuple[str, str]:
    """(url, sha256) of the llama-cpp-python sdist `lock` (uv.lock) pins at LLAMA_CPP_VERSION."""
    import tomllib

    for package in tomllib.loads(lock.read_text(encoding="utf-8")).get("package", []):
        if package.get("name") == "llama-cpp-python" and package.get("version") == LLAMA_CPP_VERSION:
            sdist = package.get("sdist") or {}
            if "url" in sdist and str(sdist.get("hash", "")).startswith("sha256:"):
                return sdist["url"], sdist["hash"].removeprefix("sha256:")
    raise FileNotFoundError(f"{lock}: pins no llama-cpp-python {LLAMA_CPP_VERSION} sdist")


def _download_sdist() -> Path:
    """The pinned sdist, downloaded into the caiforge cache and checked against uv.lock's sha256."""
    from caiforge import config

    url, sha256 = locked_sdist(config.ROOT / "uv.lock")
    out = unpacked_dir().parent / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s for llama.cpp's GGUF converter (once)", url)
        part = out.with_suffix(f".part{os.getpid()}")
        with urllib.request.urlopen(url, timeout=300) as resp, part.open("wb") as fh:
            shutil.copyfileobj(resp, fh)
        digest = hashlib.sha256(part.read_bytes()).hexdigest()
        if digest != sha256:
            part.unlink()
            raise RuntimeError(f"{url}: sha256 {digest} is not the {sha256} uv.lock pins")
        part.replace(out)
    return out


def gguf_for(model_dir: Path, gguf_type: str, cache_dir: Path | None = None) -> Path:
    """The GGUF llama.cpp serves for `model_dir`: converted once by llama.cpp's own converter and cached under the
    directory's weights fingerprint, the type and the converter's own hash (a newer converter can write a different
    file), so the same weights are never converted twice by one converter. A conversion killed midway leaves a
    `.converting-<pid>-*` folder; the next call removes those whose process is gone."""
    from caiforge.engines import identity

    cache_dir = cache_dir or Path(os.environ.get("CAIFORGE_GGUF_CACHE") or Path.home() / ".cache/caiforge/gguf")
    script = converter()
    out = cache_dir / f"{identity.fingerprint(model_dir)[:24]}-{gguf_type}-conv{converter_version()}.gguf"
    if out.is_file():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_dead_conversions(cache_dir)
    from caiforge import models

    source = models.resolve(model_dir)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=f".converting-{os.getpid()}-") as tmp:
        part = Path(tmp) / out.name
        cmd = [sys.executable, str(script), str(source), "--outfile", str(part), "--outtype", gguf_type]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode or not part.is_file():
            raise RuntimeError(
                f"{model_dir}: llama.cpp's converter cannot make a {gguf_type} GGUF of it: "
                f"{_refusal(done.stderr or done.stdout)} (serve it with launch vllm or sglang, or in-process)"
            )
        part.replace(out)  # atomic: a half-written GGUF never sits at `out`
    log.info("converted %s to %s", source, out)
    return out


def _refusal(output: str) -> str:
    """The one line that says why a conversion failed: the last exception line of its traceback (e.g.
    "NotImplementedError: BPE pre-tokenizer was not recognized ..."), else the output's last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b.*:", line)]
    return (errors or lines or ["no output"])[-1]


def _remove_dead_conversions(cache_dir: Path) -> None:
    """Delete `.converting-<pid>-*` folders whose process no longer runs (a live one is another stage's)."""
    for folder in cache_dir.glob(".converting-*"):
        pid = folder.name.split("-")[1]  # .converting-<pid>-<random>
        if not pid.isdigit() or not io.process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
