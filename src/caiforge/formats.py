"""Polars tables <-> the `datasets` formats TRL trainers take, and stable hash-based row selection."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import polars as pl


def to_dataset(df: pl.DataFrame, columns: Sequence[str]) -> Any:
    """A `datasets.Dataset` with `columns` of `df` (chat columns stay lists of {role, content} dicts)."""
    from datasets import Dataset

    return Dataset.from_list(df.select(columns).to_dicts())


def stable_fraction(key: str, salt: str) -> float:
    """A number in [0, 1) fixed by `key` and `salt` alone (so adding rows never moves other rows)."""
    digest = hashlib.sha256(f"{salt}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def stable_mask(ids: Iterable[str], fraction: float, salt: str = "heldout") -> pl.Series:
    """True for about `fraction` of `ids`, chosen by hash: stable under adding or removing other ids."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    return pl.Series([stable_fraction(i, salt) < fraction for i in ids], dtype=pl.Boolean)
