"""Benchmark: what DVC saves. On the smoke profile, in a throwaway copy of the project:

- full:    `dvc repro` of the whole chain from nothing;
- rebuild: `dvc repro` after editing one comparison principle (label and what follows);
- pull:    a teammate's fresh clone doing `dvc repro --pull` from a local remote (nothing recomputes).

Prints each wall time and, last, `ratios: rebuild=<rebuild/full> pull=<pull/full>`.

    uv run python bench/incremental.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e import pipeline  # noqa: E402


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="caiforge-bench-") as tmp:
        work = Path(tmp)
        repo = pipeline.make_repo(work / "repo")
        full, ran = timed(lambda: pipeline.repro(repo))
        print(f"full:    {full:7.1f} s  ran {ran}")
        pipeline.dvc(repo, "remote", "add", "-d", "team", str(work / "remote"))
        pipeline.commit(repo, "build")
        pipeline.dvc(repo, "push")

        pipeline.edit_first(repo, "comparison", "text", "Which response is kinder and less likely to cause harm?")
        rebuild, ran = timed(lambda: pipeline.repro(repo))
        print(f"rebuild: {rebuild:7.1f} s  ran {ran}")

        mate = work / "mate"
        pipeline.sh(work, "git", "clone", "-q", str(repo), str(mate))
        pull, ran = timed(lambda: pipeline.repro(mate, "--pull"))
        print(f"pull:    {pull:7.1f} s  ran {ran}")
    print(f"ratios: rebuild={rebuild / full:.3f} pull={pull / full:.3f}")


if __name__ == "__main__":
    main()
