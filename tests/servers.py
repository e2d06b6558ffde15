"""Real OpenAI-compatible servers for the `openai` engine's tests, serving the embedded SmolLM2 GGUF on 127.0.0.1:
llama-cpp-python's server (the `server` dependency group, `uv run --group server pytest`) and llama.cpp's own C++
`llama-server` (built by `.ci/build-llama-server`; found at CAIFORGE_LLAMA_SERVER, on PATH, or at that script's
install path). The two answer differently (log-probs, `owned_by`), so the engine is tested against both.

Without them the tests that need one skip with a hint, except where CAIFORGE_REQUIRE_SERVER=1 /
CAIFORGE_REQUIRE_LLAMA_SERVER=1 (CI), where a missing server is a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from caiforge.engines.serving import free_port  # noqa: F401 (tests use servers.free_port)

API_KEY_ENV = "CAIFORGE_TEST_API_KEY"
API_KEY = "caiforge-test-key"


def require_llama_cpp() -> None:
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as exc:
        message = f"llama-cpp-python[server] is not installed ({exc}): run `uv run --group server pytest`"
        if os.environ.get("CAIFORGE_REQUIRE_SERVER") == "1":
            pytest.fail(message)
        pytest.skip(message)


LLAMA_SERVER_VERSION = "0.3.36"
"""The llama-cpp-python release whose vendored llama.cpp `.ci/build-llama-server` builds."""


def llama_server_binary() -> Path:
    """The C++ `llama-server` to test against; skips (or fails, under CAIFORGE_REQUIRE_LLAMA_SERVER=1) without one."""
    default = Path.home() / ".cache" / "caiforge" / f"llama-server-{LLAMA_SERVER_VERSION}" / "llama-server"
    for candidate in (os.environ.get("CAIFORGE_LLAMA_SERVER"), shutil.which("llama-server"), default):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    message = "llama.cpp's llama-server binary is not built: run `.ci/build-llama-server` (about 18 min on 2 cores)"
    if os.environ.get("CAIFORGE_REQUIRE_LLAMA_SERVER") == "1":
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    cpp: bool = False
    """llama.cpp's C++ `llama-server` (else llama-cpp-python's server)."""

    def kill(self) -> None:
        """SIGKILL, as a crashed or preempted server dies."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)


def start(
    gguf: Path,
    log_dir: Path,
    *,
    threads: int = 1,
    ready_within: float = 120.0,
    alias: str | None = None,
    port: int | None = None,
    models: dict[str, Path] | None = None,
    cpp: bool = False,
) -> Server:
    """llama-cpp-python's server on `gguf` (with `cpp`, llama.cpp's C++ `llama-server`), served as `alias`
    (default: the file's path), on `port` (default: a free one); with `models` ({served name: GGUF}, Python server
    only), every one of them instead (loaded as requests name them)."""
    port = port or free_port()
    log = log_dir / f"llama-server-{port}-{time.monotonic_ns()}.log"
    if cpp:
        if models:
            raise ValueError("tests.servers.start: `models` is for llama-cpp-python's server")
        cmd = [str(llama_server_binary()), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--ctx-size", "4096", "--threads", str(threads), "--api-key", API_KEY]
    else:
        require_llama_cpp()
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf)]
        cmd += ["--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--n_ctx", "4096", "--n_threads", str(threads), "--api_key", API_KEY]
    cmd += (["--alias", alias] if cpp else ["--model_alias", alias]) if alias else []
    if models:
        import json

        config = log.with_suffix(".json")
        served = [
            {"model": str(path), "model_alias": name, "n_ctx": 4096, "n_threads": threads}
            for name, path in models.items()
        ]
        body = {"host": "127.0.0.1", "port": port, "api_key": API_KEY, "models": served}
        config.write_text(json.dumps(body))
        cmd = [sys.executable, "-m", "llama_cpp.server", "--config_file", str(config)]
    with log.open("wb") as fh:
        process = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}/v1", process, log, cpp)
    deadline = time.monotonic() + ready_within
    request = urllib.request.Request(f"{server.url}/models", headers={"Authorization": f"Bearer {API_KEY}"})
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama.cpp server exited with {process.returncode}: {log.read_text()[-2000:]}")
        with (
            contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
            urllib.request.urlopen(request, timeout=2) as resp,
        ):
            if resp.status == 200:
                return server
        time.sleep(0.3)
    server.kill()
    raise RuntimeError(f"llama.cpp server not ready after {ready_within} s: {log.read_text()[-2000:]}")


@contextlib.contextmanager
def running(gguf: Path, log_dir: Path, **kw) -> Iterator[Server]:
    server = start(gguf, log_dir, **kw)
    try:
        yield server
    finally:
        server.kill()
