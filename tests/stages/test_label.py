"""label on the smoke profile with a tiny random model as both the SFT model and the feedback model."""

from __future__ import annotations

import json

import polars as pl
import pytest

from caiforge import config, constitution, human_labels, intervals, labeling, schemas
from tests.conftest import load_stage, smoke_section, write_prompts, write_revision_pairs
from tests.unit.test_labeling import FakeScorer

stage = load_stage("label")
DEFAULT = config.ROOT / "constitutions" / "default.yaml"
OUTPUTS = ["comparisons.parquet", "metrics.json", "preferences.parquet", "review_queue.parquet"]
PARQUETS = {"comparisons.parquet": schemas.COMPARISONS, "preferences.parquet": schemas.PREFERENCES}
PARQUETS["review_queue.parquet"] = schemas.REVIEW_QUEUE


def by_pair(df: pl.DataFrame) -> dict:
    return {labeling.pair_key(r["prompt_id"], r["chosen"], r["rejected"]): r for r in df.iter_rows(named=True)}


def make_cfg(tmp_path, tiny_model_dir, overrides=(), revision_pairs=None):
    section = smoke_section("label", list(overrides))
    section.update(
        prompts=str(write_prompts(tmp_path / "prompts.parquet")),
        revision_pairs=str(revision_pairs or write_revision_pairs(tmp_path / "pairs.parquet")),
        policy=str(tiny_model_dir),
        feedback=str(tiny_model_dir),
        out_dir=str(tmp_path / "out"),
    )
    full = constitution.to_dict(constitution.load(DEFAULT))
    parts = {k: ("constitutions/default.yaml", full[k]) for k in ("comparison", "comparison_examples")}
    return config.from_declared("label", stage.LabelConfig, {"label": ("params.yaml", section), **parts})


def read(tmp_path, name):
    return pl.read_parquet(tmp_path / "out" / name)


def test_outputs_schemas_both_orders_and_byte_identical_rerun(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir)
    metrics = stage.run(cfg)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == OUTPUTS
    for name, schema in PARQUETS.items():
        schema.check(read(tmp_path, name), name)
    comparisons, prefs = read(tmp_path, "comparisons.parquet"), read(tmp_path, "preferences.parquet")
    assert prefs.height == metrics["pairs"] > 0
    assert comparisons.height == prefs.height * cfg.principles_per_pair * 2
    assert comparisons.group_by("pair_id", "principle_id").agg(pl.col("order").sort())["order"].to_list() == [
        ["ab", "ba"]
    ] * (prefs.height * cfg.principles_per_pair)
    assert ((comparisons["p_a"] > 0) & (comparisons["p_a"] < 1)).all()
    assert ((prefs["p_chosen"] >= 0.5) & (prefs["p_chosen"] < 1)).all()
    assert (prefs["chosen"] != prefs["rejected"]).all()
    assert (prefs["label_source"] == "ai").all()
    assert prefs["principle_ids"].list.len().to_list() == [cfg.principles_per_pair] * prefs.height
    assert set(comparisons["principle_id"]) <= {p.id for p in cfg.constitution.comparison}
    assert prefs["confidence"].to_list() == pytest.approx([2 * p - 1 for p in prefs["p_chosen"]])
    # Each pair's share of order-consistent principles; their mean is the run's order consistency.
    assert (
        prefs["order_consistency"]
        .is_in([k / cfg.principles_per_pair for k in range(cfg.principles_per_pair + 1)])
        .all()
    )
    assert prefs["order_consistency"].mean() == pytest.approx(metrics["position_bias"]["order_consistency"], abs=1e-4)
    assert metrics["prompts"] == cfg.max_prompts
    assert metrics["pairs"] + metrics["identical_pairs_skipped"] == cfg.max_prompts
    assert metrics["review_queue"]["size"] == read(tmp_path, "review_queue.parquet").height
    assert set(metrics["position_bias"]) >= {"measured", "before_swap", "after_swap"}
    assert metrics["tokens"]["scoring"]["prompt_tokens"] > 0 and metrics["labels_per_second"] > 0

    first = {p: (tmp_path / "out" / p).read_bytes() for p in PARQUETS}
    stage.run(cfg)
    assert first == {p: (tmp_path / "out" / p).read_bytes() for p in PARQUETS}


def test_human_verdicts_override_ties_keep_the_ai_label_and_the_queue_stays(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, ["label.review.min_confidence=1.0"])
    stage.run(cfg)
    ai_prefs = read(tmp_path, "preferences.parquet")
    queued = read(tmp_path, "review_queue.parquet")
    assert queued.height == ai_prefs.height >= 3, "min_confidence 1.0 queues every pair"
    ai = by_pair(ai_prefs)
    assert {k: (r["chosen"], r["p_chosen"]) for k, r in by_pair(queued).items()} == {
        k: (r["chosen"], r["p_chosen"]) for k, r in ai.items()
    }
    for ids, ps, p in queued.select("principle_ids", "principle_p_chosen", "p_chosen").iter_rows():
        assert len(ps) == len(ids) == cfg.principles_per_pair
        assert sum(ps) / len(ps) == pytest.approx(p), "the ensemble is the mean of the principles' verdicts"
    first, second, third = (ai_prefs.row(i, named=True) for i in range(3))
    # The human disagrees with the AI on the first pair, agrees on the second and calls the third a tie.
    human = tmp_path / "human.jsonl"
    rows = [
        {"prompt_id": first["prompt_id"], "chosen": first["rejected"], "rejected": first["chosen"], "note": "x"},
        {"prompt_id": second["prompt_id"], "chosen": second["chosen"], "rejected": second["rejected"]},
        {"prompt_id": third["prompt_id"], "chosen": third["chosen"], "rejected": third["rejected"], "verdict": "tie"},
    ]
    human.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = stage.run(
        make_cfg(tmp_path, tiny_model_dir, ["label.review.min_confidence=1.0", f"label.human_labels={human}"])
    )
    prefs = by_pair(read(tmp_path, "preferences.parquet"))
    keys = [labeling.pair_key(r["prompt_id"], r["chosen"], r["rejected"]) for r in (first, second, third)]
    assert prefs[keys[0]] == first | {
        "chosen": first["rejected"],
        "rejected": first["chosen"],
        "p_chosen": 1.0,
        "confidence": 1.0,
        "label_source": "human",
    }
    assert prefs[keys[1]]["label_source"] == "human" and prefs[keys[2]] == third, "a tie keeps the AI label"
    assert sum(r["label_source"] == "human" for r in prefs.values()) == 2
    assert read(tmp_path, "review_queue.parquet").equals(queued), "the queue keeps decided pairs, with the AI label"
    assert metrics["human_labels"] == {"rows": 3, "applied": 2, "tie": 1, "skip": 0, "unmatched": 0}
    assert metrics["human_agreement"] == {"pairs": 2, "rate": 0.5, "interval": intervals.wilson([True, False])}

    # A label for a pair this run did not make (resampled responses, a removed prompt) is an error, not a warning.
    written = {p: (tmp_path / "out" / p).read_bytes() for p in PARQUETS}
    human.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "prompt_id": "gone"}) + "\n")
    with pytest.raises(human_labels.HumanLabelsError, match=r"human.jsonl: 1 human label\(s\) match no pair.*'gone'"):
        stage.run(
            make_cfg(tmp_path, tiny_model_dir, ["label.review.min_confidence=1.0", f"label.human_labels={human}"])
        )
    assert written == {p: (tmp_path / "out" / p).read_bytes() for p in PARQUETS}, "nothing rewritten"


def test_missing_or_bad_human_labels_fail_before_writing(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, [f"label.human_labels={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        stage.run(cfg)
    assert not (tmp_path / "out").exists(), "no output written"
    (tmp_path / "bad.csv").write_text("prompt_id,chosen\nr000,x\n")
    cfg = make_cfg(tmp_path, tiny_model_dir, [f"label.human_labels={tmp_path / 'bad.csv'}"])
    with pytest.raises(human_labels.HumanLabelsError, match=r"bad.csv: row 1: missing field 'rejected'"):
        stage.run(cfg)
    assert not (tmp_path / "out").exists()


def test_chain_of_thought_clamps_to_the_band(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, ["label.chain_of_thought=true", "label.cot_band=[0.45,0.55]"])
    metrics = stage.run(cfg)
    prefs, comparisons = read(tmp_path, "preferences.parquet"), read(tmp_path, "comparisons.parquet")
    assert ((prefs["p_chosen"] >= 0.5) & (prefs["p_chosen"] <= 0.55 + 1e-12)).all()
    assert (comparisons["reasoning"].str.len_chars() > 0).any()
    assert metrics["tokens"]["reasoning"]["completion_tokens"] > 0


def test_first_slot_labeller_is_debiased_and_reported(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir)
    metrics = stage.run(cfg, scorer=FakeScorer(lambda a, b: (0.9, 0.1)))
    assert read(tmp_path, "preferences.parquet")["p_chosen"].to_list() == pytest.approx([0.5] * metrics["pairs"])
    assert metrics["position_bias"]["measured"] == pytest.approx(0.4)
    assert metrics["position_bias"]["after_swap"] == pytest.approx(0.0)
    assert metrics["review_queue"]["low_confidence"] == metrics["pairs"]


def test_bad_params_fail_clearly(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        make_cfg(tmp_path, tiny_model_dir, ["label.generation.temperature=0.0"])
    with pytest.raises(ValueError, match="samples_per_prompt"):
        make_cfg(tmp_path, tiny_model_dir, ["label.samples_per_prompt=1"])
    with pytest.raises(ValueError, match="principles_per_pair=99"):
        make_cfg(tmp_path, tiny_model_dir, ["label.principles_per_pair=99"])


def test_pairs_are_judged_only_under_principles_of_their_prompts_kind(tmp_path, tiny_model_dir):
    """Red-team pairs never under helpfulness principles (they would reward complying), helpful pairs never under
    harmlessness ones; a mapping that leaves too few principles fails before anything runs."""
    cfg = make_cfg(tmp_path, tiny_model_dir, ["label.max_prompts=12", "label.principles_per_pair=2"])
    stage.run(cfg, scorer=FakeScorer(lambda a, b: (0.6, 0.4)))
    comparisons = read(tmp_path, "comparisons.parquet")
    category = {p.id: p.category for p in cfg.constitution.comparison}
    for kind, allowed in (("r", {"harmlessness", "ethics", "honesty"}), ("h", {"helpfulness", "honesty"})):
        mine = comparisons.filter(pl.col("prompt_id").str.starts_with(kind))
        assert mine.height > 0
        assert {category[p] for p in mine["principle_id"]} <= allowed
    with pytest.raises(config.ConfigError, match="principle_categories.helpful: unknown categories"):
        make_cfg(tmp_path, tiny_model_dir, ["label.principle_categories.helpful=[kindness]"])
    with pytest.raises(config.ConfigError, match="only 4 comparison principles in \\['helpfulness'\\] for helpful"):
        make_cfg(
            tmp_path,
            tiny_model_dir,
            ["label.principle_categories.helpful=[helpfulness]", "label.principles_per_pair=5"],
        )


def test_revision_pairs_are_appended_unchanged(tmp_path, tiny_model_dir):
    """critique_revise's revision pairs ride along in preferences.parquet (the `both` source is one file); the AI
    labels' metrics ignore them."""
    row = {
        "prompt_id": "r000", "prompt": "p", "chosen": "a revision", "rejected": "the initial answer",
        "p_chosen": 1.0, "confidence": 1.0, "principle_ids": ["harm", "kind"], "label_source": "revision",
        "order_consistency": None, "model_fingerprint": "policy", "seed": 0,
    }  # fmt: skip
    cfg = make_cfg(tmp_path, tiny_model_dir, revision_pairs=write_revision_pairs(tmp_path / "rev.parquet", [row]))
    metrics = stage.run(cfg)
    prefs = read(tmp_path, "preferences.parquet")
    assert prefs.filter(pl.col("label_source") == "revision").to_dicts() == [row]
    assert metrics["revision_pairs_appended"] == 1 and metrics["label_source"] == {"ai": metrics["pairs"]}
    assert sum(metrics["label_distribution"].values()) == metrics["pairs"]
