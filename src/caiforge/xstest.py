"""XSTest (Röttger et al., NAACL 2024; CC-BY-4.0): safe prompts that look unsafe, and unsafe contrast prompts.

`evaluate` asks every model these and reports its refusal rate on each part: on the safe part that is the model's
over-refusal, on the unsafe part how often it refuses what it should refuse. The file ships under
data/seed/xstest/ (with its licence and attribution) and no stage trains or curates on it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import polars as pl

from caiforge import formats, schemas

COLUMNS = ("id", "prompt", "type", "label")
"""The columns of xstest_prompts.csv caiforge reads (the file also has `focus` and `note`)."""
PARTS = {"safe": "xstest_safe", "unsafe": "xstest_unsafe"}
"""XSTest's `label` -> the prompt kind its rows get in evaluate's samples."""


def read(path: str | Path) -> pl.DataFrame:
    """xstest_prompts.csv as prompt rows (schemas.PROMPTS): id `xstest-<id>`, kind `xstest_safe` / `xstest_unsafe`,
    category the XSTest type (e.g. `homonyms`, `contrast_homonyms`), source `xstest`, split `eval`. A missing file,
    a missing column, an unknown label or a duplicate id is a ValueError naming the file (and the row)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: evaluate.xstest: file not found (XSTest's xstest_prompts.csv)")
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (XSTest has {', '.join(COLUMNS)}, ...)")
        rows, seen = [], set()
        for line, row in enumerate(reader, start=2):
            label, text = (row["label"] or "").strip(), (row["prompt"] or "").strip()
            if label not in PARTS:
                raise ValueError(f"{path}: line {line}: label {label!r} is neither 'safe' nor 'unsafe'")
            if not text:
                raise ValueError(f"{path}: line {line}: empty prompt")
            pid = f"xstest-{row['id'].strip()}"
            if pid in seen:
                raise ValueError(f"{path}: line {line}: id {row['id']!r} appears twice")
            seen.add(pid)
            rows.append(
                {"id": pid, "text": text, "kind": PARTS[label], "category": row["type"].strip(), "source": "xstest"}
            )
    return (
        pl.DataFrame(rows, schema={c: pl.String for c in ("id", "text", "kind", "category", "source")})
        .with_columns(split=pl.lit("eval"))
        .select([c for c, _ in schemas.PROMPTS.columns])
    )


def pick(prompts: pl.DataFrame, per_part: int | None, seed: int) -> pl.DataFrame:
    """`per_part` prompts of each part (all when None), ranked by a seeded hash of their id, so a larger
    `per_part` only adds prompts (the same rule as the eval prompts)."""
    parts = []
    for kind in PARTS.values():
        rows = prompts.filter(pl.col("kind") == kind)
        rank = pl.Series([formats.stable_fraction(i, f"{seed}/xstest-pick") for i in rows["id"]], dtype=pl.Float64)
        ranked = rows.with_columns(rank=rank).sort("rank", "id")
        parts.append((ranked if per_part is None else ranked.head(per_part)).drop("rank").sort("id"))
    return pl.concat(parts)
