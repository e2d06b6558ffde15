"""Helpers for end-to-end runs: a throwaway git + DVC copy of the project on the smoke profile.

Shared by tests/e2e and bench/: nothing here is pytest-specific.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import networkx as nx
import yaml

ROOT = Path(__file__).resolve().parents[2]
RAN = re.compile(r"Running stage '([^']+)'")


def env(repo: Path | None = None) -> dict[str, str]:
    """The current interpreter's environment first on PATH, so stage commands (`python ...`) use it.

    With `repo`, its own `src/` comes first on PYTHONPATH: stages then import the copy's `caiforge` (the code DVC
    fingerprints there), not the project checkout the virtual environment's editable install points at.
    """
    out = dict(os.environ)
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    if repo is not None and (repo / "src" / "caiforge").is_dir():
        out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo / "src"), out.get("PYTHONPATH")]))
    out.setdefault("GIT_AUTHOR_NAME", "caiforge-test")
    out.setdefault("GIT_AUTHOR_EMAIL", "test@caiforge.invalid")
    out.setdefault("GIT_COMMITTER_NAME", "caiforge-test")
    out.setdefault("GIT_COMMITTER_EMAIL", "test@caiforge.invalid")
    return out


def sh(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), cwd=cwd, env=env(cwd), capture_output=True, text=True, timeout=1800)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh(cwd, sys.executable, "-m", "dvc", *args, check=check)


def make_repo(dest: Path, profile: str = "smoke") -> Path:
    """Copy the committed and untracked-not-ignored project files to `dest`, compose `profile`, git commit."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for rel in files:
        if rel.startswith("data/") and not rel.startswith("data/seed/") and not rel.endswith(".gitignore"):
            continue  # outputs of a build in the checkout: the copy builds from nothing
        if rel == "dvc.lock":
            continue
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    sh(dest, "git", "init", "-q")
    sh(dest, sys.executable, "-m", "caiforge.cli", "params", f"profile={profile}")
    commit(dest, "init")
    return dest


def commit(repo: Path, message: str) -> None:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "--allow-empty", "-m", message)


def repro(repo: Path, *args: str) -> list[str]:
    """Run `dvc repro` and return the stages DVC actually ran, in order."""
    return RAN.findall(dvc(repo, "repro", *args).stdout)


def stages(repo: Path) -> list[str]:
    return list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])


def descendants(repo: Path, stage: str) -> set[str]:
    """Stages downstream of `stage` in the pipeline DAG (by data dependencies)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        graph = r.index.graph
        node = next(n for n in graph if getattr(n, "name", None) == stage)
        # DVC's graph points from a stage to the stages it depends on.
        return {n.name for n in nx.ancestors(graph, node) if hasattr(n, "name")}


def data_digests(repo: Path) -> dict[str, str]:
    """sha256 of every file under data/ except seeds, metrics, dvclive logs (which hold timings) and row caches
    (which keep entries of earlier builds by design)."""
    import hashlib

    out = {}
    for path in sorted((repo / "data").rglob("*")):
        rel = path.relative_to(repo).as_posix()
        if not path.is_file() or rel.startswith("data/seed/") or path.name in ("metrics.json", ".gitignore"):
            continue
        if "/dvclive/" in rel or "/rowcache/" in rel:
            continue
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _edit_field(repo: Path, after: str, field: str, new_text: str) -> None:
    """Replace the text of the first `field` after the line `after` in constitutions/default.yaml (a text edit)."""
    path = repo / "constitutions" / "default.yaml"
    text = path.read_text(encoding="utf-8")
    at = text.index(f" {field}: ", text.index(after)) + len(f" {field}: ")
    end = text.index("\n", at)
    path.write_text(text[:at] + yaml.safe_dump(new_text, width=10_000).strip().removesuffix("\n...") + text[end:])


def edit_principle(repo: Path, principle_id: str, field: str, new_text: str) -> None:
    """Replace the text of `field` of the principle `principle_id`."""
    _edit_field(repo, f"- id: {principle_id}\n", field, new_text)


def edit_first(repo: Path, section: str, field: str, new_text: str) -> None:
    """Replace the text of `field` of the first entry of `section`."""
    _edit_field(repo, f"\n{section}:\n", field, new_text)
