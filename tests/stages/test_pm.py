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


def write_preferences(path, prompts=RED_TEAM, pairs_per_prompt=2, consistency=0.75, source="ai"):
    """A synthetic preferences.parquet: chosen = a polite refusal, rejected = compliance, p_chosen in [0.5, 1], each
    pair judged the same way in both orders under `consistency` of its principles, all from `source`."""
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
                    "label_source": source,
                    "order_consistency": consistency if source == "ai" else None,
                    "model_fingerprint": "test",
                    "seed": 0,
                }
            )
    df = pl.DataFrame(rows, schema=dict(schemas.PREFERENCES.columns))
    io.write_parquet(df, path, schemas.PREFERENCES)
    return path


def make_cfg(tmp_path, policy_dir, overrides=(), consistency=0.75, rows=None):
    section = smoke_section("pm", list(overrides))
    data = str(rows or write_preferences(tmp_path / "preferences.parquet", consistency=consistency))
    section.update(
        files=dict.fromkeys(("ai", "revisions", "both"), data),
        data=data,
        policy=str(policy_dir),
        out_dir=str(tmp_path / "pm"),
    )
    return config.build(stage.PmConfig, section, "params.yaml", "pm")


def test_pm_trains_and_reports_calibration(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir)
    metrics = stage.run(cfg)
    out = tmp_path / "pm"
    assert {p.name for p in out.iterdir()} == {"model", "dvclive", "metrics.json", "signal.json"}
    # The gate's evidence: 3 of 4 principles order-consistent; 4 of 5 synthetic confidences (0, .25, .5, .75, 1) >=
    # 0.2 (pairs cycle through them).
    signal = metrics["label_signal"]
    assert signal["order_consistency"] == 0.75 and signal["reasons"] == [] and signal["applies"]
    assert signal["confident_share"] == pytest.approx(0.8, abs=0.1)
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
    """Labels from a judge that follows the slot (a quarter of verdicts consistent) stop pm when on_noise is fail."""
    cfg = make_cfg(tmp_path, tiny_model_dir, ["rlaif.gate.on_noise=fail"], consistency=0.25)
    with pytest.raises(ValueError, match=r"pm: the AI labels carry no signal \(order consistency 0.25 is below"):
        stage.run(cfg)
    assert not (tmp_path / "pm").exists(), "nothing trained, nothing written"
    # The same labels under keep_sft: pm trains (its held-out accuracy is evidence too) and records the shortfall.
    kept = stage.run(
        make_cfg(tmp_path, tiny_model_dir, ["rlaif.gate.on_noise=keep_sft", "pm.epochs=1"], consistency=0.25)
    )
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


def test_revision_source_trains_on_revision_pairs_alone_and_skips_the_label_checks(tmp_path, tiny_model_dir):
    """A file with slot-following AI labels and revision pairs: source revisions trains on the revision pairs only,
    and the AI labels' missing signal does not stop it (they are not used)."""
    ai = pl.read_parquet(write_preferences(tmp_path / "ai.parquet", consistency=0.25))
    revision = pl.read_parquet(write_preferences(tmp_path / "rev.parquet", source="revision", pairs_per_prompt=1))
    both = tmp_path / "both.parquet"
    io.write_parquet(pl.concat([ai, revision]), both, schemas.PREFERENCES)
    cfg = make_cfg(tmp_path, tiny_model_dir, ["preference_source=revisions", "rlaif.gate.on_noise=fail"], rows=both)
    metrics = stage.run(cfg)
    assert metrics["preference_source"] == "revisions" and metrics["pairs_by_source"] == {"revision": revision.height}
    assert metrics["train_pairs"] + metrics["heldout_pairs"] == revision.height
    assert metrics["label_signal"] == {
        "order_consistency": None, "confident_share": None, "ai_pairs": 0, "reasons": [], "applies": False
    }  # fmt: skip
    # The same file under `both`: the AI labels are used, so their shortfall stops pm (on_noise: fail).
    with pytest.raises(ValueError, match="order consistency 0.25 is below"):
        stage.run(
            make_cfg(tmp_path, tiny_model_dir, ["preference_source=both", "rlaif.gate.on_noise=fail"], rows=both)
        )
