"""Benchmark and check: the whole chain on managed llama.cpp servers (`-S serving=llama_cpp`) against in-process.

In throwaway copies of the project on one profile (default `cpu_demo`), one after the other in the same run:

- inprocess: `dvc repro` of the whole chain, every engine role in-process (transformers);
- managed:   the same chain with every generation and scoring role on `llama-server` replicas that the stages
             start and stop themselves (rlaif's sampling stays in-process);

each with its wall time, the seconds of every stage, and the peak memory of the whole process tree (dvc, the
stages, their servers), sampled every 0.2 s. Then, on the managed copy, what a user would check next:

- what each stage served: every engine role's backend, servers, dialect and identity, from the stages' metrics;
- edit: one comparison principle edited, `dvc repro` again: label's and evaluate's row-cache counts, and per model
  of evaluate whether its weights changed (dvc.lock) beside the answers it sent and took from the cache;
- again: a second `dvc repro` runs nothing;
- left: llama-server processes still running afterwards (must be none).

Last, `managed: <managed wall> / <in-process wall> = <ratio>` and both headlines.

    uv run python bench/managed.py [--profile cpu_demo]

Needs `llama-server` (`.ci/build-llama-server`, `$CAIFORGE_LLAMA_SERVER` or on PATH) and llama.cpp's converter
(found as `caiforge.engines.conversion` says). About 30 minutes on 2 cores for cpu_demo.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import polars as pl
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.incremental import PRINCIPLE, repro, show  # noqa: E402
from tests.e2e import pipeline  # noqa: E402

SERVED = ("critique_revise", "label", "distill", "evaluate")
"""Stages whose engine roles `serving=llama_cpp` moves onto servers."""


class PeakMemory:
    """The largest summed RSS of this process's descendants, sampled every `every` seconds while in use."""

    def __init__(self, every: float = 0.2) -> None:
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for child in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += child.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(self.every)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def build(repo: Path, name: str) -> float:
    with PeakMemory() as memory:
        seconds, ran = repro(repo)
    show(name, seconds, ran, f"  peak memory {memory.peak / 2**30:.2f} GiB")
    return seconds


def engine_roles(metrics: object, path: str = "") -> dict[str, dict]:
    """Every engine stats block in a stage's metrics (a dict with a `backend`), by where it sits."""
    found: dict[str, dict] = {}
    if isinstance(metrics, dict):
        if "backend" in metrics:
            return {path or "engine": metrics}
        for key, value in metrics.items():
            found |= engine_roles(value, f"{path}.{key}" if path else key)
    return found


def served(repo: Path) -> None:
    for stage in SERVED:
        metrics = json.loads((repo / "data" / stage / "metrics.json").read_text())
        for where, stats in engine_roles(metrics).items():
            print(
                f"served:      {stage}.{where}: {stats['backend']}, servers={stats.get('servers', '-')}, "
                f"dialects={stats.get('dialects', '-')}, rows sent={stats.get('rows')}, "
                f"cached={stats.get('cache_hits')}, model={str(stats.get('model', '-'))[:60]}"
            )


def model_digests(repo: Path) -> dict[str, str]:
    """Each stage output's md5 in dvc.lock (a directory's md5 changes with any file in it)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs", [])}


EVALUATED = {"base": None, "sft": "data/sft/model", "rl": "data/rlaif/model", "student": "data/distill/model"}
"""evaluate's models and the output that holds each one's weights (base: the models stage, never retrained)."""


def edit(repo: Path) -> None:
    """One comparison-principle edit, rebuilt: label's and evaluate's rows sent, per evaluated model."""
    asked = pl.read_parquet(repo / "data" / "label" / "comparisons.parquet")["principle_id"].mode().sort()[0]
    before = model_digests(repo)
    pipeline.edit_principle(repo, asked, "text", PRINCIPLE)
    seconds, ran = repro(repo)
    show("edit", seconds, ran)
    after = model_digests(repo)
    for stage in ("label", "evaluate"):
        cache = json.loads((repo / "data" / stage / "metrics.json").read_text())["row_cache"]
        print(f"edit:        {stage} row cache: {cache['misses']} sent, {cache['hits']} cached")
    answers = json.loads((repo / "data" / "evaluate" / "metrics.json").read_text())["answers"]
    for model, out in EVALUATED.items():
        changed = out is not None and before.get(out) != after.get(out)
        stats = answers[model]
        print(
            f"edit:        evaluate {model}: weights {'changed' if changed else 'unchanged'}, answers sent "
            f"{stats['rows']}, cached {stats['cache_hits']}"
        )


def left_servers() -> list[str]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "llama-server" in (proc.info["name"] or "") or "llama-server" in cmdline.split(" ")[0]:
            found.append(f"{proc.pid} {cmdline[:120]}")
    return found


def headline(repo: Path) -> str:
    return (repo / "data" / "evaluate" / "headline.json").read_text().strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu_demo", help="the profile both builds compose (default: cpu_demo)")
    profile = parser.parse_args().profile
    with tempfile.TemporaryDirectory(prefix="caiforge-bench-") as tmp:
        work = Path(tmp)
        local = pipeline.make_repo(work / "inprocess", profile)
        inprocess = build(local, "inprocess")
        local_headline = headline(local)
        subprocess.run(["rm", "-rf", str(local)], check=True)  # a copy of every model: keep the disk small

        repo = pipeline.make_repo(work / "managed", profile)
        pipeline.sh(repo, sys.executable, "-m", "caiforge.cli", "params", f"profile={profile}", "serving=llama_cpp")
        pipeline.commit(repo, "serving=llama_cpp")
        managed = build(repo, "managed")
        served(repo)
        managed_headline = headline(repo)
        pipeline.commit(repo, "build")
        edit(repo)
        again = pipeline.repro(repo)
        print(f"again:       ran {', '.join(again) or 'nothing'}")
        left = left_servers()
        print(f"left:        {len(left)} llama-server processes" + "".join(f"\n  {p}" for p in left))
    print(f"profile: {profile}")
    print(f"headline inprocess: {local_headline}")
    print(f"headline managed:   {managed_headline}")
    print(f"managed: {managed:.1f} s / {inprocess:.1f} s = {managed / inprocess:.2f}")


if __name__ == "__main__":
    main()
