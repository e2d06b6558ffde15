"""The review page's pure logic: the drawn order, what a decision writes, and reading a saved verdict back."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime

import polars as pl
import pytest
import yaml

from caiforge import human_labels, io, review, schemas

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


def workspace(tmp_path, rows: list[dict]) -> review.Workspace:
    """A project directory as `dvc repro label` leaves it: params.yaml, the queue, dvc.lock naming its md5."""
    (tmp_path / "params.yaml").write_text("label:\n  out_dir: data/label\n  human_labels: data/seed/labels.jsonl\n")
    queue = tmp_path / "data" / "label" / "review_queue.parquet"
    io.write_parquet(pl.DataFrame(rows, schema=dict(schemas.REVIEW_QUEUE.columns)), queue, schemas.REVIEW_QUEUE)
    md5 = hashlib.md5(queue.read_bytes()).hexdigest()
    lock = {"stages": {"label": {"outs": [{"path": "data/label/review_queue.parquet", "md5": md5}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    (tmp_path / "data" / "seed").mkdir(parents=True)
    (tmp_path / "data" / "seed" / "labels.jsonl").write_text("")
    return review.Workspace.of(tmp_path)


QUEUED = AI | {
    "prompt": "How?",
    "confidence": 0.2,
    "disagreement": 0.6,
    "principle_ids": ["cmp-a", "cmp-b"],
    "principle_p_chosen": [0.9, 0.3],
    "reasons": ["principle_disagreement"],
    "model_fingerprint": "f",
    "seed": 0,
}


def test_an_empty_queue_is_an_error_not_an_empty_page(tmp_path):
    with pytest.raises(review.ReviewError, match="review queue is empty: the AI labeller was sure of every pair"):
        review.Review(workspace(tmp_path, []), "ann")


def test_a_labels_file_broken_while_serving_names_the_line_and_saves_nothing(tmp_path):
    asyncio.run(_broken_labels_file(tmp_path))


async def _broken_labels_file(tmp_path):
    from aiohttp.test_utils import TestClient, TestServer

    ws = workspace(tmp_path, [QUEUED])
    async with TestClient(TestServer(review.Review(ws, "ann").app())) as client:
        page = await client.get("/pair/1")
        text = await page.text()
        assert page.status == 200 and "queued for: principle disagreement" in text and "How?" in text
        assert "<li><code>cmp-b</code>: " in text and '<details id="ai-label">' in text, "the AI label is folded"
        ws.labels.write_text('{"prompt_id": "p1"}\n')
        for response in (await client.get("/pair/1"), await client.post("/pair/1", data={"decision": "left"})):
            assert response.status in (400, 409)
        saved = await client.post("/pair/1", data={"decision": "left", "left": "chosen"})
        assert saved.status == 409 and "labels.jsonl: line 1: missing field 'chosen'" in await saved.text()
    assert ws.labels.read_text() == '{"prompt_id": "p1"}\n'


def test_after_a_decision_the_next_page_shows_the_ai_label_and_whether_you_agree(tmp_path):
    asyncio.run(_decide_twice(tmp_path))


async def _decide_twice(tmp_path):
    from aiohttp.test_utils import TestClient, TestServer

    other = QUEUED | {"prompt_id": "p2", "pair_id": "def", "principle_p_chosen": [0.5, 0.7]}
    ws = workspace(tmp_path, [QUEUED, other])
    async with TestClient(TestServer(review.Review(ws, "ann").app())) as client:
        first = await client.post("/pair/1", data={"decision": "left", "left": "chosen"})
        text = await first.text()
        assert str(first.url).endswith("/pair/2?saved=1") and "1 of 2 reviewed" in text
        note = text[text.index('id="last"') : text.index("</div>", text.index('id="last"'))]
        assert "Saved: pair 1, <b>left</b>. The AI preferred the <b>left</b> answer, P = 0.60. You agree." in note
        assert "<code>cmp-a</code>: left (P = 0.90)" in note and "<code>cmp-b</code>: right (P = 0.70)" in note
        done = await client.post("/pair/2", data={"decision": "right", "left": "chosen"})
        text = await done.text()
        assert "Every queued pair has a verdict" in text and "2 of 2 reviewed" in text
        assert "Saved: pair 2, <b>right</b>. The AI preferred the <b>left</b> answer" in text, "the last one's too"
        revisit = await (await client.get("/pair/2")).text()
        assert "You disagree." in revisit and "<code>cmp-a</code>: neither (P = 0.50)" in revisit
        assert '<details id="ai-label" open>' in revisit, "a decided pair shows the AI's label"
