"""critique_revise and label through the `openai` engine on real llama.cpp servers serving the embedded SmolLM2.

The fleet test starts a second server and SIGKILLs it while critique_revise is running: its requests move to the
surviving server, the stage completes, and the outputs equal a run on the survivor alone (per-row seeds).
"""

from __future__ import annotations

import threading
import time

import polars as pl
import pytest

from caiforge import config, constitution, engines
from tests import servers
from tests.conftest import load_stage, smoke_section, write_prompts

DEFAULT = config.ROOT / "constitutions" / "default.yaml"
PARTS = constitution.to_dict(constitution.load(DEFAULT))


def on_servers(section: dict, key: str, urls: list[str]) -> None:
    section[key] = {
        **section[key],
        "backend": "openai",
        "server": {"urls": urls, "api_key_env": servers.API_KEY_ENV, "max_in_flight": 2},
    }


def critique_cfg(tmp_path, tokenizer_dir, urls: list[str]):
    stage = load_stage("critique_revise")
    section = smoke_section("critique_revise", ["critique_revise.max_prompts=6", "critique_revise.rounds=1"])
    section.update(prompts=str(write_prompts(tmp_path / "prompts.parquet")), policy=str(tokenizer_dir))
    section.update(out_dir=str(tmp_path / "out"))
    on_servers(section, "generation", urls)
    parts = {k: ("constitutions/default.yaml", PARTS[k]) for k in ("critique_revision", "critique_revision_examples")}
    return stage, config.from_declared(
        "critique_revise",
        stage.CritiqueReviseConfig,
        {
            "critique_revise": ("params.yaml", section),
            **parts,
        },
    )


def test_critique_revise_survives_a_server_killed_mid_run(
    tmp_path, llama_server, smollm2_gguf, smollm2_tokenizer_dir, server_env
):
    with servers.running(smollm2_gguf, tmp_path) as doomed:
        stage, cfg = critique_cfg(tmp_path / "fleet", smollm2_tokenizer_dir, [llama_server.url, doomed.url])
        killer = threading.Timer(4.0, doomed.kill)
        started = time.monotonic()
        killer.start()
        metrics = stage.run(cfg)
        seconds = time.monotonic() - started
        killer.cancel()
        assert doomed.process.poll() is not None and seconds > 4.0, "the server died while the stage ran"
    assert metrics["generation"]["retries"] >= 1, "requests in flight on the killed server were retried"
    assert metrics["generation"]["backend"] == "openai" and metrics["generation"]["servers"] == 2
    _, alone = critique_cfg(tmp_path / "alone", smollm2_tokenizer_dir, [llama_server.url])
    stage.run(alone)
    fleet = pl.read_parquet(tmp_path / "fleet" / "out" / "revisions.parquet")
    single = pl.read_parquet(tmp_path / "alone" / "out" / "revisions.parquet")
    assert fleet.equals(single), "which server answered a row must not change it"
    assert fleet["model_fingerprint"].str.starts_with("openai:").all()


def test_label_samples_and_scores_through_the_server(tmp_path, llama_server, smollm2_tokenizer_dir, server_env):
    stage = load_stage("label")
    section = smoke_section("label", ["label.max_prompts=4"])
    section.update(prompts=str(write_prompts(tmp_path / "prompts.parquet")), out_dir=str(tmp_path / "out"))
    section.update(policy=str(smollm2_tokenizer_dir), feedback=str(smollm2_tokenizer_dir))
    on_servers(section, "generation", [llama_server.url])
    on_servers(section, "scoring", [llama_server.url])
    parts = {k: ("constitutions/default.yaml", PARTS[k]) for k in ("comparison", "comparison_examples")}
    cfg = config.from_declared("label", stage.LabelConfig, {"label": ("params.yaml", section), **parts})
    metrics = stage.run(cfg)
    comparisons = pl.read_parquet(tmp_path / "out" / "comparisons.parquet")
    assert metrics["pairs"] > 0 and comparisons.height == metrics["comparisons"]
    assert ((comparisons["p_a"] > 0) & (comparisons["p_a"] < 1)).all()
    assert comparisons["logprob_a"].n_unique() > 1, "real log-probs, not a constant"
    assert metrics["tokens"]["scoring"]["backend"] == "openai"
    assert metrics["tokens"]["scoring"]["options_outside_top_k"] == 0


def test_no_server_fails_the_stage_cleanly(tmp_path, smollm2_tokenizer_dir, server_env):
    dead = f"http://127.0.0.1:{servers.free_port()}/v1"
    stage, cfg = critique_cfg(tmp_path, smollm2_tokenizer_dir, [dead])
    with pytest.raises(engines.EngineError, match=dead):
        stage.run(cfg)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_plan_counts_what_label_will_send_to_the_server(
    tmp_path, llama_server, smollm2_tokenizer_dir, server_env, monkeypatch
):
    """`caiforge plan` on the openai backend: after a comparison-principle edit, the plan-mode label (which asks the
    server only which model it serves) counts exactly the requests the rebuild then sends."""
    from tests.stages.test_row_rebuilds import parts, planned

    stage = load_stage("label")
    prompts = write_prompts(tmp_path / "prompts.parquet")

    def cfg(out: str, const: dict):
        section = smoke_section("label", ["label.max_prompts=4"])
        section.update(prompts=str(prompts), out_dir=str(tmp_path / out))
        section.update(policy=str(smollm2_tokenizer_dir), feedback=str(smollm2_tokenizer_dir))
        section.update(row_cache={"dir": str(tmp_path / "cache"), "prune": False})
        on_servers(section, "generation", [llama_server.url])
        on_servers(section, "scoring", [llama_server.url])
        values = {k: ("constitutions/default.yaml", const[k]) for k in ("comparison", "comparison_examples")}
        return config.from_declared("label", stage.LabelConfig, {"label": ("params.yaml", section), **values})

    stage.run(cfg("a", parts()))
    asked = pl.read_parquet(tmp_path / "a" / "comparisons.parquet")["principle_id"].mode().sort()[0]
    kinder = "Which response is kinder and less likely to cause harm?"
    edited = parts({"id": asked, "text": kinder}, "comparison", "text")
    cache = {p: p.read_bytes() for p in (tmp_path / "cache").iterdir()}
    plan = planned(stage.run, cfg("p", edited), tmp_path, monkeypatch)
    assert {p: p.read_bytes() for p in (tmp_path / "cache").iterdir()} == cache, "planning writes nothing"
    again = stage.run(cfg("b", edited))
    sent = again["row_cache"]
    assert plan["depends"] == 0, "the policy's samples are cached: every key is known before the build"
    assert (plan["cached"], plan["send"]) == (sent["hits"], sent["misses"])
    assert 0 < plan["send"] < plan["cached"], "only the questions under the edited principle are asked again"
    assert again["tokens"]["scoring"]["rows"] == plan["send"] and again["tokens"]["sampling"]["rows"] == 0
