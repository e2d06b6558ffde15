"""RLAIF preference labelling (Bai et al. 2022, section 4), as pure functions of their inputs.

The pieces, in the order the `label` stage uses them:

- `make_pairs`: the K sampled responses of one prompt become unordered pairs of distinct texts (identical samples
  make no pair; the caller counts them);
- `draw_principles`: M distinct comparison principles per pair, seeded by the pair's identity alone;
- `comparison_turns` / `answer_prefill`: the multiple-choice question the feedback model sees, with few-shot demos
  in front (demo i puts its better answer in slot (A) when i is even, (B) when odd: deterministic and balanced, so
  the demos teach no position preference);
- `combine`: each (pair, principle) is judged in both orders ("ab": first response in slot A; "ba": swapped); the
  slot probabilities are normalized over the two option tokens, optionally clamped to a band (chain-of-thought
  mode), mapped back to "first response is better", averaged over the two orders (order-swap debiasing: a labeller
  that always answers (A) gives exactly 0.5) and then over the principles (the ensemble);
- `position_bias`, `principle_agreement`: what the metrics report;
- `review_reasons`: HRLAIF: which pairs a human should look at (their verdicts: caiforge.human_labels);
- `pair_key`: how a human verdict finds its pair.

Probabilities here are always "the first response of the pair is better" unless a name says otherwise (`p_a`: the
response in slot A is better).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

from caiforge import constitution
from caiforge.constitution import ComparisonExample, ComparisonPrinciple
from caiforge.engines import Message

ORDERS = ("ab", "ba")
"""`ab`: the pair's first response is option (A); `ba`: it is option (B)."""
ANSWER_PREFILL = "The answer is: ("
"""Start of the assistant turn; the next token is the option letter."""
COT_REQUEST = "Let's think step by step, then answer with (A) or (B)."
"""Appended to the question in chain-of-thought mode."""
COT_ANSWER = "\nSo the answer is: ("
"""Follows the generated reasoning in chain-of-thought mode; the next token is the option letter."""
REVIEW_REASONS = ("low_confidence", "principle_disagreement")


# ---------------------------------------------------------------------------------------------------------------
# Pairs and principles


@dataclass(frozen=True)
class Pair:
    """Two different responses to one prompt, in sample order."""

    prompt_id: str
    prompt: str
    first: str
    second: str

    @property
    def pair_id(self) -> str:
        """Content hash of the prompt id and the two texts, independent of their order."""
        key = json.dumps([self.prompt_id, sorted([self.first, self.second])], ensure_ascii=False)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def slots(self, order: str) -> tuple[str, str]:
        """(option A text, option B text) for `order`."""
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        return (self.first, self.second) if order == "ab" else (self.second, self.first)


def make_pairs(prompt_id: str, prompt: str, samples: Sequence[str]) -> tuple[list[Pair], int]:
    """All pairs of distinct sampled texts (in sample order), and how many sample pairs were skipped as identical."""
    unique = list(dict.fromkeys(samples))
    pairs = [Pair(prompt_id, prompt, a, b) for a, b in combinations(unique, 2)]
    return pairs, math.comb(len(samples), 2) - len(pairs)


def draw_principles(
    pair: Pair, principles: Sequence[ComparisonPrinciple], m: int, seed: int
) -> list[ComparisonPrinciple]:
    """`m` distinct principles for `pair`, sorted by id; seeded by the pair alone, so other pairs never move them."""
    drawn = constitution.draw_distinct(principles, random.Random(f"{seed}/{pair.pair_id}"), m)
    return sorted(drawn, key=lambda p: p.id)


# ---------------------------------------------------------------------------------------------------------------
# Prompts


def question(prompt: str, option_a: str, option_b: str, principle: str) -> str:
    """The paper's multiple-choice format: the conversation, the principle, the two options."""
    return (
        "Consider the following conversation between a human and an assistant:\n\n"
        f"Human: {prompt}\n\n"
        f"{principle}\n"
        "Options:\n"
        f"(A) {option_a}\n"
        f"(B) {option_b}"
    )


def comparison_turns(
    prompt: str,
    option_a: str,
    option_b: str,
    principle: ComparisonPrinciple,
    examples: Sequence[ComparisonExample] = (),
    principles: Mapping[str, ComparisonPrinciple] | None = None,
    *,
    chain_of_thought: bool = False,
) -> list[Message]:
    """The chat the feedback model sees: few-shot demos as earlier turns, then the question about this pair.

    A demo is asked with its own principle when it names one (looked up in `principles`), else with `principle`.
    Its answer is "The answer is: (X)", or in chain-of-thought mode its reasoning (when given) followed by
    "So the answer is: (X)". The assistant turn of the real question is opened by `answer_prefill`.
    """
    principles = principles or {}
    suffix = f"\n\n{COT_REQUEST}" if chain_of_thought else ""
    turns: list[Message] = []
    for i, ex in enumerate(examples):
        text = principles[ex.principle].text if ex.principle in principles else principle.text
        chosen_in_a = i % 2 == 0
        a, b = (ex.chosen, ex.rejected) if chosen_in_a else (ex.rejected, ex.chosen)
        letter = "A" if chosen_in_a else "B"
        answer = (
            f"{ex.reasoning.strip()}{COT_ANSWER}{letter})"
            if chain_of_thought and ex.reasoning
            else f"{ANSWER_PREFILL}{letter})"
        )
        turns += [
            {"role": "user", "content": question(ex.prompt, a, b, text) + suffix},
            {"role": "assistant", "content": answer},
        ]
    turns.append({"role": "user", "content": question(prompt, option_a, option_b, principle.text) + suffix})
    return turns


def answer_prefill(reasoning: str | None = None) -> str:
    """The assistant turn up to the option letter: plain, or after chain-of-thought `reasoning`."""
    return ANSWER_PREFILL if reasoning is None else f"{reasoning.strip()}{COT_ANSWER}"


# ---------------------------------------------------------------------------------------------------------------
# From log-probs to labels


def normalize(logprob_a: float, logprob_b: float) -> float:
    """P(A) renormalized over the two option tokens (numerically stable)."""
    return 1.0 / (1.0 + math.exp(logprob_b - logprob_a))


def clamp(p: float, band: tuple[float, float] | None) -> float:
    return p if band is None else min(max(p, band[0]), band[1])


@dataclass(frozen=True)
class Judgement:
    """One scored question: a pair under one principle in one order, with the option tokens' raw log-probs."""

    pair_id: str
    principle_id: str
    order: str
    logprob_a: float
    logprob_b: float

    @property
    def p_a(self) -> float:
        """Probability that the response in slot A is better."""
        return normalize(self.logprob_a, self.logprob_b)

    def p_first(self, band: tuple[float, float] | None = None) -> float:
        """Probability that the pair's first response is better (slot probability clamped to `band` first)."""
        p = clamp(self.p_a, band)
        return p if self.order == "ab" else 1.0 - p


@dataclass(frozen=True)
class PairLabel:
    """The AI label of one pair: after order-swap debiasing and the principle ensemble."""

    pair_id: str
    p_first: float
    """Probability that the pair's first response is better."""
    per_principle: tuple[tuple[str, float], ...]
    """(principle id, debiased p_first under that principle), sorted by id."""

    @property
    def confidence(self) -> float:
        return abs(2.0 * self.p_first - 1.0)

    @property
    def disagreement(self) -> float:
        """Spread of the principles' verdicts: max - min of their p_first (0 with one principle)."""
        ps = [p for _, p in self.per_principle]
        return max(ps) - min(ps)

    @property
    def principles_agree(self) -> bool:
        """Every principle leans the same way (an exact 0.5 leans neither way and agrees with both)."""
        ps = [p for _, p in self.per_principle]
        return all(p >= 0.5 for p in ps) or all(p <= 0.5 for p in ps)


def _by_question(judgements: Iterable[Judgement]) -> dict[tuple[str, str], dict[str, Judgement]]:
    grouped: dict[tuple[str, str], dict[str, Judgement]] = defaultdict(dict)
    for j in judgements:
        if j.order not in ORDERS:
            raise ValueError(f"pair {j.pair_id}, principle {j.principle_id}: unknown order {j.order!r}")
        if j.order in grouped[j.pair_id, j.principle_id]:
            raise ValueError(f"pair {j.pair_id}, principle {j.principle_id}: order {j.order} scored twice")
        grouped[j.pair_id, j.principle_id][j.order] = j
    for (pair_id, principle_id), orders in grouped.items():
        if set(orders) != set(ORDERS):
            raise ValueError(f"pair {pair_id}, principle {principle_id}: needs both orders, got {sorted(orders)}")
    return grouped


def combine(judgements: Iterable[Judgement], band: tuple[float, float] | None = None) -> dict[str, PairLabel]:
    """Per pair: average both orders (debiasing), then the principles (ensemble). Every question needs both orders."""
    per_pair: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for (pair_id, principle_id), orders in sorted(_by_question(judgements).items()):
        p = sum(orders[o].p_first(band) for o in ORDERS) / len(ORDERS)
        per_pair[pair_id].append((principle_id, p))
    return {
        pair_id: PairLabel(pair_id, sum(p for _, p in ps) / len(ps), tuple(ps))
        for pair_id, ps in sorted(per_pair.items())
    }


def orient(pair: Pair, p_first: float) -> tuple[str, str, float]:
    """(chosen, rejected, p_chosen) with p_chosen >= 0.5; an exact tie keeps the sample order."""
    if p_first >= 0.5:
        return pair.first, pair.second, p_first
    return pair.second, pair.first, 1.0 - p_first


def position_bias(judgements: Sequence[Judgement], band: tuple[float, float] | None = None) -> dict[str, float]:
    """How much the labeller prefers a slot, and what is left of it after the order swap.

    - `measured`: mean P(A) - 0.5 over every scored question. Each pair is asked in both orders, so the content
      cancels out and only the slot preference remains (+0.4 for a labeller that always says 90% (A)).
    - `first_slot_rate`: share of questions whose answer leans to (A) (0.5 for an unbiased labeller).
    - `before_swap`: mean P(first response better) - 0.5 from the `ab` order alone: the bias labels would carry
      without the swap. `after_swap`: the same for the debiased (both-order) labels.
    - `order_consistency`: share of (pair, principle) whose verdict leans the same way in both orders.
    """
    if not judgements:
        return {k: 0.0 for k in ("measured", "first_slot_rate", "before_swap", "after_swap", "order_consistency")}
    questions = _by_question(judgements).values()
    ab = [q["ab"].p_first(band) for q in questions]
    both = [(q["ab"].p_first(band) + q["ba"].p_first(band)) / 2 for q in questions]
    consistent = [_consistent(q) for q in questions]
    return {
        "measured": sum(j.p_a for j in judgements) / len(judgements) - 0.5,
        "first_slot_rate": sum(j.p_a > 0.5 for j in judgements) / len(judgements),
        "before_swap": sum(ab) / len(ab) - 0.5,
        "after_swap": sum(both) / len(both) - 0.5,
        "order_consistency": sum(consistent) / len(consistent),
    }


def _consistent(question: dict[str, Judgement]) -> bool:
    """Both orders' verdicts lean to the same response (or both sit exactly at 0.5)."""
    ab, ba = question["ab"].p_first(), question["ba"].p_first()
    return (ab - 0.5) * (ba - 0.5) > 0 or ab == ba == 0.5


def pair_order_consistency(judgements: Sequence[Judgement]) -> dict[str, float]:
    """Per pair: the share of its principles whose verdicts lean the same way in both orders (the per-pair form of
    `position_bias`'s `order_consistency`; with the same number of principles per pair, their mean is it)."""
    per_pair: dict[str, list[bool]] = defaultdict(list)
    for (pair_id, _), question in _by_question(judgements).items():
        per_pair[pair_id].append(_consistent(question))
    return {pair_id: sum(flags) / len(flags) for pair_id, flags in per_pair.items()}


# ---------------------------------------------------------------------------------------------------------------
# HRLAIF: review queue and human labels


@dataclass(frozen=True)
class ReviewConfig:
    """Which AI labels a human should review."""

    min_confidence: float = 0.1
    """Queue a pair whose confidence |2p - 1| is below this."""
    max_disagreement: float = 0.5
    """Queue a pair whose principles' verdicts spread (max p - min p) by more than this."""

    def __post_init__(self) -> None:
        if not (0 <= self.min_confidence <= 1 and 0 <= self.max_disagreement <= 1):
            raise ValueError(f"min_confidence and max_disagreement must be in [0, 1], got {self}")


def review_reasons(label: PairLabel, cfg: ReviewConfig) -> list[str]:
    """Why `label` needs a human ([] when it does not)."""
    reasons = []
    if label.confidence < cfg.min_confidence:
        reasons.append("low_confidence")
    if label.disagreement > cfg.max_disagreement:
        reasons.append("principle_disagreement")
    return reasons


def pair_key(prompt_id: str, a: str, b: str) -> tuple[str, frozenset[str]]:
    """Identity of an unordered pair of responses to one prompt (how human labels find their pair)."""
    return prompt_id, frozenset((a, b))
