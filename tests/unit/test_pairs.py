"""caiforge.pairs: revision pairs from critique_revise's rounds, and which rows each preference source trains on."""

from __future__ import annotations

import polars as pl
import pytest

from caiforge import pairs, schemas


def rounds(pid: str, responses: list[str], revisions: list[str], principles: list[str]) -> list[dict]:
    return [
        {
            "prompt_id": pid,
            "prompt": f"prompt {pid}",
            "round": r + 1,
            "principle_id": principles[r],
            "response": responses[r],
            "critique": "c",
            "revision": revisions[r],
            "flags": [],
            "critique_tokens": 1,
            "revision_tokens": 1,
            "model_fingerprint": "policy-fp",
            "seed": 7,
        }  # fmt: skip
        for r in range(len(responses))
    ]


def test_revision_pairs_take_the_last_usable_revision_and_its_principles():
    table = pl.DataFrame(
        [
            # Round 2 collapsed (round 3 critiques round 1's revision again): principles of rounds 1 and 3.
            *rounds("a", ["init", "rev1", "rev1"], ["rev1", "loop loop", "rev3"], ["p1", "p2", "p3"]),
            # No usable revision at all.
            *rounds("b", ["init b", "init b"], ["x", "y"], ["p1", "p2"]),
            # The revision repeats the initial answer: no preference to learn.
            *rounds("c", ["same"], ["same"], ["p1"]),
        ],
        schema=dict(schemas.REVISIONS.columns),
    )
    found = pairs.revision_pairs(table, {"a": [1, 3], "b": [], "c": [1]})
    assert found == [
        {
            "prompt_id": "a", "prompt": "prompt a", "chosen": "rev3", "rejected": "init", "p_chosen": 1.0,
            "confidence": 1.0, "principle_ids": ["p1", "p3"], "label_source": "revision", "order_consistency": None,
            "model_fingerprint": "policy-fp", "seed": 7,
        }
    ]  # fmt: skip
    schemas.PREFERENCES.check(pl.DataFrame(found, schema=dict(schemas.PREFERENCES.columns)), "pairs")


def test_each_source_selects_its_rows():
    rows = pl.DataFrame(
        {
            "label_source": ["ai", "ai", "human", "revision"],
            "confidence": [0.1, 0.5, 1.0, 1.0],
        }
    )
    assert pairs.select(rows, "ai", 0.2)["label_source"].to_list() == ["ai", "ai", "human"]
    assert pairs.select(rows, "revisions", 0.2)["label_source"].to_list() == ["revision"]
    # both: the AI decides only where it is confident.
    assert pairs.select(rows, "both", 0.2)["confidence"].to_list() == [0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="must be one of ai, revisions, both"):
        pairs.select(rows, "votes", 0.2)
    assert pairs.training_rows(rows, "both", 0.2, "x.parquet").equals(pairs.select(rows, "both", 0.2))
    only_ai = rows.filter(pl.col("label_source") == "ai")
    with pytest.raises(
        ValueError,
        match=r"x.parquet: no preference pairs for preference_source='revisions' \(label_source values present: ai\)",
    ):
        pairs.training_rows(only_ai, "revisions", 0.2, "x.parquet")
