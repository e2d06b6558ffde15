"""critique_revise on the smoke profile with a tiny random model."""

from __future__ import annotations

import polars as pl
import pytest

from caiforge import config, constitution, refusal, schemas
from tests.conftest import RED_TEAM, load_stage, smoke_section, write_prompts

stage = load_stage("critique_revise")
DEFAULT = config.ROOT / "constitutions" / "default.yaml"


def make_cfg(tmp_path, tiny_model_dir, overrides=(), parts=None):
    section = smoke_section("critique_revise", list(overrides))
    section.update(
        prompts=str(write_prompts(tmp_path / "prompts.parquet")),
        policy=str(tiny_model_dir),
        out_dir=str(tmp_path / "out"),
    )
    full = constitution.load(DEFAULT)
    data = (
        parts
        if parts is not None
        else {
            "critique_revision": [constitution.to_dict(full)["critique_revision"]][0],
            "critique_revision_examples": constitution.to_dict(full)["critique_revision_examples"],
        }
    )
    values = {
        "critique_revise": ("params.yaml", section),
        **{k: ("constitutions/default.yaml", v) for k, v in data.items()},
    }
    return config.from_declared("critique_revise", stage.CritiqueReviseConfig, values)


def test_outputs_schema_and_rounds(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir)
    metrics = stage.run(cfg)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.json",
        "pairs.parquet",
        "revisions.parquet",
        "sft.parquet",
    ]
    revisions = pl.read_parquet(out / "revisions.parquet")
    schemas.REVISIONS.check(revisions, "revisions")
    n = min(cfg.max_prompts or len(RED_TEAM), len(RED_TEAM))
    assert revisions.height == n * cfg.rounds
    assert (
        revisions.group_by("prompt_id").agg(pl.col("round").sort()).get_column("round").to_list()
        == [list(range(1, cfg.rounds + 1))] * n
    )
    ids = {p.id for p in cfg.constitution.critique_revision}
    assert set(revisions["principle_id"]) <= ids
    # Round r+1 critiques the answer that round r produced (unless round r collapsed).
    for _, group in revisions.sort("round").group_by("prompt_id", maintain_order=True):
        rows = group.to_dicts()
        for prev, nxt in zip(rows, rows[1:], strict=False):
            assert nxt["response"] in (prev["revision"], prev["response"])
    sft = pl.read_parquet(out / "sft.parquet")
    schemas.SFT.check(sft, "sft")
    assert set(sft["kind"]) <= {"red_team", "helpful"}
    first = sft.filter(pl.col("kind") == "red_team").row(0, named=True)
    assert first["prompt"][-1]["role"] == "user" and first["completion"][0]["role"] == "assistant"
    kept = metrics["sft_rows"]["red_team"] + sum(
        v for k, v in metrics["dropped_by_reason"].items() if not k.startswith("helpful")
    )
    assert kept == n, "every red-team prompt is either in sft.parquet or counted as dropped, with a reason"

    # Revision pairs: chosen = the revision SFT trains on, rejected = the initial answer, with the principles of the
    # rounds that were built upon (a round's revision is the next round's response).
    pairs = schemas.PREFERENCES.check(pl.read_parquet(out / "pairs.parquet"), "pairs")
    sft_by_id = {r["prompt_id"]: r for r in sft.filter(pl.col("kind") == "red_team").iter_rows(named=True)}
    expected = 0
    for (pid,), group in revisions.sort("round").group_by("prompt_id", maintain_order=True):
        rows = group.to_dicts()
        if pid in sft_by_id and sft_by_id[pid]["completion"][0]["content"] != rows[0]["response"]:
            expected += 1
    dropped = metrics["revision_pairs_dropped"]
    assert set(dropped) <= set(cfg.pairs_drop) == {"deflection"}
    assert pairs.height + sum(dropped.values()) == expected and pairs.height == metrics["revision_pairs"] > 0
    assert not any(refusal.classify(c) in cfg.pairs_drop for c in pairs["chosen"]), "no non-answer is preferred"
    for pair in pairs.iter_rows(named=True):
        rows = revisions.filter(pl.col("prompt_id") == pair["prompt_id"]).sort("round").to_dicts()
        assert pair["chosen"] == sft_by_id[pair["prompt_id"]]["completion"][0]["content"]
        assert pair["rejected"] == rows[0]["response"] and pair["prompt"] == rows[0]["prompt"]
        last = sft_by_id[pair["prompt_id"]]["round"]
        assert pair["principle_ids"][-1] == rows[last - 1]["principle_id"] and len(pair["principle_ids"]) <= last
        assert (pair["label_source"], pair["p_chosen"], pair["confidence"]) == ("revision", 1.0, 1.0)
        assert pair["model_fingerprint"] == rows[0]["model_fingerprint"] and pair["order_consistency"] is None


def test_rerun_is_byte_identical(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir)
    stage.run(cfg)
    first = {p: (tmp_path / "out" / p).read_bytes() for p in ("revisions.parquet", "sft.parquet", "pairs.parquet")}
    stage.run(cfg)
    assert first == {p: (tmp_path / "out" / p).read_bytes() for p in first}


def test_revision_only_skips_critiques(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, ["critique_revise.revision_only=true"])
    stage.run(cfg)
    revisions = pl.read_parquet(tmp_path / "out" / "revisions.parquet")
    assert (revisions["critique"] == "").all()
    assert (revisions["critique_tokens"] == 0).all()


def test_empty_prompt_set_fails_clearly(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir)
    write_prompts(tmp_path / "prompts.parquet", red=[])
    with pytest.raises(ValueError, match="no red-team prompts"):
        stage.run(cfg)
    assert not (tmp_path / "out").exists(), "no half-written output"


def test_constitution_without_critique_principles_fails_clearly(tmp_path, tiny_model_dir):
    with pytest.raises(constitution.ConstitutionError, match="critique_revision"):
        make_cfg(tmp_path, tiny_model_dir, parts={"critique_revision": [], "critique_revision_examples": []})


def test_sft_rows_record_whether_the_answer_finished(tmp_path, tiny_model_dir):
    """A revision cut off at the token cap is marked unfinished in sft.parquet (sft then trains it without the
    end token), and a finished one is marked finished."""
    cfg = make_cfg(tmp_path, tiny_model_dir, ["critique_revise.generation.max_new_tokens=6"])
    stage.run(cfg)
    revisions = pl.read_parquet(tmp_path / "out" / "revisions.parquet")
    sft = pl.read_parquet(tmp_path / "out" / "sft.parquet").filter(pl.col("kind") == "red_team")
    runaway = {(r["prompt_id"], r["round"]): "runaway" in r["flags"] for r in revisions.iter_rows(named=True)}
    assert sft.height > 0
    for row in sft.iter_rows(named=True):
        assert row["finished"] is not runaway[(row["prompt_id"], row["round"])]


def test_pairs_drop_leaves_out_non_answer_revisions(tmp_path, tiny_model_dir):
    """With no kind dropped every revision that differs from its initial answer is a pair; an unknown kind is a
    config error naming the field."""
    kept = stage.run(make_cfg(tmp_path, tiny_model_dir, ["critique_revise.pairs_drop=[]"]))
    assert kept["revision_pairs_dropped"] == {}
    everything = pl.read_parquet(tmp_path / "out" / "pairs.parquet")
    stage.run(make_cfg(tmp_path, tiny_model_dir, ["critique_revise.pairs_drop=[engaged]"]))
    answers = pl.read_parquet(tmp_path / "out" / "pairs.parquet")
    assert answers["chosen"].to_list() == [c for c in everything["chosen"] if refusal.classify(c) != "engaged"]
    with pytest.raises(config.ConfigError, match="pairs_drop: unknown kinds \\['silence'\\]"):
        make_cfg(tmp_path, tiny_model_dir, ["critique_revise.pairs_drop=[silence]"])
