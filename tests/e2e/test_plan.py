"""`caiforge plan`: before a build, what it will run and send, counted from the row caches without loading a model;
the counts are checked against what the following `dvc repro` actually sends."""

from __future__ import annotations

import json
import sys

import polars as pl

from tests.e2e import pipeline


def plan(repo) -> dict[str, dict]:
    out = pipeline.sh(repo, sys.executable, "-m", "caiforge.cli", "plan", "--json").stdout
    return {p["stage"]: p for p in json.loads(out)}


def row_cache(repo, stage: str) -> dict[str, int]:
    return json.loads((repo / "data" / stage / "metrics.json").read_text())["row_cache"]


def test_plan_counts_what_the_next_repro_sends(repo):
    assert plan(repo) == {}, "an up-to-date workspace has nothing to run"
    # A principle this build's labels drew (which ones depends on the sampled pairs), so that some questions change.
    drawn = pl.read_parquet(repo / "data" / "label" / "comparisons.parquet")["principle_id"].mode().sort()[0]
    pipeline.edit_principle(repo, drawn, "text", "Which response is kinder and less likely to cause harm?")
    before = pipeline.data_digests(repo)
    caches = {p: p.read_bytes() for p in (repo / "data").glob("*/rowcache/*")}

    planned = plan(repo)
    assert pipeline.data_digests(repo) == before, "planning writes no output"
    assert {p: p.read_bytes() for p in (repo / "data").glob("*/rowcache/*")} == caches, "nor touches a cache"
    ran = pipeline.repro(repo)
    # Stages downstream of a change run unless their inputs come out byte-identical (here GRPO with two answers per
    # prompt sees only the order of its rewards, so a new PM can leave the RL weights and so `distill` unchanged).
    assert [s for s in planned if s in ran] == ran, "the plan lists every stage the build runs, in order"
    assert {s for s, p in planned.items() if not p["why"].startswith("after ")} == {"check", "label", "evaluate"}
    assert planned["pm"]["counts"] is None and "no row-cached engine requests" in planned["pm"]["note"]

    # label: the policy and its samples did not change, so every key is known now and the counts are exact.
    label = planned["label"]["counts"]
    sent = row_cache(repo, "label")
    assert label["depends"] == 0
    assert (label["cached"], label["send"]) == (sent["hits"], sent["misses"])
    assert 0 < label["send"] < label["cached"], "only the questions drawn under the edited principle are asked"
    metrics = json.loads((repo / "data" / "label" / "metrics.json").read_text())
    assert label["send"] == metrics["tokens"]["scoring"]["rows"] and metrics["tokens"]["sampling"]["rows"] == 0

    # distill: the teacher's answers all wait on the RL model this build retrains.
    distill = planned["distill"]["counts"]
    assert distill["depends"] > 0 and distill["send"] == distill["cached"] == 0

    # evaluate: the RL and distilled models are retrained, so their answers and the judge's games on them depend
    # on what the build produces: counted as sent, an upper bound (here the RL weights came out unchanged, so their
    # answers were cache hits; equal new answers also make equal judge requests, which run once).
    ev, sent = planned["evaluate"]["counts"], row_cache(repo, "evaluate")
    assert ev["depends"] > 0 and ev["cached"] > 0
    assert ev["send"] <= sent["misses"] <= ev["send"] + ev["depends"]
    assert sent["hits"] >= ev["cached"]
