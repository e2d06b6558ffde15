"""Pure labelling logic: pairs, prompts, order-swap debiasing, ensembling, bias, review queue."""

from __future__ import annotations

import math
import re

import pytest

from caiforge import config, constitution, engines, labeling
from caiforge.constitution import ComparisonExample, ComparisonPrinciple

PRINCIPLES = [
    ComparisonPrinciple("cmp-harm", "harmlessness", "Which response is less harmful?"),
    ComparisonPrinciple("cmp-help", "helpfulness", "Which response is more helpful?"),
    ComparisonPrinciple("cmp-honest", "honesty", "Which response is more honest?"),
]
EXAMPLES = [
    ComparisonExample("demo prompt 1", "good one", "bad one", principle="cmp-help", reasoning="Because."),
    ComparisonExample("demo prompt 2", "good two", "bad two"),
]
HARMLESS = "I can't help with that, but here is a safe alternative."
HARMFUL = "Sure, here are the steps to do the harmful thing."
OPTIONS = re.compile(r"\(A\) (.*)\n\(B\) (.*?)(?:\n\n|$)", re.S)


class FakeScorer:
    """A ChoiceScorer that decides from the two option texts of the last question."""

    def __init__(self, decide) -> None:
        self.decide = decide
        self.stats = engines.Stats()
        self.identity = "fake-judge"

    def choice_logprobs(self, conversations, prefills, options=("A", "B")):
        out = []
        for conv in conversations:
            a, b = OPTIONS.search(conv[-1]["content"]).groups()
            out.append(tuple(math.log(p) for p in self.decide(a, b)))
            self.stats.rows += 1
        return out


always_a = FakeScorer(lambda a, b: (0.9, 0.1))
prefers_harmless = FakeScorer(
    lambda a, b: (0.8, 0.2) if a == HARMLESS else (0.2, 0.8) if b == HARMLESS else (0.5, 0.5)
)


def judge(pairs, scorer, m=2, seed=0, chain_of_thought=False):
    """Score every pair x drawn principle x order with `scorer`, as the stage does."""
    questions = [
        (pair, pr, order)
        for pair in pairs
        for pr in labeling.draw_principles(pair, PRINCIPLES, m, seed)
        for order in labeling.ORDERS
    ]
    chats = [
        labeling.comparison_turns(pair.prompt, *pair.slots(o), pr, chain_of_thought=chain_of_thought)
        for pair, pr, o in questions
    ]
    lps = scorer.choice_logprobs(chats, [labeling.answer_prefill()] * len(chats))
    return [labeling.Judgement(p.pair_id, pr.id, o, *lp) for (p, pr, o), lp in zip(questions, lps, strict=True)]


def test_pairs_skip_identical_samples():
    pairs, skipped = labeling.make_pairs("p1", "q", ["x", "y"])
    assert [(p.first, p.second) for p in pairs] == [("x", "y")] and skipped == 0
    pairs, skipped = labeling.make_pairs("p1", "q", ["x", "x"])
    assert pairs == [] and skipped == 1
    pairs, skipped = labeling.make_pairs("p1", "q", ["x", "y", "x"])
    assert [(p.first, p.second) for p in pairs] == [("x", "y")] and skipped == 2
    a, b = labeling.Pair("p1", "q", "x", "y"), labeling.Pair("p1", "q", "y", "x")
    assert a.pair_id == b.pair_id != labeling.Pair("p2", "q", "x", "y").pair_id
    assert a.slots("ab") == ("x", "y") and a.slots("ba") == ("y", "x")


def test_principles_are_distinct_seeded_and_per_pair():
    pair = labeling.Pair("p1", "q", "x", "y")
    drawn = labeling.draw_principles(pair, PRINCIPLES, 2, seed=0)
    assert len({p.id for p in drawn}) == 2
    assert drawn == labeling.draw_principles(pair, PRINCIPLES, 2, seed=0)
    draws = {tuple(p.id for p in labeling.draw_principles(pair, PRINCIPLES, 2, seed=s)) for s in range(20)}
    assert len(draws) > 1, "the seed matters"
    with pytest.raises(ValueError, match="distinct"):
        labeling.draw_principles(pair, PRINCIPLES, 4, seed=0)


def test_comparison_prompt_and_demo_slots():
    by_id = {p.id: p for p in PRINCIPLES}
    turns = labeling.comparison_turns("How?", "first", "second", PRINCIPLES[0], EXAMPLES, by_id)
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant", "user"]
    # Demo 0 puts its better answer in (A), demo 1 in (B); demo 0 is asked with its own principle.
    assert "(A) good one\n(B) bad one" in turns[0]["content"] and "more helpful" in turns[0]["content"]
    assert turns[1]["content"] == "The answer is: (A)"
    assert "(A) bad two\n(B) good two" in turns[2]["content"] and "less harmful" in turns[2]["content"]
    assert turns[3]["content"] == "The answer is: (B)"
    assert turns[-1]["content"] == (
        "Consider the following conversation between a human and an assistant:\n\nHuman: How?\n\n"
        "Which response is less harmful?\nOptions:\n(A) first\n(B) second"
    )
    cot = labeling.comparison_turns("How?", "first", "second", PRINCIPLES[0], EXAMPLES, by_id, chain_of_thought=True)
    assert cot[-1]["content"].endswith(labeling.COT_REQUEST)
    assert cot[1]["content"] == "Because.\nSo the answer is: (A)"
    assert cot[3]["content"] == "The answer is: (B)", "a demo without reasoning answers plainly"
    assert labeling.answer_prefill() == "The answer is: ("
    assert labeling.answer_prefill(" I think so. ") == "I think so.\nSo the answer is: ("


def test_first_slot_labeller_gives_half_after_swap_and_its_bias_is_measured():
    pairs = [labeling.Pair(f"p{i}", "q", f"x{i}", f"y{i}") for i in range(5)]
    judgements = judge(pairs, always_a)
    labels = labeling.combine(judgements)
    assert all(lb.p_first == pytest.approx(0.5) for lb in labels.values())
    bias = labeling.position_bias(judgements)
    assert bias["measured"] == pytest.approx(0.4)
    assert bias["first_slot_rate"] == 1.0
    assert bias["before_swap"] == pytest.approx(0.4)
    assert bias["after_swap"] == pytest.approx(0.0)
    assert bias["order_consistency"] == 0.0


def test_harmless_text_wins_in_either_order():
    pairs = [labeling.Pair("p1", "q", HARMLESS, HARMFUL), labeling.Pair("p2", "q", HARMFUL, HARMLESS)]
    judgements = judge(pairs, prefers_harmless)
    labels = labeling.combine(judgements)
    for pair in pairs:
        chosen, rejected, p = labeling.orient(pair, labels[pair.pair_id].p_first)
        assert (chosen, rejected) == (HARMLESS, HARMFUL)
        assert p == pytest.approx(0.8)
        assert labels[pair.pair_id].confidence == pytest.approx(0.6)
        assert labels[pair.pair_id].principles_agree
    bias = labeling.position_bias(judgements)
    assert bias["measured"] == pytest.approx(0.0) and bias["order_consistency"] == 1.0


def test_chain_of_thought_band_clamps_slot_probabilities():
    j = [labeling.Judgement("p", "c", "ab", math.log(0.99), math.log(0.01))]
    j.append(labeling.Judgement("p", "c", "ba", math.log(0.05), math.log(0.95)))
    assert labeling.combine(j)["p"].p_first == pytest.approx(0.97)
    assert labeling.combine(j, band=(0.4, 0.6))["p"].p_first == pytest.approx(0.6)


def test_ensemble_averages_principles_and_measures_disagreement():
    def q(principle, p_first):
        lp = (math.log(p_first), math.log(1 - p_first))
        return [labeling.Judgement("p", principle, "ab", *lp), labeling.Judgement("p", principle, "ba", *lp[::-1])]

    label = labeling.combine(q("c1", 0.9) + q("c2", 0.2))["p"]
    assert label.p_first == pytest.approx(0.55)
    assert label.per_principle == (("c1", pytest.approx(0.9)), ("c2", pytest.approx(0.2)))
    assert label.disagreement == pytest.approx(0.7) and not label.principles_agree
    with pytest.raises(ValueError, match="both orders"):
        labeling.combine(q("c1", 0.9)[:1])


def test_review_queue_thresholds():
    cfg = labeling.ReviewConfig(min_confidence=0.2, max_disagreement=0.3)
    sure = labeling.PairLabel("p", 0.8, (("c1", 0.75), ("c2", 0.85)))
    unsure = labeling.PairLabel("p", 0.55, (("c1", 0.5), ("c2", 0.6)))
    split = labeling.PairLabel("p", 0.8, (("c1", 0.6), ("c2", 1.0)))
    assert labeling.review_reasons(sure, cfg) == []
    assert labeling.review_reasons(unsure, cfg) == ["low_confidence"]
    assert labeling.review_reasons(split, cfg) == ["principle_disagreement"]
    both = labeling.PairLabel("p", 0.5, (("c1", 0.1), ("c2", 0.9)))
    assert labeling.review_reasons(both, cfg) == ["low_confidence", "principle_disagreement"]
    with pytest.raises(ValueError, match="min_confidence"):
        labeling.ReviewConfig(min_confidence=1.5)


def test_default_constitution_demos_resolve():
    full = constitution.load(config.ROOT / "constitutions" / "default.yaml")
    by_id = {p.id: p for p in full.comparison}
    turns = labeling.comparison_turns("q", "a", "b", full.comparison[0], full.comparison_examples, by_id)
    assert len(turns) == 2 * len(full.comparison_examples) + 1
