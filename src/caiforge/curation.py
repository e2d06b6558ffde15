"""Pure curation steps for prompts: normalize, id, dedup, tag by constitution category, balance, split.

Everything here is deterministic: ids are content hashes, every greedy pass walks rows in id order, subsets are
chosen by hash rank, and the train/eval split depends on a prompt's own id only (adding prompts never moves an
existing prompt from one split to the other). Embeddings are passed in, so these functions never load a model.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

HELPFUL_CATEGORY = "helpfulness"
"""The category of every helpful prompt; red-team prompts get one of the configured categories."""

_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"[a-z0-9]+")
_SUFFIXES = ("ations", "ation", "ions", "ion", "ments", "ment", "ings", "ing", "ers", "er", "ed", "es", "s")
# Two-letter words never count (see `keywords`), so only longer filler words need listing.
_STOPWORDS = frozenset(
    "and the for with about into from other others someone something people their them your you how what".split()  # noqa: SIM905
)


def normalize(text: str) -> str:
    """Unicode NFKC, whitespace runs collapsed to one space, stripped."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def prompt_id(text: str) -> str:
    """Stable prompt id: the first 16 hex chars of sha256 of the normalized text."""
    return hashlib.sha256(normalize(text).encode("utf-8")).hexdigest()[:16]


def with_ids(df: pl.DataFrame) -> pl.DataFrame:
    """Normalize `text` and add `id` (content hash)."""
    texts = [normalize(t) for t in df["text"].to_list()]
    return df.with_columns(pl.Series("text", texts, pl.String()), pl.Series("id", [prompt_id(t) for t in texts]))


# ---------------------------------------------------------------------------------------------------------------
# Dedup


def exact_dedup(df: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """Keep one row per normalized, casefolded text: the lowest id, and among equal ids the earliest row
    (sources listed first win). Returns (kept rows sorted by id, number dropped)."""
    keyed = df.with_row_index("_row").with_columns(
        pl.Series("_key", [normalize(t).casefold() for t in df["text"].to_list()])
    )
    kept = keyed.sort("id", "_row").unique("_key", keep="first", maintain_order=True).drop("_key", "_row")
    return kept, df.height - kept.height


def near_dedup(ids: Sequence[str], vectors: np.ndarray, threshold: float, block: int = 512) -> list[int]:
    """Greedy near-duplicate removal in id order: a row is dropped when its cosine similarity to an already kept row
    is >= `threshold`. `vectors` are L2-normalized rows aligned with `ids`. Returns the kept row indices, in id order.

    Works in blocks so memory stays O(block x kept) however many prompts there are.
    """
    if len(ids) != len(vectors):
        raise ValueError(f"near_dedup: {len(ids)} ids but {len(vectors)} vectors")
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    kept: list[int] = []
    kept_vecs = np.zeros((0, vectors.shape[1] if vectors.ndim == 2 else 0), dtype=np.float32)
    for start in range(0, len(order), block):
        idx = order[start : start + block]
        cand = vectors[idx]
        blocked = (cand @ kept_vecs.T).max(axis=1) >= threshold if len(kept) else np.zeros(len(idx), dtype=bool)
        inner = cand @ cand.T
        taken: list[int] = []
        for j in range(len(idx)):
            if blocked[j] or any(inner[j, t] >= threshold for t in taken):
                continue
            taken.append(j)
        kept.extend(idx[j] for j in taken)
        kept_vecs = np.concatenate([kept_vecs, cand[taken]], axis=0)
    return kept


# ---------------------------------------------------------------------------------------------------------------
# Category tagging


def tag_by_embedding(prompts: np.ndarray, descriptions: Mapping[str, np.ndarray]) -> list[str]:
    """Each prompt's category: argmax over categories of the best cosine similarity to one of its descriptions.

    `prompts` are L2-normalized rows; `descriptions` maps category -> L2-normalized description rows, in priority
    order (a tie goes to the category listed first)."""
    names = list(descriptions)
    if not names:
        raise ValueError("no categories to tag with")
    scores = np.stack([(prompts @ descriptions[name].T).max(axis=1) for name in names], axis=1)
    return [names[i] for i in np.argmax(scores, axis=1)]  # argmax returns the first maximum: ties are deterministic


def _stem(word: str) -> str:
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            return word[: -len(suffix)]
    return word


def keywords(description: str) -> list[str]:
    """The stems of a description's content words (stop words and one- or two-letter fragments left out)."""
    return [_stem(w) for w in _WORD.findall(description.lower()) if len(w) > 2 and w not in _STOPWORDS]


def tag_by_keywords(texts: Sequence[str], descriptions: Mapping[str, Sequence[str]]) -> list[str]:
    """The embedder-free fallback: each text's category is the one whose description keywords it mentions most.

    A keyword stem matches a word that starts with it ("hack" matches "hacking"). Ties go to the category listed
    first, and a text that mentions no keyword gets the first category."""
    names = list(descriptions)
    if not names:
        raise ValueError("no categories to tag with")
    stems = {name: sorted({k for d in descriptions[name] for k in keywords(d)}) for name in names}
    out = []
    for text in texts:
        words = set(_WORD.findall(text.lower()))
        counts = [sum(any(w.startswith(s) for w in words) for s in stems[name]) for name in names]
        out.append(names[counts.index(max(counts))])
    return out


def with_categories(df: pl.DataFrame, red_team_tags: Sequence[str]) -> pl.DataFrame:
    """Add `category`: the given tags for red-team rows (in row order), `helpfulness` for helpful rows."""
    red = (df["kind"] == "red_team").to_list()
    if sum(red) != len(red_team_tags):
        raise ValueError(f"{sum(red)} red-team rows but {len(red_team_tags)} tags")
    tags = iter(red_team_tags)
    return df.with_columns(pl.Series("category", [next(tags) if r else HELPFUL_CATEGORY for r in red], pl.String()))


# ---------------------------------------------------------------------------------------------------------------
# Balance and split


def rank_key(prompt_id: str, seed: int) -> str:
    """A seeded, per-prompt pseudo-random sort key (so a subset does not depend on the other prompts)."""
    return hashlib.sha256(f"{seed}/{prompt_id}".encode()).hexdigest()


def balance(df: pl.DataFrame, max_per_category: int | None, seed: int) -> tuple[pl.DataFrame, int]:
    """Cap each (kind, category) group at `max_per_category` rows, keeping the rows with the lowest seeded hash.
    Returns (kept rows sorted by id, number dropped)."""
    if max_per_category is None:
        return df.sort("id"), 0
    if max_per_category < 1:
        raise ValueError(f"max_per_category must be >= 1 or null, got {max_per_category}")
    ranked = df.with_columns(pl.Series("_rank", [rank_key(i, seed) for i in df["id"].to_list()], pl.String()))
    kept = (
        ranked.sort("_rank")
        .with_columns(pl.int_range(pl.len()).over("kind", "category").alias("_n"))
        .filter(pl.col("_n") < max_per_category)
        .drop("_rank", "_n")
        .sort("id")
    )
    return kept, df.height - kept.height


def split_of(prompt_id: str, eval_fraction: float) -> str:
    """`eval` for a fixed slice of the id hash space, else `train`: a prompt's split never depends on the others."""
    return "eval" if int(prompt_id, 16) % 10_000 < eval_fraction * 10_000 else "train"


def counts(df: pl.DataFrame, *columns: str) -> dict:
    """Row counts nested by `columns` ({value: {value: count}}), keys sorted: a deterministic metrics block."""
    if len(columns) == 1:
        return dict(sorted(df.group_by(columns[0], maintain_order=True).len().iter_rows()))
    groups = sorted(df.group_by(columns[0], maintain_order=True), key=lambda g: g[0])
    return {key: counts(group, *columns[1:]) for (key,), group in groups}
