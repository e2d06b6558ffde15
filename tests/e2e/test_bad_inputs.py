"""Bad input, for every user-facing file and param: the stage exits non-zero, its message names the file and the
field (or line), and nothing under data/ changes (no half-written output, no stray temporaries).

Each case edits a copy of a built smoke project, then runs the stage script the way `dvc repro` does.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from tests.e2e import pipeline

Edit = Callable[[Path], None]


def write(rel: str, data: bytes | str) -> Edit:
    def edit(repo: Path) -> None:
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            path.unlink()
        path.write_bytes(data if isinstance(data, bytes) else data.encode())

    return edit


def replace(rel: str, old: str, new: str) -> Edit:
    def edit(repo: Path) -> None:
        path = repo / rel
        text = path.read_text(encoding="utf-8")
        assert old in text, f"{rel}: {old!r} not found"
        path.unlink()  # DVC may have linked it from its cache: never write through a link
        path.write_text(text.replace(old, new, 1), encoding="utf-8")

    return edit


def drop_column(rel: str, column: str) -> Edit:
    def edit(repo: Path) -> None:
        path = repo / rel
        table = pl.read_parquet(path).drop(column)
        path.unlink()
        table.write_parquet(path)

    return edit


NOT_UTF8 = b'{"text": "fine"}\n{"text": "caf\xe9 au lait"}\n'

# (case id, stage, command-line overrides, edit, what the message must name)
CASES: list[tuple[str, str, list[str], Edit | None, list[str]]] = [
    ("param-zero-cap", "critique_revise", ["critique_revise.max_prompts=0"], None,
     ["params.yaml", "max_prompts"]),
    ("param-unknown-key", "label", [], replace("params.yaml", "  samples_per_prompt:", "  samples_per_promt: 2\n"
     "  samples_per_prompt:"), ["params.yaml", "label.samples_per_promt", "unknown key"]),
    ("param-asymmetric-cot-band", "label", ["label.cot_band=[0.3,0.6]"], None, ["params.yaml", "cot_band"]),
    ("param-wrong-type", "sft", ["sft.epochs=many"], None, ["sft.epochs"]),
    ("constitution-missing-field", "critique_revise", [], replace("constitutions/default.yaml", "    critique: ",
     "    critque: "), ["constitutions/default.yaml", "critique"]),
    ("constitution-not-utf8", "label", [], write("constitutions/default.yaml", b"comparison:\n  - id: caf\xe9\n"),
     ["constitutions/default.yaml", "line 2", "UTF-8"]),
    ("prompt-source-not-utf8", "curate", [], write("data/seed/helpful_prompts.jsonl", NOT_UTF8),
     ["data/seed/helpful_prompts.jsonl", "line 2", "UTF-8"]),
    ("prompt-source-unreadable-csv", "curate",
     ["curate.sources=[{type: file, name: x, path: data/seed/bad.csv, kind: helpful, text_field: text}]"],
     write("data/seed/bad.csv", b'text\n"unclosed\n'), ["data/seed/bad.csv"]),
    ("prompts-wrong-schema", "critique_revise", [], drop_column("data/curate/prompts.parquet", "kind"),
     ["data/curate/prompts.parquet", "kind"]),
    ("human-labels-not-utf8", "label", [], write("data/seed/human_labels.jsonl", NOT_UTF8),
     ["data/seed/human_labels.jsonl", "line 2"]),
    ("human-labels-missing-field", "label", [],
     write("data/seed/human_labels.jsonl", '{"prompt_id": "x", "chosen": "a"}\n'),
     ["data/seed/human_labels.jsonl", "rejected"]),
    ("known-answers-not-utf8", "evaluate", [], write("data/seed/label_quality.jsonl", NOT_UTF8),
     ["data/seed/label_quality.jsonl", "line 2"]),
    ("model-link-outside", "label", [], write("data/models/feedback/link.json", '{"same_as": "../../../etc"}'),
     ["data/models/feedback/link.json", "same_as"]),
    ("model-source-unknown", "models", ["models.roles.policy.source=nowhere:thing"], None,
     ["models.roles.policy.source"]),
]  # fmt: skip


def snapshot(repo: Path) -> dict[str, bytes]:
    """Every file under data/ (seeds included): what a failed stage must leave exactly as it was."""
    return {p.relative_to(repo).as_posix(): p.read_bytes() for p in sorted((repo / "data").rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("stage", "overrides", "edit", "names"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_cleanly_naming_file_and_field(repo, stage, overrides, edit, names):
    if edit:
        edit(repo)
    before = snapshot(repo)
    proc = subprocess.run(
        [sys.executable, f"stages/{stage}.py", *overrides],
        cwd=repo,
        env=pipeline.env(repo),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    message = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    assert message.startswith(f"{stage}: error: "), f"not a clean one-line error:\n{proc.stderr[-3000:]}"
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    assert snapshot(repo) == before, "a failed stage changed data/"


def test_an_ad_hoc_run_leaves_the_dvc_outputs_alone(repo):
    """`python stages/curate.py key=value` outside DVC writes to outputs/curate/, so data/ stays as dvc.lock says."""
    before = snapshot(repo)
    proc = subprocess.run(
        [sys.executable, "stages/curate.py", "curate.eval_fraction=0.3"],
        cwd=repo,
        env=pipeline.env(repo),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "writes to outputs/curate/, not to the DVC output data/curate/" in proc.stderr
    assert (repo / "outputs" / "curate" / "prompts.parquet").is_file()
    assert snapshot(repo) == before
    assert "up to date" in pipeline.dvc(repo, "status").stdout
