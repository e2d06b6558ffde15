"""Benchmark: one stage's wall time under two revisions of caiforge's code, in one built project, alternating; and
whether the two write the same outputs.

The base revision's `src/` and `stages/` are extracted with `git archive` into a temporary folder and run with that
`src/` first on PYTHONPATH (ahead of the project's editable install); the other side is this checkout's code. Both
run `python stages/<stage>.py <overrides> <stage>.out_dir=<one folder>` in the project (its params.yaml and data),
one after the other, `--runs` times each from an empty output folder, alternating so that a machine that slows down
mid-run slows both (a row cache outside the output folder is shared by every run: time such a stage with its cache
on a scratch folder, or expect cache hits after the first run). Then it compares the last run's outputs of each side
file by file: every file's bytes, except metrics.json (compared without its timing fields: any key that names
seconds or a runtime) and the dvclive curves (they log wall times).

Last lines: each side's walls and mean, `ratio: X` (this checkout's mean over the base's) and `same outputs: yes`
or the files that differ.

Run it in a built project, with nothing else running, e.g. rlaif trained on cpu_demo with the gate set to warn:

    uv run python bench/stage_revisions.py rlaif --base db0ff9b --runs 3 rlaif.gate.on_noise=warn
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def extract(revision: str, dest: Path) -> Path:
    """`src/` and `stages/` of `revision`, as committed, under `dest`."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", revision, "src", "stages"],
        check=True,
        capture_output=True,
    ).stdout
    dest.mkdir(parents=True)
    with tempfile.TemporaryFile() as fh:
        fh.write(archive)
        fh.seek(0)
        with tarfile.open(fileobj=fh) as tar:
            tar.extractall(dest, filter="data")
    return dest


def run_stage(code: Path, stage: str, overrides: list[str], out: Path, log: Path) -> float:
    """Seconds of one run of `code`'s stage script in the current directory (the project)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(code / "src"), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, str(code / "stages" / f"{stage}.py"), *overrides, f"{stage}.out_dir={out}"]
    start = time.perf_counter()
    with log.open("w") as fh:
        done = subprocess.run(command, env=env, stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        sys.exit(f"{tail}\n{' '.join(command)} failed (exit {done.returncode}); the end of its output is above")
    return seconds


def untimed(value: object) -> object:
    """metrics.json without the fields that hold wall times."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if "seconds" not in k and "runtime" not in k}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def differing(a: Path, b: Path) -> list[str]:
    """Relative paths whose content differs between output folders `a` and `b` (dvclive curves left out)."""
    names = {p.relative_to(a) for p in a.rglob("*") if p.is_file()} | {
        p.relative_to(b) for p in b.rglob("*") if p.is_file()
    }
    found = []
    for name in sorted(names):
        if name.parts[0] == "dvclive":
            continue
        left, right = a / name, b / name
        if not (left.is_file() and right.is_file()):
            found.append(str(name))
        elif name.name == "metrics.json":
            if untimed(json.loads(left.read_text())) != untimed(json.loads(right.read_text())):
                found.append(str(name))
        elif left.read_bytes() != right.read_bytes():
            found.append(str(name))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage")
    parser.add_argument("--base", required=True, help="the git revision to compare this checkout's code with")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="stage overrides, as on the stage script's command line")
    args = parser.parse_intermixed_args()
    with tempfile.TemporaryDirectory(prefix="caiforge-bench-") as tmp:
        sides = {args.base: extract(args.base, Path(tmp) / "base"), "this checkout": ROOT}
        walls: dict[str, list[float]] = {name: [] for name in sides}
        for i in range(args.runs):
            for name, code in sides.items():
                # One output path for both sides (the stage records it, e.g. in the model's caiforge_config.json),
                # moved aside after each run.
                out, kept = Path(tmp) / "out", Path(tmp) / "kept" / ("base" if code != ROOT else "this")
                seconds = run_stage(code, args.stage, args.overrides, out, Path(tmp) / f"run{i}.log")
                shutil.rmtree(kept, ignore_errors=True)
                kept.parent.mkdir(exist_ok=True)
                out.rename(kept)
                walls[name].append(seconds)
                print(f"run {i + 1} {name}: {seconds:.1f} s", flush=True)
        mean = {name: sum(w) / len(w) for name, w in walls.items()}
        for name, w in walls.items():
            print(f"{name}: {', '.join(f'{s:.1f}' for s in w)} s (mean {mean[name]:.1f} s)")
        print(f"ratio: {mean['this checkout'] / mean[args.base]:.3f}")
        diff = differing(Path(tmp) / "kept" / "base", Path(tmp) / "kept" / "this")
        print("same outputs: yes" if not diff else f"same outputs: no ({', '.join(diff)})")


if __name__ == "__main__":
    main()
