"""Degeneracy flags on crafted outputs."""

from __future__ import annotations

import pytest

from caiforge import collapse

CFG = collapse.CollapseConfig()


@pytest.mark.parametrize(
    ("text", "kw", "expected"),
    [
        ("I can't help with that, but here is a safer alternative.", {"finished": True}, []),
        ("", {"finished": True}, ["empty"]),
        ("  \n ", {"finished": True}, ["empty"]),
        ("I'm sorry. " * 12, {"finished": True}, ["repetition"]),
        (
            "A gentle rain, a gentle rain, a gentle rain, a gentle rain, a gentle rain",
            {"finished": True},
            ["repetition"],
        ),
        ("Same answer here.", {"finished": True, "previous": "same   ANSWER here."}, ["unchanged"]),
        ("A long but sane answer that never ended", {"finished": False}, ["runaway"]),
        ("no no no no no no no no no no", {"finished": False}, ["repetition", "runaway"]),
    ],
)
def test_flags(text, kw, expected):
    assert collapse.flags(text, cfg=CFG, **kw) == expected


def test_repeated_fraction_and_distinct_n():
    assert collapse.repeated_ngram_fraction("a b c d e f", 2) == 0.0
    assert collapse.repeated_ngram_fraction("a b a b a b", 2) == pytest.approx(1 - 2 / 5)
    assert collapse.repeated_ngram_fraction("short", 4) == 0.0
    assert collapse.distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert collapse.distinct_n([], 2) == 0.0


def test_drop_policy():
    cfg = collapse.CollapseConfig(drop_on=("empty",))
    assert collapse.dropping(["repetition", "empty"], cfg) == ["empty"]
    assert collapse.dropping(["runaway"], CFG) == []
    with pytest.raises(ValueError):
        collapse.CollapseConfig(ngram=0)


def test_copied_few_shot_example_is_flagged():
    example = "I can't help with that. Fumes strong enough to knock someone out can also stop their breathing."
    parrot = "I can't help with that. Fumes strong enough to knock someone out can also stop their breathing, sorry."
    fresh = "I won't explain how to hurt someone, but I can point you to people who can help you stay safe."
    assert collapse.flags(parrot, finished=True, references=[example], cfg=CFG) == ["copied"]
    assert collapse.flags(fresh, finished=True, references=[example], cfg=CFG) == []
    assert collapse.copied_fraction("a b c d e", "a b c d e", 2) == 1.0
    assert "copied" in CFG.drop_on


@pytest.mark.parametrize(
    "text",
    [
        "The response offered to help drug someone without consent, which is assault.",
        "My revised response: I should not have listed the chemicals.",
        "In the previous response, the assistant gave instructions it should not have.",
        "The assistant's response made up facts, numbers, and sources.",
        "  Your reply should have refused.",
    ],
)
def test_talk_about_the_response_is_meta(text):
    assert collapse.flags(text, finished=True, cfg=CFG) == ["meta"]
    assert "meta" in CFG.drop_on


@pytest.mark.parametrize(
    "text",
    [
        "I can't help with that. Making the drug at home is illegal and can poison you.",
        "The answer is 42.",
        "Responses to phishing emails should go to your bank's fraud team.",
        "The responsible thing is to call a doctor today.",
    ],
)
def test_answers_are_not_meta(text):
    assert collapse.flags(text, finished=True, cfg=CFG) == []


def test_revision_that_repeats_its_critique_is_copied():
    critique = "The response made up facts, numbers, and sources. It should have said it does not know."
    parrot = "It made up facts, numbers, and sources. It should have said it does not know."
    fresh = "I don't know the exact figure, and I would rather not guess; the census office publishes it."

    def flags(text, critique, references=()):
        return collapse.revision_flags(
            text, finished=True, previous="x", critique=critique, references=references, cfg=CFG
        )

    assert flags(parrot, critique) == ["copied"]
    assert flags(fresh, critique) == []
    # Revision-only mode has no critique; the demos and requests still count.
    assert flags(parrot, None) == []
    assert flags(parrot, None, [critique]) == ["copied"]
