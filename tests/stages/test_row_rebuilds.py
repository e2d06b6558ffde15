"""Row-level rebuilds: after one principle edit a stage sends only the requests that changed, and writes the bytes
a build from an empty cache writes (requests are counted as the engines ran them: `rows` in the stats)."""

from __future__ import annotations

import json

import polars as pl
import pytest

from caiforge import config, constitution, planmode
from tests.conftest import load_stage, smoke_section, write_prompts, write_revision_pairs

DEFAULT = config.ROOT / "constitutions" / "default.yaml"
critique_revise = load_stage("critique_revise")
label = load_stage("label")


def parts(edit: dict[str, str] | None = None, key: str = "critique_revision", field: str = "critique") -> dict:
    """The constitution as a dict, with principle `edit["id"]`'s `field` replaced by `edit["text"]`."""
    full = constitution.to_dict(constitution.load(DEFAULT))
    if edit:
        for p in full[key]:
            if p["id"] == edit["id"]:
                p[field] = edit["text"]
    return full


def cr_cfg(tmp_path, model_dir, out: str, cache: str | None, const: dict):
    # exact batching: the bytes promise is exact's (under dynamic a row regenerated beside other rows than in a fresh
    # build equals it up to floating point, and a sampled token may differ: seen on an AVX-512 machine).
    overrides = ["critique_revise.rounds=3", "critique_revise.generation.batching=exact"]
    section = smoke_section("critique_revise", overrides)
    section.update(
        prompts=str(write_prompts(tmp_path / "prompts.parquet")),
        policy=str(model_dir),
        out_dir=str(tmp_path / out),
        row_cache={"dir": str(tmp_path / cache) if cache else None, "keep_builds": 0},
    )
    values = {"critique_revise": ("params.yaml", section)}
    values |= {
        k: ("constitutions/default.yaml", const[k]) for k in ("critique_revision", "critique_revision_examples")
    }
    return config.from_declared("critique_revise", critique_revise.CritiqueReviseConfig, values)


def planned(run, cfg, tmp_path, monkeypatch) -> dict[str, int]:
    """The stage run in `caiforge plan`'s mode: its counts of cached / send / depends requests."""
    ctx, report = tmp_path / "plan.json", tmp_path / "report.json"
    ctx.write_text(json.dumps({"report": str(report), "pending": []}))
    with monkeypatch.context() as m:
        m.setenv(planmode.ENV, str(ctx))
        with pytest.raises(planmode.Done):
            run(cfg)
    return json.loads(report.read_text())


def test_critique_edit_regenerates_only_the_rounds_that_drew_it(tmp_path, tiny_model_dir, monkeypatch):
    full = critique_revise.run(cr_cfg(tmp_path, tiny_model_dir, "a", "cache", parts()))
    before = pl.read_parquet(tmp_path / "a" / "revisions.parquet")
    edited_id = before["principle_id"].mode().sort()[0]
    edited = parts({"id": edited_id, "text": "Say exactly what in the response could hurt someone, and why."})

    cache_files = {p: p.read_bytes() for p in (tmp_path / "cache").iterdir()}
    plan = planned(critique_revise.run, cr_cfg(tmp_path, tiny_model_dir, "p", "cache", edited), tmp_path, monkeypatch)
    assert not (tmp_path / "p").exists() and {p: p.read_bytes() for p in (tmp_path / "cache").iterdir()} == cache_files
    again = critique_revise.run(cr_cfg(tmp_path, tiny_model_dir, "b", "cache", edited))
    # Known keys are exact; requests built on a new critique or revision are an upper bound (a collapsed new
    # revision is not built upon, so the next round may find its old prompt in the cache).
    sent = again["generation"]["rows"]
    assert plan["send"] > 0 and plan["depends"] > 0
    assert plan["send"] <= sent <= plan["send"] + plan["depends"]
    assert again["generation"]["cache_hits"] >= plan["cached"]
    after = pl.read_parquet(tmp_path / "b" / "revisions.parquet")
    # What changed, request by request: a critique when its principle is the edited one or its input answer
    # changed; a revision when its critique request changed or the critique it reads did.
    old = {(r["prompt_id"], r["round"]): r for r in before.iter_rows(named=True)}
    changed = 0
    for r in after.iter_rows(named=True):
        o = old[(r["prompt_id"], r["round"])]
        critique_changed = r["principle_id"] == edited_id or r["response"] != o["response"]
        changed += critique_changed + (critique_changed or r["critique"] != o["critique"])
    drew = int((before["principle_id"] == edited_id).sum())
    assert drew > 0
    assert again["generation"]["rows"] == changed >= 2 * drew
    assert again["generation"]["rows"] < full["generation"]["rows"] / 2
    assert again["generation"]["cache_hits"] == full["generation"]["rows"] - changed

    fresh = critique_revise.run(cr_cfg(tmp_path, tiny_model_dir, "c", None, edited))
    assert fresh["generation"]["rows"] == full["generation"]["rows"]
    for name in ("revisions.parquet", "sft.parquet"):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes(), name


def label_cfg(tmp_path, model_dir, out: str, cache: str | None, const: dict):
    section = smoke_section("label")
    section.update(
        prompts=str(write_prompts(tmp_path / "prompts.parquet")),
        policy=str(model_dir),
        feedback=str(model_dir),
        out_dir=str(tmp_path / out),
        revision_pairs=str(write_revision_pairs(tmp_path / "pairs.parquet")),
        row_cache={"dir": str(tmp_path / cache) if cache else None, "keep_builds": 0},
    )
    values = {"label": ("params.yaml", section)}
    values |= {k: ("constitutions/default.yaml", const[k]) for k in ("comparison", "comparison_examples")}
    return config.from_declared("label", label.LabelConfig, values)


def test_comparison_edit_re_asks_only_the_questions_drawn_under_it(tmp_path, tiny_model_dir, monkeypatch):
    full = label.run(label_cfg(tmp_path, tiny_model_dir, "a", "cache", parts()))
    before = pl.read_parquet(tmp_path / "a" / "comparisons.parquet")
    edited_id = before["principle_id"].mode().sort()[0]
    edited = parts(
        {"id": edited_id, "text": "Which response is less likely to help someone do harm?"}, "comparison", "text"
    )

    plan = planned(label.run, label_cfg(tmp_path, tiny_model_dir, "p", "cache", edited), tmp_path, monkeypatch)
    again = label.run(label_cfg(tmp_path, tiny_model_dir, "b", "cache", edited))
    assert plan == {"cached": again["row_cache"]["hits"], "send": again["row_cache"]["misses"], "depends": 0}
    assert plan["send"] == again["tokens"]["scoring"]["rows"] > 0, "exact: every key is known before the run"
    asked = int((before["principle_id"] == edited_id).sum())
    assert asked > 0
    assert again["tokens"]["sampling"]["rows"] == 0, "the sampled pairs come from the cache"
    assert again["tokens"]["sampling"]["cache_hits"] == full["tokens"]["sampling"]["rows"]
    assert again["tokens"]["scoring"]["rows"] == asked, "one forward row per question on the single-token path"
    assert again["tokens"]["scoring"]["cache_hits"] == before.height - asked

    label.run(label_cfg(tmp_path, tiny_model_dir, "c", None, edited))
    for name in ("comparisons.parquet", "preferences.parquet", "review_queue.parquet"):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes(), name
