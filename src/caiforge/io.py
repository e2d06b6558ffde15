"""Checked, atomic, deterministic writes.

Every artifact a stage writes goes through here: content lands in a temporary sibling path and is renamed into
place only when complete, so a failing stage never leaves a half-written file behind (DESIGN promise 5). Parquet
and JSON are written with fixed settings so that unchanged inputs give byte-identical files (promise 3).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from caiforge import distributed
from caiforge.schemas import Schema


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path` (file or directory); rename it onto `path` only on success.

    A file (or link) at `path` is replaced by one rename, so a reader sees the old file or the new one, never none."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    target = tmp / final.name
    try:
        yield target
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)  # a directory cannot be renamed over; a file or link is replaced in one step
        os.replace(target, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_main_process() -> bool:
    """Global rank 0 under `accelerate launch` / torchrun (and any plain process): the only process that writes
    outputs. Read from the launcher's environment, so it is known before any distributed state exists."""
    return distributed.rank() == 0


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_utf8(path: str | os.PathLike[str]) -> str:
    """A text file's contents; a file that is not UTF-8 is a ValueError naming the file, line and column."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ValueError(
            f"{path}, line {line}, column {column}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as "
            "UTF-8"
        ) from None


def jsonl_objects(
    path: str | os.PathLike[str], error: type[Exception] = ValueError
) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(line number, the line as written, its object) for each non-blank line of a JSON-lines file. A line that is
    not a JSON object, or a file that is not UTF-8, raises `error` naming the file and the line."""
    try:
        text = read_utf8(path)
    except ValueError as exc:
        raise error(str(exc)) from None
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{path}: line {number}: not a JSON object ({exc.msg})") from None
        if not isinstance(row, dict):
            raise error(f"{path}: line {number}: not a JSON object (found {type(row).__name__})")
        yield number, line, row


def remove_stale_temporaries(root: str | os.PathLike[str]) -> list[Path]:
    """Delete the `.<name>.*.tmp` files and directories a killed run left under `root`; returns what it removed.

    Stages call this at start (a run that completes leaves none: `atomic_path` renames or deletes its own).
    """
    found = sorted(p for p in Path(root).rglob(".*.tmp")) if Path(root).is_dir() else []
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


def write_parquet(df: pl.DataFrame, path: str | os.PathLike[str], schema: Schema) -> None:
    """Check `df` against `schema` and write it atomically with settings that make the bytes reproducible."""
    table = schema.check(df, where=str(path)).to_arrow()
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", compression_level=3, use_dictionary=True, write_statistics=True)


def read_parquet(path: str | os.PathLike[str], schema: Schema) -> pl.DataFrame:
    """Read a Parquet artifact and check it against `schema`; a missing file or wrong schema names the file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file (is the stage that writes it built? try `dvc repro`)")
    return schema.check(pl.read_parquet(path), where=str(path))


def to_json(obj: Any) -> str:
    """Deterministic JSON text: sorted keys, two-space indent, trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def write_json(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write `obj` as deterministic JSON, atomically."""
    text = to_json(obj)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_text(text: str, path: str | os.PathLike[str]) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
