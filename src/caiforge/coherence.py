"""How an answer reads to a reference model: its surprise, the mean negative log-likelihood per answer token (nats).

A damaged model (a depth-pruned student before healing) writes gibberish: "zeb dehyd:zeb dehyd =ze.ah.ah.ah". It is
diverse and does not loop, so neither distinct-n nor `collapse.degenerate` catches it; a working reference model
finds it far less likely than the answers of any model that still talks (README, "Distillation, evaluation and the
report").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def surprise(scorer: Any, prompts: Sequence[str], answers: Sequence[str]) -> list[float | None]:
    """Per (prompt, answer): the mean negative log-likelihood the reference model behind `scorer` (a transformers
    choice scorer, `TransformersChoiceScorer.reply_logprobs`) gives the answer's tokens, the end of the turn
    included, teacher-forced after the prompt; None for an empty answer. Batched, and taken from the scorer's row
    cache where it has them."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    said = [i for i, a in enumerate(answers) if a.strip()]
    scored = scorer.reply_logprobs([prompts[i] for i in said], [answers[i] for i in said])
    out: list[float | None] = [None] * len(answers)
    for i, (total, tokens) in zip(said, scored, strict=True):
        out[i] = -total / tokens
    return out
