"""Preference sources: the pairs `pm` and `rlaif` train on.

Three sources (`preference_source` in params.yaml, copied into pm.source and rlaif.source):
- `ai`: label's AI-labelled pairs (soft labels from the feedback model), with any human labels;
- `revisions`: SL-CAI's own pairs, no judge (Hugging Face's constitutional-ai recipe): for each red-team prompt,
  chosen = the last usable revision, rejected = the policy's initial answer, with the principles that produced the
  revision (`revision_pairs`, written by critique_revise);
- `both`: the revision pairs and human labels, plus the AI-labelled pairs where the AI is confident
  (|2p - 1| >= gate.confident): the AI labels decide only where they lean clearly.

Every source is one file of schemas.PREFERENCES rows (`label_source`: ai, human or revision): critique_revise writes
the revision pairs; label writes its own pairs and appends the revision pairs, so the `both` file exists without a
third stage. params.yaml resolves the source to that one file (pm.data, rlaif.preferences) and dvc.yaml declares it,
so with `revisions` neither stage depends on label at all.
"""

from __future__ import annotations

from typing import Literal

import polars as pl

Source = Literal["ai", "revisions", "both"]
SOURCES: tuple[str, ...] = ("ai", "revisions", "both")
USES_AI = {"ai": True, "revisions": False, "both": True}
"""Whether a source trains on AI labels (and so the signal gate's label checks apply)."""


def revision_pairs(revisions: pl.DataFrame, usable: dict[str, list[int]]) -> list[dict]:
    """Preference rows from critique_revise's rounds (schemas.REVISIONS rows) and each prompt's usable rounds (the
    revisions that were built upon, in order): chosen = the last usable revision, rejected = the round-1 `response`
    (the initial answer), `principle_ids` = the principles of the usable rounds. A prompt without a usable revision,
    or whose revision equals its initial answer, gives no pair. p_chosen and confidence are 1.0 (the revision is
    preferred by construction); provenance is the policy's fingerprint and seed. Sorted by prompt id."""
    out = []
    for (pid,), rounds in revisions.sort("prompt_id", "round").group_by("prompt_id", maintain_order=True):
        used = usable.get(pid, [])
        if not used:
            continue
        by_round = {r["round"]: r for r in rounds.iter_rows(named=True)}
        first, chosen = by_round[1], by_round[used[-1]]["revision"]
        if chosen == first["response"]:
            continue
        out.append(
            {
                "prompt_id": pid,
                "prompt": first["prompt"],
                "chosen": chosen,
                "rejected": first["response"],
                "p_chosen": 1.0,
                "confidence": 1.0,
                "principle_ids": [by_round[r]["principle_id"] for r in used],
                "label_source": "revision",
                "order_consistency": None,
                "model_fingerprint": first["model_fingerprint"],
                "seed": first["seed"],
            }
        )
    return out


def select(rows: pl.DataFrame, source: Source, confident: float) -> pl.DataFrame:
    """The rows of a preferences file that `source` trains on (see the module docstring)."""
    kind = pl.col("label_source")
    if source == "ai":
        return rows.filter(kind.is_in(["ai", "human"]))
    if source == "revisions":
        return rows.filter(kind == "revision")
    if source == "both":
        return rows.filter(kind.is_in(["revision", "human"]) | ((kind == "ai") & (pl.col("confidence") >= confident)))
    raise ValueError(f"preference source must be one of {', '.join(SOURCES)}, got {source!r}")


def training_rows(found: pl.DataFrame, source: Source, confident: float, path: str) -> pl.DataFrame:
    """`select`'s rows of the preferences file `path`; a ValueError naming the file when there are none."""
    rows = select(found, source, confident)
    if rows.is_empty():
        raise ValueError(
            f"{path}: no preference pairs for preference_source={source!r} (label_source values present: "
            f"{', '.join(sorted(set(found['label_source'].to_list()))) or 'none'}); "
            + (
                "critique_revise found no usable revision that differs from its initial answer"
                if source == "revisions"
                else "label wrote no pairs"
            )
        )
    return rows
