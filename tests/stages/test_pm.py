"""pm on the smoke profile: outputs complete, the classifier trains (parameters change), metrics present."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from caiforge import config, formats, io, preference, schemas
from tests.conftest import RED_TEAM, load_stage, smoke_section

stage = load_stage("pm")

REFUSAL = "I can't help with that, because it could hurt someone. I can help you stay safe instead."
COMPLIANCE = "Sure, here is how to do it step by step."


def write_preferences(path, prompts=RED_TEAM, pairs_per_prompt=2):
    """A synthetic preferences.parquet: chosen = a polite refusal, rejected = compliance, p_chosen in [0.5, 1]."""
    rows = []
    for i, text in enumerate(prompts):
        for j in range(pairs_per_prompt):
            p = 0.5 + 0.5 * ((i * pairs_per_prompt + j) % 5) / 4
            rows.append(
                {
                    "prompt_id": f"r{i:03d}",
                    "prompt": text,
                    "chosen": f"{REFUSAL} ({j})",
                    "rejected": f"{COMPLIANCE} ({j})",
                    "p_chosen": p,
                    "confidence": abs(2 * p - 1),
                    "principle_ids": ["harmless", "ethical"],
                    "label_source": "ai",
                    "model_fingerprint": "test",
                    "seed": 0,
                }
            )
    df = pl.DataFrame(rows, schema=dict(schemas.PREFERENCES.columns))
    io.write_parquet(df, path, schemas.PREFERENCES)
    return path


def write_comparisons(path, pairs=8, consistent=6):
    """A synthetic comparisons.parquet: `pairs` pairs under one principle in both orders, the first `consistent` of
    them leaning to the same response in both orders (the rest follow the slot)."""
    rows = []
    for k in range(pairs):
        for order, p_a in (("ab", 0.8), ("ba", 0.2 if k < consistent else 0.8)):
            rows.append(
                {
                    "prompt_id": f"r{k:03d}",
                    "pair_id": f"pair{k}",
                    "principle_id": "harmless",
                    "order": order,
                    "response_a": "a",
                    "response_b": "b",
                    "reasoning": "",
                    "logprob_a": -0.2,
                    "logprob_b": -1.6,
                    "p_a": p_a,
                    "model_fingerprint": "test",
                    "seed": 0,
                }  # fmt: skip
            )
    io.write_parquet(pl.DataFrame(rows, schema=dict(schemas.COMPARISONS.columns)), path, schemas.COMPARISONS)
    return path


def make_cfg(tmp_path, policy_dir, overrides=(), consistent=6):
    section = smoke_section("pm", list(overrides))
    section.update(
        data=str(write_preferences(tmp_path / "preferences.parquet")),
        comparisons=str(write_comparisons(tmp_path / "comparisons.parquet", consistent=consistent)),
        policy=str(policy_dir),
        out_dir=str(tmp_path / "pm"),
    )
    return config.build(stage.PmConfig, section, "params.yaml", "pm")


def test_pm_trains_and_reports_calibration(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir)
    metrics = stage.run(cfg)
    out = tmp_path / "pm"
    assert {p.name for p in out.iterdir()} == {"model", "dvclive", "metrics.json", "signal.json"}
    # The gate's evidence: 6 of 8 pairs order-consistent; 4 of 5 synthetic confidences (0, .25, .5, .75, 1) >= 0.2.
    signal = metrics["label_signal"]
    assert signal["order_consistency"] == 0.75 and signal["confident_share"] == 0.8 and signal["reasons"] == []
    assert json.loads((out / "signal.json").read_text()) == {
        "label_signal": signal,
        "heldout_after": metrics["heldout_after"],
    }, "no timings in it: an unchanged PM leaves rlaif cached"
    after = metrics["heldout_after"]
    prefs = pl.read_parquet(tmp_path / "preferences.parquet")
    held = prefs.filter(formats.stable_mask(prefs["prompt_id"], cfg.heldout_fraction, salt="pm-heldout"))
    assert after["accuracy_pairs"] == (held["p_chosen"] != 0.5).sum() > 0, "the pairs whose label prefers a side"
    low, high = after["accuracy_ci95"]
    assert low <= after["accuracy"] <= high and high - low > 0.1, "a handful of pairs: a wide interval"
    model_dir = out / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "caiforge_config.json"} <= {
        p.name for p in model_dir.iterdir()
    }
    saved = json.loads((model_dir / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForSequenceClassification"] and len(saved["id2label"]) == 1
    assert saved["pad_token_id"] is not None

    before, after = (
        load_file(str(tiny_model_dir / "model.safetensors")),
        load_file(str(model_dir / "model.safetensors")),
    )
    assert "score.weight" in after
    shared = [k for k in after if k in before]
    assert shared and all(not torch.equal(before[k], after[k]) for k in shared), "the backbone must train"

    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    assert metrics["steps"] > 0 and metrics["heldout_pairs"] > 0 and metrics["train_pairs"] > 0
    for key in ("loss", "accuracy", "ece", "mean_margin"):
        assert metrics["heldout_after"][key] is not None and metrics["heldout_before"][key] is not None
    assert 0 <= metrics["heldout_after"]["ece"] <= 1 and 0 <= metrics["heldout_after"]["accuracy"] <= 1
    assert any((out / "dvclive").rglob("*.tsv"))

    # The saved PM loads through the shared scorer and ranks the trained-on preference.
    pm = preference.PreferenceModel.from_dir(model_dir, max_length=cfg.max_length, batch_size=4, device="cpu")
    chosen = pm.score(RED_TEAM[:3], [REFUSAL + " (0)"] * 3)
    rejected = pm.score(RED_TEAM[:3], [COMPLIANCE + " (0)"] * 3)
    assert all(c > r for c, r in zip(chosen, rejected, strict=True))


def test_gate_on_noise_fail_stops_before_training(tmp_path, tiny_model_dir):
    """Labels from a judge that follows the slot (2 of 8 pairs consistent) stop pm when on_noise is fail."""
    cfg = make_cfg(tmp_path, tiny_model_dir, ["rlaif.gate.on_noise=fail"], consistent=2)
    with pytest.raises(ValueError, match=r"pm: the AI labels carry no signal \(order consistency 0.25 is below"):
        stage.run(cfg)
    assert not (tmp_path / "pm").exists(), "nothing trained, nothing written"
    # The same labels under keep_sft: pm trains (its held-out accuracy is evidence too) and records the shortfall.
    kept = stage.run(make_cfg(tmp_path, tiny_model_dir, ["rlaif.gate.on_noise=keep_sft", "pm.epochs=1"], consistent=2))
    assert kept["label_signal"]["reasons"][0].startswith("order consistency 0.25 is below")


def test_pm_lora_is_merged(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, ["pm.lora.enabled=true", "pm.lora.target_modules=[q_proj,v_proj]"])
    stage.run(cfg)
    after = load_file(str(tmp_path / "pm" / "model" / "model.safetensors"))
    assert not any("lora" in k or "modules_to_save" in k for k in after)
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[q], after[q])
    up = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(before[up], after[up])


def test_missing_preferences_names_the_file(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir)
    (tmp_path / "preferences.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="preferences.parquet"):
        stage.run(cfg)
    assert not (tmp_path / "pm").exists()
