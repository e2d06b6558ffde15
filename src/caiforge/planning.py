"""`caiforge plan`: what the next `dvc repro` will ask the engines, counted from the row caches, no model loaded.

How it counts. Every stage the next repro runs (those `dvc status` reports, and everything downstream of them) that
sends engine requests (a stage with a row cache) is started in *plan mode*: the environment variable `CAIFORGE_PLAN`
names a JSON context file. In plan mode:

- the engines load the tokenizer only and compute every request's row-cache key with the real engines' own code
  (`caiforge.engines.plan` overrides only the forward passes), so a key here is the key the build will use;
- the cache (`PlanCache`) is read-only: hits are answered from it, misses get a placeholder answer, and nothing is
  written to disk;
- the stage stops at `end_of_requests()`, before it loads anything else or writes an output, and leaves its counts
  in the report file.

What the counts mean, per stage:

- `cached`: requests the cache answers (exact);
- `send`: requests the cache lacks whose key is fully known now (exact);
- `depends`: requests built on something the build has yet to produce: an answer generated earlier in the same run
  (a revision builds on a new critique) or weights a stage upstream retrains. They are counted as sent, an upper
  bound: a new answer that happens to equal an old one is a cache hit, and a stage that branches on what an answer
  says (a collapsed revision is not built upon) may ask fewer.

Both backends are planned. For a stage on `openai` servers the plan asks the servers which model they serve (part
of every key) and sends nothing else.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from caiforge.config import StageError
from caiforge.planmode import ENV, Counts
from caiforge.preflight import CHECK_STAGE

# ---------------------------------------------------------------------------------------------------------------
# The command: which stages the next repro runs, and each request stage's counts


@dataclass
class StagePlan:
    stage: str
    why: str
    counts: Counts | None = None
    """None: the stage sends no engine requests (or could not be planned: see `note`)."""
    note: str = ""


@dataclass
class _Stage:
    name: str
    deps: list[str]
    outs: list[str]
    row_cache: bool = False
    upstream: list[str] = field(default_factory=list)


def _paths(entries: Sequence[Any]) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else str(e) for e in entries or ()]


_VARIABLE = re.compile(r"\$\{([^}]+)\}")


def _interpolate(path: str, params: dict[str, Any]) -> str:
    """`path` with each `${a.b}` replaced by params.yaml's value at a.b, as DVC's templating resolves it."""

    def value(match: re.Match[str]) -> str:
        node: Any = params
        for key in match.group(1).strip().split("."):
            if not isinstance(node, dict) or key not in node:
                raise StageError(f"dvc.yaml: ${{{match.group(1)}}} names no value in params.yaml")
            node = node[key]
        return str(node)

    return _VARIABLE.sub(value, path)


def read_stages(root: Path) -> list[_Stage]:
    """dvc.yaml's stages in file order (which is the pipeline's order), with deps and outs (`${...}` resolved from
    params.yaml, as DVC resolves them)."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))
    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")) or {}
    stages = []
    for name, body in spec["stages"].items():
        outs = [_interpolate(o, params) for o in _paths(body.get("outs", ())) + _paths(body.get("metrics", ()))]
        deps = [_interpolate(d, params) for d in _paths(body.get("deps", ()))]
        stages.append(_Stage(name, deps, outs, any(o.endswith("/rowcache") for o in outs)))
    return stages


def _under(path: str, out: str) -> bool:
    return path == out or path.startswith(out.rstrip("/") + "/")


def changed_stages(root: Path) -> dict[str, str]:
    """{stage: what changed} as `dvc status` reports it."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise StageError(f"dvc status failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
    status = json.loads(proc.stdout or "{}")
    return {name.split(":")[-1]: _describe(changes) for name, changes in status.items()}


def _describe(changes: list[Any]) -> str:
    """`dvc status` entries in one line: `changed deps: constitutions/default.yaml (comparison)`."""
    parts = []
    for change in changes:
        if isinstance(change, str):
            parts.append(change)
            continue
        for kind, paths in change.items():
            items = []
            for path, what in paths.items() if isinstance(paths, dict) else []:
                items.append(f"{path} ({', '.join(what)})" if isinstance(what, dict) else path)
            parts.append(f"{kind}: {', '.join(items)}" if items else kind)
    return "; ".join(parts)


def plan(root: Path, only: Sequence[str] = ()) -> list[StagePlan]:
    """What the next `dvc repro` runs, stage by stage, and the engine requests of each stage that sends any."""
    import tempfile

    stages = read_stages(root)
    changed = changed_stages(root)
    rerun: dict[str, _Stage] = {}
    why: dict[str, str] = {}
    for st in stages:
        # The check stage's output changes only with the stage list: it orders the build, never reruns a stage.
        feeding = [u for u in rerun.values() if u.name != CHECK_STAGE]
        ups = [u.name for u in feeding if any(_under(d, o) for d in st.deps for o in u.outs)]
        if st.name in changed or ups:
            rerun[st.name] = st
            after = f"after {', '.join(ups)} (unless their outputs come out unchanged)"
            why[st.name] = changed.get(st.name) or after
    pending = [o for st in rerun.values() for o in st.outs]
    result = []
    with tempfile.TemporaryDirectory(prefix="caiforge-plan-") as tmp:
        for st in rerun.values():
            entry = StagePlan(st.name, why[st.name])
            result.append(entry)
            if st.name == CHECK_STAGE:
                entry.note = "checks every stage's config first; reruns nothing by itself"
                continue
            if not st.row_cache:
                entry.note = "no row-cached engine requests"
                continue
            if only and st.name not in only:
                entry.note = "not planned (not asked for)"
                continue
            report = Path(tmp) / f"{st.name}.json"
            ctx = Path(tmp) / f"{st.name}.ctx.json"
            ctx.write_text(json.dumps({"report": str(report), "pending": pending}), encoding="utf-8")
            proc = subprocess.run(
                [sys.executable, f"stages/{st.name}.py"],
                cwd=root,
                env={**os.environ, ENV: str(ctx)},
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode == 0 and report.is_file():
                entry.counts = Counts(**json.loads(report.read_text(encoding="utf-8")))
            else:
                lines = proc.stderr.strip().splitlines()
                entry.note = "could not be planned: " + (lines[-1] if lines else f"exit code {proc.returncode}")
    return result


def table(plans: Sequence[StagePlan]) -> str:
    """The plan as a fixed-width table for a terminal."""
    if not plans:
        return "Nothing to run: dvc status reports every stage up to date."
    head = f"{'stage':<16} {'cached':>8} {'send':>8} {'depends':>8}  why"
    lines = [head]
    for p in plans:
        if p.counts is None:
            lines.append(f"{p.stage:<16} {'-':>8} {'-':>8} {'-':>8}  {p.why}; {p.note}")
        else:
            c = p.counts
            lines.append(f"{p.stage:<16} {c.cached:>8} {c.send:>8} {c.depends:>8}  {p.why}")
    lines.append(
        "cached: answered by the row cache; send: requests the engines will run (exact); depends: requests built "
        "on answers or weights this build has yet to produce (an upper bound)."
    )
    return "\n".join(lines)
