"""The signal gate: whether AI preference labels carry signal before RL trains on them.

Three measurements, each with a floor (`GateConfig`):
- order consistency: the share of (pair, principle) verdicts that lean the same way in both answer orders
  (read back from the preferences file's per-pair `order_consistency`; 0.5 is a coin, below it the judge follows
  the slot, not the answers);
- the share of confident labels: AI-labelled pairs whose confidence |2p - 1| is at least `confident`;
- the PM's held-out accuracy: its 95% Wilson interval must lie above 0.5.

`pm` measures the first two before it trains (and, with `on_noise: fail`, stops there) and writes them with the PM's
accuracy to its signal.json; `rlaif` reads that and, when any falls short, does what `on_noise` says: `keep_sft`
writes the SFT model unchanged and marks it, `fail` stops with what to change, `warn` trains anyway and marks it. The
verdict (`trained`, `kept_sft`, `trained_without_signal`) travels to the report and the headline.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from caiforge import pairs

log = logging.getLogger(__name__)

REMEDY = (
    "clearer labels carry signal: a stronger feedback model (label.feedback or models.feedback), "
    "label.chain_of_thought, more label.principles_per_pair, or human verdicts (`caiforge review`); "
    "or set rlaif.gate.on_noise to keep_sft (keep the SFT model) or warn (train anyway)"
)


@dataclass(frozen=True)
class GateConfig:
    """When AI labels count as carrying signal, and what RL does when they do not."""

    on_noise: Literal["keep_sft", "fail", "warn"]
    """Labels without signal: keep_sft writes the SFT model as rlaif's model, untrained, and marks it; fail stops
    (pm before training, rlaif before training) naming what to change; warn trains anyway and marks it."""
    min_order_consistency: float
    """Floor on label's order consistency (0.5: a coin)."""
    confident: float
    """A label with confidence |2 p_chosen - 1| at or above this is confident."""
    min_confident_share: float
    """Floor on the share of AI-labelled pairs that are confident."""

    def __post_init__(self) -> None:
        for name in ("min_order_consistency", "confident", "min_confident_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"gate.{name} must be in [0, 1], got {getattr(self, name)}")


def label_signal(order_consistency: float | None, confidences: Sequence[float], cfg: GateConfig) -> dict[str, Any]:
    """The labels' own evidence: order consistency, the share of confident labels among `confidences` (the AI-
    labelled pairs'), and a reason for each that falls short of its floor (none: they carry signal)."""
    confident = sum(c >= cfg.confident for c in confidences)
    share = confident / len(confidences) if confidences else None
    reasons = []
    if order_consistency is None or order_consistency < cfg.min_order_consistency:
        reasons.append(
            f"order consistency {_fmt(order_consistency)} is below gate.min_order_consistency "
            f"{cfg.min_order_consistency} (0.5 is a coin)"
        )
    if share is None or share < cfg.min_confident_share:
        reasons.append(
            f"{confident} of {len(confidences)} AI labels have confidence >= {cfg.confident} (a share of "
            f"{_fmt(share)}, below gate.min_confident_share {cfg.min_confident_share})"
        )
    return {
        "order_consistency": order_consistency,
        "confident_share": None if share is None else round(share, 4),
        "ai_pairs": len(confidences),
        "reasons": reasons,
    }


def source_signal(preferences: Any, source: str, cfg: GateConfig) -> dict[str, Any]:
    """`label_signal` of a preferences file's AI labels when `source` trains on them (caiforge.pairs: ai, both);
    for `revisions`, which uses no AI label, no label checks apply (no reasons, `applies` False)."""
    if not pairs.USES_AI[source]:
        return {"order_consistency": None, "confident_share": None, "ai_pairs": 0, "reasons": [], "applies": False}
    ai = preferences.filter(preferences["label_source"] == "ai")
    return {**label_signal(order_consistency(preferences), ai["confidence"].to_list(), cfg), "applies": True}


def pm_signal(heldout: Mapping[str, Any]) -> list[str]:
    """Why the PM's held-out accuracy (pm's `heldout_after`) shows no signal: its interval reaches 0.5 or is
    missing ([]: it lies above 0.5)."""
    ci = heldout.get("accuracy_ci95")
    if ci is None:
        return [f"the PM has no held-out accuracy ({heldout.get('accuracy_pairs', 0)} held-out pairs prefer a side)"]
    if ci[0] <= 0.5:
        return [
            f"the PM's held-out accuracy {_fmt(heldout.get('accuracy'))} on {heldout.get('accuracy_pairs')} pairs "
            f"has the 95% interval [{_fmt(ci[0])}, {_fmt(ci[1])}], which reaches 0.5"
        ]
    return []


def decide(reasons: Sequence[str], cfg: GateConfig, stage: str) -> dict[str, Any]:
    """The gate's verdict on `reasons` (the shortfalls found): `trained` with none; else `kept_sft` or
    `trained_without_signal` as `on_noise` says, or a ValueError naming the shortfalls and what to change."""
    if not reasons:
        return {"verdict": "trained", "reasons": [], "on_noise": cfg.on_noise}
    why = "; ".join(reasons)
    if cfg.on_noise == "fail":
        raise ValueError(f"{stage}: the AI labels carry no signal ({why}), and gate.on_noise is 'fail': {REMEDY}")
    verdict = "kept_sft" if cfg.on_noise == "keep_sft" else "trained_without_signal"
    log.warning("%s: the AI labels carry no signal (%s): %s", stage, why, verdict.replace("_", " ").upper())
    return {"verdict": verdict, "reasons": list(reasons), "on_noise": cfg.on_noise}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def order_consistency(preferences: Any) -> float | None:
    """Label's order consistency read back from a preferences file (schemas.PREFERENCES): the mean of the AI-judged
    pairs' `order_consistency` (each the share of its principles judged the same way in both orders; with equal
    principles per pair, the share of all (pair, principle) verdicts). None when no pair was AI-judged."""
    values = preferences["order_consistency"].drop_nulls()
    return round(float(values.mean()), 4) if len(values) else None
