"""Benchmark: what DVC and the row cache save. On the smoke profile, in throwaway copies of the project:

- full:        `dvc repro` of the whole chain from nothing;
- rebuild:     `dvc repro` after editing one comparison principle (the one label asked most), with the row
               caches deleted first (stage level: label and everything after it recompute every row);
- row_rebuild: the same edit with the row caches in place (label re-asks only the questions under that principle);
- pull:        a teammate's fresh clone doing `dvc repro --pull` from a local remote (nothing recomputes);
- resume:      `critique_revise` killed (SIGKILL) half-way through its requests (once half of them are in its row
               cache's journal), then finished by a rerun, over its uninterrupted time (runs of the stage script
               itself, from an empty row cache, sized so that its requests, not its start-up, dominate). Also
               printed: how long the uninterrupted run took after it had kept as many requests as the killed one,
               so what the rerun adds on top of the work that was left (start-up, replaying the journal) shows
               apart from how the work happens to be spread over the requests (later rounds read longer prompts).

Prints each wall time with the seconds of every stage that ran (from one "Running stage" line of dvc's to the next,
so DVC's own bookkeeping counts to the stage before it), then `retrained:` -- the seconds the row rebuild spent in
the training stages (pm, rlaif, distill) over full: the labels changed, so those models are new and no row cache can
hold their work; `row_rebuild` cannot go below that share. After full and row_rebuild, `cost:` gives what an AI label
cost as `evaluate` reports it: to make (`seconds_per_ai_label`, the row cache's labels priced as paid) and in that
build (`build_seconds_per_ai_label`). Last, `ratios: rebuild=.. pull=.. row_rebuild=..
resume=..` (each over full, resume over the uninterrupted stage).

`--profile` picks the scale (default `smoke`, minutes on 2 cores). On `smoke` every stage's start-up (about 8 to 12 s:
interpreter, torch, DVC's bookkeeping) outweighs its work, so `rebuild` and `row_rebuild` both measure how many stages
rerun more than how many rows. `--profile cpu_demo` (the embedded SmolLM2, about an hour, 20 GB of disk) is where rows
cost what they cost in real use; there the resume run is the profile's own critique_revise.

    uv run python bench/incremental.py [--profile cpu_demo]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e import pipeline  # noqa: E402

PRINCIPLE = "Which response is kinder and less likely to cause harm?"
# The resume run: enough rows that the stage's own work, not its start-up, dominates.
RESUME_ARGS = [
    "critique_revise.max_prompts=null",
    "critique_revise.rounds=4",
    "critique_revise.generation.max_new_tokens=96",
    "critique_revise.generation.batch_size=4",
]


TRAINING = ("sft", "pm", "rlaif", "distill")


def repro(repo: Path, *args: str) -> tuple[float, dict[str, float]]:
    """Wall seconds of `dvc repro` and the seconds of each stage it ran, in order."""
    cmd = [sys.executable, "-m", "dvc", "repro", *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=repo, env=pipeline.env(repo), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    ran: dict[str, float] = {}
    tail: list[str] = []
    current, since = None, t0
    for line in proc.stdout:
        tail = [*tail[-40:], line]
        started = re.match(pipeline.RAN, line)
        if started:
            now = time.perf_counter()
            if current:
                ran[current] = now - since
            current, since = started.group(1), now
    if proc.wait() != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed in {repo}:\n{''.join(tail)}")
    end = time.perf_counter()
    if current:
        ran[current] = end - since
    return end - t0, ran


def show(name: str, seconds: float, ran: dict[str, float], note: str = "") -> None:
    stages = ", ".join(f"{stage} {s:.1f}" for stage, s in ran.items()) or "nothing"
    print(f"{name + ':':12} {seconds:7.1f} s  ran {stages}{note}", flush=True)


def drop_row_caches(repo: Path, stages: tuple[str, ...] = ("critique_revise", "label", "evaluate")) -> None:
    """Delete the row caches of `stages` (a deleted cache is a missing output: DVC reruns its stage)."""
    for stage in stages:
        shutil.rmtree(repo / "data" / stage / "rowcache", ignore_errors=True)


def journal_rows(repo: Path) -> int:
    """Requests critique_revise has finished so far: lines in its row cache's journals."""
    return sum(p.read_bytes().count(b"\n") for p in (repo / "data" / "critique_revise" / "rowcache").glob("journal-*"))


def stage(repo: Path, args: list[str], kill_at_rows: int | None = None) -> tuple[float, list[tuple[float, int]]]:
    """Seconds to run the critique_revise script (killed with SIGKILL once `kill_at_rows` requests are kept), and
    when each count of kept requests was first seen (polled every 50 ms)."""
    cmd = [sys.executable, "stages/critique_revise.py", *args]
    t0 = time.perf_counter()
    env = {**pipeline.env(repo), "DVC_STAGE": "critique_revise", "DVC_ROOT": str(repo)}  # as `dvc repro` runs it
    seen: list[tuple[float, int]] = []
    with tempfile.TemporaryFile() as err:  # not a pipe: the progress bars would fill it while this loop polls
        proc = subprocess.Popen(cmd, cwd=repo, env=env, start_new_session=True, stderr=err)
        while proc.poll() is None:
            rows = journal_rows(repo)
            if not seen or rows > seen[-1][1]:
                seen.append((time.perf_counter() - t0, rows))
            if kill_at_rows is not None and rows >= kill_at_rows:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait()
        if kill_at_rows is None and proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(err.read().decode()[-2000:])
    return time.perf_counter() - t0, seen


def resume(repo: Path, args: list[str]) -> tuple[float, float]:
    """critique_revise from an empty row cache, uninterrupted; then killed once half its requests are kept and
    finished by a rerun. Prints the three times and what the uninterrupted run still had to do after the point the
    kill left (the rerun's own work; the rest of its time is start-up and replaying the journal). Returns the
    uninterrupted and the finishing seconds."""
    drop_row_caches(repo, ("critique_revise",))
    whole, timeline = stage(repo, args)
    rows = json.loads((repo / "data" / "critique_revise" / "metrics.json").read_text())["generation"]["rows"]
    drop_row_caches(repo, ("critique_revise",))
    killed, _ = stage(repo, args, kill_at_rows=rows // 2)
    kept = journal_rows(repo)
    finish, _ = stage(repo, args)
    reached = next(t for t, n in timeline if n >= kept)  # when the uninterrupted run had kept as many
    print(
        f"stage:       {whole:7.1f} s uninterrupted ({rows} requests); killed after {killed:.1f} s with {kept} "
        f"kept, finished in {finish:.1f} s; the uninterrupted run kept {kept} at {reached:.1f} s and needed "
        f"{whole - reached:.1f} s more, so the rerun added {finish - (whole - reached):.1f} s (start-up, replay)"
    )
    return whole, finish


def show_cost(name: str, repo: Path) -> None:
    """What an AI label cost, as `evaluate` reports it: to make (cache hits priced as paid) and in this build."""
    cost = json.loads((repo / "data" / "evaluate" / "metrics.json").read_text())["cost"]
    print(
        f"cost:        {name}: {cost['ai_labels']} labels, seconds_per_ai_label={cost['seconds_per_ai_label']} "
        f"build_seconds_per_ai_label={cost['build_seconds_per_ai_label']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="smoke", help="the profile every build composes (default: smoke)")
    profile = parser.parse_args().profile
    resume_args = RESUME_ARGS if profile == "smoke" else []
    with tempfile.TemporaryDirectory(prefix="caiforge-bench-") as tmp:
        work = Path(tmp)
        repo = pipeline.make_repo(work / "repo", profile)
        full, ran = repro(repo)
        show("full", full, ran)
        show_cost("full", repo)
        pipeline.dvc(repo, "remote", "add", "-d", "team", str(work / "remote"))
        pipeline.commit(repo, "build")
        pipeline.dvc(repo, "push")
        # The comparison principle label asked most often: an edit that certainly changes some labels.
        asked = pl.read_parquet(repo / "data" / "label" / "comparisons.parquet")["principle_id"].mode().sort()[0]

        cold = work / "cold"
        shutil.copytree(repo, cold, symlinks=True)
        drop_row_caches(cold, ("label", "evaluate"))  # the stages the edit reruns anyway
        pipeline.edit_principle(cold, asked, "text", PRINCIPLE)
        rebuild, ran = repro(cold)
        show("rebuild", rebuild, ran, "  (row caches deleted)")
        shutil.rmtree(cold)  # a copy of every model: on cpu_demo the copies fill a small disk

        warm = work / "warm"
        shutil.copytree(repo, warm, symlinks=True)
        pipeline.edit_principle(warm, asked, "text", PRINCIPLE)
        row_rebuild, ran = repro(warm)
        show("row_rebuild", row_rebuild, ran, "  (row caches kept)")
        show_cost("row_rebuild", warm)
        retrained = sum(s for stage, s in ran.items() if stage in TRAINING)
        print(f"retrained:   {retrained:7.1f} s = {retrained / full:.3f} of full (new models: no cache holds them)")
        shutil.rmtree(warm)

        mate = work / "mate"
        pipeline.sh(work, "git", "clone", "-q", str(repo), str(mate))
        pull, ran = repro(mate, "--pull")
        show("pull", pull, ran)

        whole, finish = resume(repo, resume_args)
    print(f"profile: {profile}")
    print(
        f"ratios: rebuild={rebuild / full:.3f} pull={pull / full:.3f} row_rebuild={row_rebuild / full:.3f} "
        f"resume={finish / whole:.3f}"
    )


if __name__ == "__main__":
    main()
