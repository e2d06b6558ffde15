"""The signal gate: order consistency read back from preferences, label signal floors, and the verdict."""

from __future__ import annotations

import math

import polars as pl
import pytest

from caiforge import gate, labeling

CFG = gate.GateConfig(on_noise="keep_sft", min_order_consistency=0.6, confident=0.2, min_confident_share=0.25)


def test_order_consistency_per_pair_matches_labels_own_measure():
    # (P(A) in ab, P(A) in ba) per principle: a judge that sees the answers flips P(A) with the order; one that
    # follows slot A does not. Pair 0 has two principles (one consistent), pair 1 three (two
    # consistent), pair 2 two (both consistent, one at (0.5, 0.5)).
    verdicts = {
        "pair0": [(0.8, 0.2), (0.7, 0.6)],
        "pair1": [(0.8, 0.8), (0.6, 0.3), (0.2, 0.9)],
        "pair2": [(0.5, 0.5), (0.8, 0.3)],
    }
    judgements = [
        labeling.Judgement(pair, f"p{i}", order, math.log(pa), math.log(1 - pa))
        for pair, questions in verdicts.items()
        for i, q in enumerate(questions)
        for order, pa in zip(("ab", "ba"), q, strict=True)
    ]
    per_pair = labeling.pair_order_consistency(judgements)
    assert per_pair == {"pair0": 0.5, "pair1": pytest.approx(2 / 3), "pair2": 1.0}
    # With equal principles per pair the mean of the per-pair shares is label's own measure; the gate reads that
    # mean back from a preferences file, ignoring rows no AI judged.
    equal = [j for j in judgements if j.pair_id != "pair1" or j.principle_id != "p2"]
    per_pair = labeling.pair_order_consistency(equal)
    rows = pl.DataFrame({"order_consistency": [*per_pair.values(), None]}, schema={"order_consistency": pl.Float64})
    assert gate.order_consistency(rows) == pytest.approx(labeling.position_bias(equal)["order_consistency"], abs=1e-4)
    assert gate.order_consistency(rows.head(0)) is None


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
