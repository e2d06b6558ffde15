"""The review page's pure logic: the drawn order, what a decision writes, and reading a saved verdict back."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from caiforge import human_labels, review

AI = {"prompt_id": "p1", "pair_id": "abc", "chosen": "good", "rejected": "bad", "p_chosen": 0.6}
NOW = datetime(2026, 12, 6, 10, 0, 0, tzinfo=UTC)


def pair(pair_id: str = "abc") -> review.Pair:
    return review.Pair(1, AI | {"pair_id": pair_id})


def test_the_order_is_drawn_per_reviewer_and_pair_fixed_and_balanced():
    pairs = [pair(f"p{i}") for i in range(400)]
    ann = [review.drawn_left(p, "ann") for p in pairs]
    assert ann == [review.drawn_left(p, "ann") for p in pairs], "a reload shows the same order"
    assert 160 < ann.count("chosen") < 240, "the AI's pick is on the left about half the time"
    assert ann != [review.drawn_left(p, "bob") for p in pairs], "each reviewer gets an order of their own"


@pytest.mark.parametrize(
    ("left", "decision", "chosen", "verdict", "left_field", "ai_p"),
    [
        ("chosen", "left", "good", "prefer", "chosen", 0.6),  # agrees with the AI
        ("chosen", "right", "bad", "prefer", "rejected", 0.4),  # overrules it
        ("rejected", "left", "bad", "prefer", "chosen", 0.4),
        ("rejected", "right", "good", "prefer", "rejected", 0.6),
        ("rejected", "tie", "good", "tie", "rejected", 0.6),  # no preference: the AI's orientation is kept
        ("chosen", "skip", "good", "skip", "chosen", 0.6),
    ],
)
def test_a_decision_writes_labels_fields_and_what_was_shown(
    tmp_path, left, decision, chosen, verdict, left_field, ai_p
):
    row = review.verdict_row(review.Shown(pair(), left, None), decision, "ann", NOW)
    assert row == {
        "prompt_id": "p1",
        "chosen": chosen,
        "rejected": "bad" if chosen == "good" else "good",
        "verdict": verdict,
        "pair_id": "abc",
        "reviewer": "ann",
        "time": "2026-12-06T10:00:00+00:00",
        "left": left_field,
        "ai_p_chosen": pytest.approx(ai_p),
    }
    assert row[row["left"]] == AI[left], "`left` names the text that was on the left"
    back = review.shown(pair(), row, "someone else")
    assert (back.left, back.decision) == (left, decision), "a saved verdict reads back as it was given"
    saved = human_labels.record(tmp_path / "labels.jsonl", row)
    assert human_labels.read(tmp_path / "labels.jsonl") == {saved.key: saved}, "a row label reads"


def test_an_undecided_or_hand_typed_verdict_gets_the_drawn_order():
    drawn = review.drawn_left(pair(), "ann")
    assert review.shown(pair(), None, "ann") == review.Shown(pair(), drawn, None)
    typed = {"prompt_id": "p1", "chosen": "bad", "rejected": "good"}
    assert review.shown(pair(), typed, "ann") == review.Shown(
        pair(), drawn, "left" if drawn == "rejected" else "right"
    )
    with pytest.raises(ValueError, match="unknown decision"):
        review.verdict_row(review.Shown(pair(), "chosen", None), "both", "ann", NOW)
