"""Human verdicts on AI-labelled pairs (HRLAIF): the file `label` reads, and the one safe way to write it.

The file is JSON lines (`.jsonl`), CSV (`.csv`) or Parquet (`.parquet`), one verdict per row, with text fields:

- `prompt_id`, `chosen`, `rejected`: the pair, by its exact response texts (as in `review_queue.parquet`);
- `verdict` (optional): `prefer` (the default: `chosen` is better), `tie` or `skip`. A tie or a skip records that a
  person looked, and is no preference: `label` keeps the AI's label for that pair.

Other fields are kept and ignored by `label`; `caiforge review` adds `pair_id`, `reviewer`, `time`, `left` (which of
the row's two texts was shown on the left) and `ai_p_chosen` (the AI's probability, when the verdict was given, that
this row's `chosen` is the better answer). A pair has at most one verdict.

`record` is the writer: under an exclusive lock on the file's directory it rereads the file, replaces the pair's
verdict or appends one, and renames a complete, fsynced copy over it, so two tabs or two reviewers on one machine
never lose each other's verdicts and a crash leaves the old file or the new one, never a torn line. Lines it does not
touch are kept byte for byte.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from caiforge import io, labeling

FIELDS = ("prompt_id", "chosen", "rejected")
VERDICTS = ("prefer", "tie", "skip")


class HumanLabelsError(ValueError):
    """The human-labels file is malformed; the message names the file, the line (or row) and the field."""


@dataclass(frozen=True)
class Verdict:
    """One person's verdict on one pair."""

    prompt_id: str
    chosen: str
    rejected: str
    verdict: str = "prefer"
    """`prefer` (`chosen` is better), `tie` or `skip` (no preference: the AI label stays)."""
    row: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The whole row as written, extras included (who, when, the order shown)."""

    @property
    def key(self) -> tuple[str, frozenset[str]]:
        return labeling.pair_key(self.prompt_id, self.chosen, self.rejected)

    @property
    def is_preference(self) -> bool:
        return self.verdict == "prefer"


def _verdict(row: Mapping[str, Any], where: str) -> Verdict:
    """Check one row (`where` names it: "path: line 3") and return its verdict."""
    for name in FIELDS:
        if name not in row or row[name] is None:
            raise HumanLabelsError(f"{where}: missing field {name!r} (required: {', '.join(FIELDS)})")
        if not isinstance(row[name], str):
            raise HumanLabelsError(f"{where}: field {name!r} must be text, got {type(row[name]).__name__}")
        if not row[name].strip():
            raise HumanLabelsError(f"{where}: field {name!r} must be a non-empty string")
    if row["chosen"] == row["rejected"]:
        raise HumanLabelsError(f"{where}: fields 'chosen' and 'rejected' are the same text")
    verdict = row.get("verdict") or "prefer"
    if verdict not in VERDICTS:
        raise HumanLabelsError(f"{where}: field 'verdict' must be one of {', '.join(VERDICTS)}, got {verdict!r}")
    return Verdict(row["prompt_id"], row["chosen"], row["rejected"], verdict, dict(row))


def _rows(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """("path: line N" or "path: row N", row) for every verdict row of a labels file in any supported format."""
    if path.suffix == ".jsonl":
        for number, _, row in io.jsonl_objects(path, HumanLabelsError):
            yield f"{path}: line {number}", row
        return
    try:
        df = pl.read_csv(path, infer_schema=False) if path.suffix == ".csv" else pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
        raise HumanLabelsError(f"{path}: cannot read: {exc}") from None
    for name in FIELDS:
        if name in df.columns and df.schema[name] not in (pl.String, pl.Null):
            raise HumanLabelsError(f"{path}: field {name!r} must be text, got {df.schema[name]}")
    for number, row in enumerate(df.iter_rows(named=True), start=1):
        yield f"{path}: row {number}", row


def read(path: str | os.PathLike[str]) -> dict[tuple[str, frozenset[str]], Verdict]:
    """Every verdict in the file, by `labeling.pair_key`; a pair given two different verdicts is an error.

    An empty file (the shipped default) has none. Errors name the file, the line (JSONL) or row, and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: human labels file does not exist (label.human_labels)")
    if path.suffix not in (".jsonl", ".csv", ".parquet"):
        raise HumanLabelsError(f"{path}: unsupported human labels format {path.suffix!r} (use .jsonl, .csv, .parquet)")
    if path.suffix == ".csv" and not io.read_utf8(path).strip():
        return {}
    out: dict[tuple[str, frozenset[str]], Verdict] = {}
    for where, row in _rows(path):
        verdict = _verdict(row, where)
        if out.setdefault(verdict.key, verdict) != verdict:
            raise HumanLabelsError(
                f"{where}: field 'chosen': prompt_id {verdict.prompt_id!r} has this pair labelled both ways (a pair "
                "takes one verdict)"
            )
    return out


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive flock on `directory` (where the labels file and its temporary copies live)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def record(path: str | os.PathLike[str], row: Mapping[str, Any]) -> Verdict:
    """Save one verdict durably: replace the pair's earlier verdict, or append. `row` holds at least `FIELDS` and
    may hold `verdict` and any JSON-serializable extras. Returns the verdict as `label` will read it.

    A malformed file (any line) is a HumanLabelsError naming the line, and the file is left untouched."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise HumanLabelsError(f"{path}: caiforge review writes JSON lines; label.human_labels must end in .jsonl")
    where = f"{path}: new verdict"
    verdict = _verdict(row, where)
    line = json.dumps(dict(row), ensure_ascii=False, sort_keys=True) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent):
        kept, replaced = [], False
        if path.exists():
            read(path)  # the whole file must be valid before it is rewritten
            for number, raw, old in io.jsonl_objects(path, HumanLabelsError):
                if _verdict(old, f"{path}: line {number}").key != verdict.key:
                    kept.append(raw if raw.endswith("\n") else raw + "\n")
                elif not replaced:
                    kept.append(line)
                    replaced = True
        if not replaced:
            kept.append(line)
        with io.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(kept))
            f.flush()
            os.fsync(f.fileno())
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return verdict
