"""The signal gate: order consistency read back from comparisons, label signal floors, and the verdict."""

from __future__ import annotations

import math

import polars as pl
import pytest

from caiforge import gate, labeling, schemas

CFG = gate.GateConfig(on_noise="keep_sft", min_order_consistency=0.6, confident=0.2, min_confident_share=0.25)


def comparisons(p_ab_ba: list[tuple[float, float]]) -> pl.DataFrame:
    rows = [
        {
            "prompt_id": f"q{k}",
            "pair_id": f"pair{k}",
            "principle_id": "p",
            "order": order,
            "response_a": "a",
            "response_b": "b",
            "reasoning": "",
            "logprob_a": -1.0,
            "logprob_b": -1.0,
            "p_a": p_a,
            "model_fingerprint": "m",
            "seed": 0,
        }  # fmt: skip
        for k, pair in enumerate(p_ab_ba)
        for order, p_a in zip(("ab", "ba"), pair, strict=True)
    ]
    return pl.DataFrame(rows, schema=dict(schemas.COMPARISONS.columns))


def test_order_consistency_matches_labels_own_measure():
    # (P(A) in ab, P(A) in ba): a judge that sees the answers flips P(A) with the order; one that follows slot A not.
    pairs = [(0.8, 0.2), (0.7, 0.4), (0.8, 0.8), (0.6, 0.7), (0.5, 0.5)]
    found = gate.order_consistency(comparisons(pairs))
    judgements = [
        labeling.Judgement(f"pair{k}", "p", order, math.log(pa), math.log(1 - pa))
        for k, pair in enumerate(pairs)
        for order, pa in zip(("ab", "ba"), pair, strict=True)
    ]
    assert found == 0.6 == pytest.approx(labeling.position_bias(judgements)["order_consistency"])
    assert gate.order_consistency(comparisons([])) is None


def test_labels_at_one_half_fire_the_gate_and_confident_ones_pass():
    coin = gate.label_signal(0.5, [0.0] * 10, CFG)
    assert coin["confident_share"] == 0.0 and len(coin["reasons"]) == 2
    assert coin["reasons"][0] == "order consistency 0.5 is below gate.min_order_consistency 0.6 (0.5 is a coin)"
    assert coin["reasons"][1] == (
        "0 of 10 AI labels have confidence >= 0.2 (a share of 0, below gate.min_confident_share 0.25)"
    )
    few = gate.label_signal(0.9, [0.5, 0.0, 0.1, 0.0, 0.0], CFG)["reasons"]
    assert few == ["1 of 5 AI labels have confidence >= 0.2 (a share of 0.2, below gate.min_confident_share 0.25)"]
    clear = gate.label_signal(0.9, [0.6, 0.8, 0.1, 0.9], CFG)
    assert clear["confident_share"] == 0.75 and clear["reasons"] == [] and clear["ai_pairs"] == 4
    assert len(gate.label_signal(None, [], CFG)["reasons"]) == 2, "no evidence is no signal"


def test_pm_accuracy_interval_must_lie_above_one_half():
    assert gate.pm_signal({"accuracy": 0.9, "accuracy_ci95": [0.7, 0.97], "accuracy_pairs": 20}) == []
    assert (
        "which reaches 0.5" in gate.pm_signal({"accuracy": 0.6, "accuracy_ci95": [0.3, 0.8], "accuracy_pairs": 5})[0]
    )
    assert "no held-out accuracy" in gate.pm_signal({"accuracy_ci95": None, "accuracy_pairs": 0})[0]


def test_decide_follows_on_noise():
    assert gate.decide([], CFG, "rlaif")["verdict"] == "trained"
    assert gate.decide(["x"], CFG, "rlaif") == {"verdict": "kept_sft", "reasons": ["x"], "on_noise": "keep_sft"}
    warn = gate.GateConfig("warn", 0.6, 0.2, 0.25)
    assert gate.decide(["x"], warn, "rlaif")["verdict"] == "trained_without_signal"
    with pytest.raises(ValueError, match=r"rlaif: the AI labels carry no signal \(x\), and gate.on_noise is 'fail': "):
        gate.decide(["x"], gate.GateConfig("fail", 0.6, 0.2, 0.25), "rlaif")
    with pytest.raises(ValueError, match="gate.confident must be in"):
        gate.GateConfig("fail", 0.6, 1.2, 0.25)
