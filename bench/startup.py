"""Benchmark: what each stage pays before it does any work, with and without installed bytecode, and the
embedder load with and without sentence-transformers.

For every stage in dvc.yaml, a fresh interpreter in the project root imports `stages/<name>.py` and builds its
config exactly as the stage does (params through DVC, constitution parts, validation): the fixed start-up cost
every `dvc repro` of that stage pays. Twice: as installed (`compile-bytecode = true` in pyproject.toml puts .pyc
files next to every module) and with PYTHONPYCACHEPREFIX pointing at an empty folder and
PYTHONDONTWRITEBYTECODE=1, which is what every process paid before wherever bytecode is not written at import
(containers commonly set PYTHONDONTWRITEBYTECODE). `python -c pass` is the floor. Then the embedder that
`curate` and `evaluate` load, both ways, in fresh interpreters: `SentenceTransformer(folder)` (what caiforge used
before) and `caiforge.embeddings.load()` (plain transformers; the same vectors, see tests/unit/test_embeddings.py).

Each measurement runs `--repeats` times, alternating, and the fastest counts. Last lines, side by side in this
run: `bytecode: <all stages without / with>` and `embedder: <sentence-transformers / caiforge>`.

    uv run python bench/startup.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STAGE = """
import time; t = time.perf_counter()
from pathlib import Path
from caiforge import config, preflight
cls = preflight.config_class(Path("."), {stage!r})
config.load({stage!r}, cls, argv=[])
print(time.perf_counter() - t)
"""

SENTENCE_TRANSFORMERS = """
import time; t = time.perf_counter()
from sentence_transformers import SentenceTransformer
from caiforge import embeddings
model = SentenceTransformer(str(embeddings.model_dir()), device="cpu", local_files_only=True)
model.encode(["warm up"], normalize_embeddings=True)
print(time.perf_counter() - t)
"""

CAIFORGE = """
import time; t = time.perf_counter()
from caiforge import embeddings
embeddings.embed(["warm up"])
print(time.perf_counter() - t)
"""


def run(code: str, env: dict[str, str] | None = None) -> float:
    """Wall seconds of a fresh interpreter running `code` (process start included)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return time.perf_counter() - t0


def fastest(codes: dict[str, tuple[str, dict[str, str] | None]], repeats: int) -> dict[str, float]:
    best = {name: float("inf") for name in codes}
    for _ in range(repeats):
        for name, (code, env) in codes.items():
            best[name] = min(best[name], run(code, env))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from caiforge import preflight

    floor = fastest({"floor": ("pass", None)}, args.repeats)["floor"]
    print(f"{'python -c pass':<16} {floor:6.2f} s")
    with tempfile.TemporaryDirectory(prefix="caiforge-no-pyc-") as empty:
        cold = {"PYTHONPYCACHEPREFIX": empty, "PYTHONDONTWRITEBYTECODE": "1"}
        codes = {}
        for stage in preflight.stage_names(ROOT):
            codes[(stage, "pyc")] = (STAGE.format(stage=stage), None)
            codes[(stage, "source")] = (STAGE.format(stage=stage), cold)
        seconds = fastest(codes, args.repeats)
    print(f"{'stage start-up':<16} {'bytecode':>8} {'source':>8}   (imports + config through DVC, seconds)")
    for stage in preflight.stage_names(ROOT):
        print(f"{stage:<16} {seconds[(stage, 'pyc')]:8.2f} {seconds[(stage, 'source')]:8.2f}")
    with_pyc = sum(v for (_, kind), v in seconds.items() if kind == "pyc")
    without = sum(v for (_, kind), v in seconds.items() if kind == "source")
    print(f"{'all stages':<16} {with_pyc:8.2f} {without:8.2f}")
    emb = fastest({"sentence-transformers": (SENTENCE_TRANSFORMERS, None), "caiforge": (CAIFORGE, None)}, args.repeats)
    for name, value in emb.items():
        print(f"embedder via {name:<22} {value:6.2f} s  (fresh interpreter, load + one sentence)")
    print(f"bytecode: {without / with_pyc:.2f}")
    print(f"embedder: {emb['sentence-transformers'] / emb['caiforge']:.2f}")


if __name__ == "__main__":
    main()
