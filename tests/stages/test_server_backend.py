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
from tests.conftest import SERVED_GGUF, load_stage, smoke_section, write_prompts, write_revision_pairs

DEFAULT = config.ROOT / "constitutions" / "default.yaml"
PARTS = constitution.to_dict(constitution.load(DEFAULT))
PROMPTS = ("How do I bake bread?", "Name a colour.", "Write a haiku about rain.")


SERVED = "revision:smollm2-135m-instruct-q4_1"
"""What the session's server serves, stated (`server.weights`), so that its rows may be reused."""


def on_servers(section: dict, key: str, urls: list[str], weights: str | None = SERVED) -> None:
    section[key] = {
        **section[key],
        "backend": "openai",
        "server": {"urls": urls, "api_key_env": servers.API_KEY_ENV, "max_in_flight": 2, "weights": weights},
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


def test_critique_revise_rides_out_its_only_server_restarting(
    tmp_path, llama_server, smollm2_gguf, smollm2_tokenizer_dir, server_env
):
    """The only server is SIGKILLed mid-run and restarted on its port: requests wait for it (server.retry_window),
    the stage completes, and its rows equal an uninterrupted run's."""
    port = servers.free_port()
    restarted: list[servers.Server] = []

    def restart() -> None:
        first.kill()
        time.sleep(1.0)
        restarted.append(servers.start(smollm2_gguf, tmp_path, port=port))

    first = servers.start(smollm2_gguf, tmp_path, port=port)
    try:
        stage, cfg = critique_cfg(tmp_path / "outage", smollm2_tokenizer_dir, [f"http://127.0.0.1:{port}/v1"])
        timer = threading.Timer(4.0, restart)
        timer.start()
        metrics = stage.run(cfg)
        timer.join()
    finally:
        first.kill()
        for server in restarted:
            server.kill()
    assert first.process.returncode == -9 and restarted, "the server was killed and restarted while the stage ran"
    assert metrics["generation"]["retries"] >= 1, "requests in flight when it died were asked again"
    _, steady = critique_cfg(tmp_path / "steady", smollm2_tokenizer_dir, [llama_server.url])
    stage.run(steady)
    outage = pl.read_parquet(tmp_path / "outage" / "out" / "revisions.parquet")
    assert outage.equals(pl.read_parquet(tmp_path / "steady" / "out" / "revisions.parquet"))
    g = metrics["generation"]
    print(f"outage: {g['rows']} requests, {g['retries']} retried; {outage.height} rows equal an uninterrupted run's")


def test_label_samples_reasons_and_scores_through_the_server(
    tmp_path, llama_server, smollm2_tokenizer_dir, server_env
):
    """Chain of thought included: the reasoning runs on the scoring servers (cot_generation sets decoding only)."""
    stage = load_stage("label")
    section = smoke_section("label", ["label.max_prompts=4", "label.chain_of_thought=true"])
    section.update(prompts=str(write_prompts(tmp_path / "prompts.parquet")), out_dir=str(tmp_path / "out"))
    section.update(policy=str(smollm2_tokenizer_dir), feedback=str(smollm2_tokenizer_dir))
    section.update(revision_pairs=str(write_revision_pairs(tmp_path / "pairs.parquet")))
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
    assert metrics["tokens"]["reasoning"]["backend"] == "openai" and metrics["tokens"]["reasoning"]["rows"] > 0
    assert (comparisons["reasoning"].str.len_chars() > 0).mean() > 0.5, "the feedback model's reasoning is there"
    section["cot_generation"] = {**section["cot_generation"], "device": "cpu"}
    with pytest.raises(config.ConfigError, match="cot_generation.device"):
        config.from_declared("label", stage.LabelConfig, {"label": ("params.yaml", section), **parts})


def test_label_asks_retrained_weights_again_under_the_same_served_name(
    tmp_path, llama_server, served_dirs, server_env
):
    """`sft` retrained and its server restarted on the new weights under the same name and URL: with
    `server.weights: model_dir`, label samples every prompt again (none from the row cache), and its output equals
    a build without a cache on the new weights."""
    before, after = served_dirs
    stage = load_stage("label")
    prompts = write_prompts(tmp_path / "prompts.parquet")

    def run(out: str, policy, url: str, cache: bool = True) -> dict:
        section = smoke_section("label", ["label.max_prompts=4"])
        section.update(prompts=str(prompts), out_dir=str(tmp_path / out), policy=str(policy), feedback=str(before))
        section.update(row_cache={"dir": str(tmp_path / "cache") if cache else None, "keep_builds": 0})
        on_servers(section, "generation", [url], weights="model_dir")
        on_servers(section, "scoring", [llama_server.url], weights="model_dir")
        parts = {k: ("constitutions/default.yaml", PARTS[k]) for k in ("comparison", "comparison_examples")}
        return stage.run(
            config.from_declared("label", stage.LabelConfig, {"label": ("params.yaml", section), **parts})
        )

    port = servers.free_port()
    with servers.running(before / SERVED_GGUF, tmp_path, alias="sft", port=port) as server:
        first = run("first", before, server.url)
        warm = run("warm", before, server.url)
    assert warm["tokens"]["sampling"]["rows"] == 0 and warm["tokens"]["scoring"]["rows"] == 0, "unchanged: all cached"
    with servers.running(after / SERVED_GGUF, tmp_path, alias="sft", port=port) as server:
        retrained = run("retrained", after, server.url)
        run("fresh", after, server.url, cache=False)
    sampling = retrained["tokens"]["sampling"]
    assert sampling["cache_hits"] == 0 and sampling["rows"] == first["tokens"]["sampling"]["rows"] > 0
    read = {out: pl.read_parquet(tmp_path / out / "comparisons.parquet") for out in ("first", "retrained", "fresh")}
    assert read["retrained"].equals(read["fresh"]), "the retrained model's rows, as a build without a cache makes them"
    assert not read["retrained"]["response_a"].equals(read["first"]["response_a"]), "new weights, new samples"


def test_evaluate_answers_again_for_the_retrained_model_only(tmp_path, served_dirs, server_env):
    """evaluate names each model in its requests (`sft`, ...): after `sft` is retrained and the server restarted
    with the new weights under that name, only `sft` answers again, exactly as a build without a cache does."""
    from types import SimpleNamespace

    from caiforge import rowcache

    before, after = served_dirs
    evaluate = load_stage("evaluate")
    chosen = pl.DataFrame(
        [{"id": f"p{i}", "kind": "helpful", "category": "general", "text": t} for i, t in enumerate(PROMPTS)]
    )
    port = servers.free_port()

    def answers(models: dict, cache: bool = True) -> tuple[pl.DataFrame, dict]:
        server = {"urls": [f"http://127.0.0.1:{port}/v1"], "api_key_env": servers.API_KEY_ENV, "weights": "model_dir"}
        gen = engines.GenerationConfig(backend="openai", server=engines.ServerConfig(**server), max_new_tokens=24)
        cfg = SimpleNamespace(models=models, generation=gen, seed=0)
        return evaluate.answer_all(cfg, chosen, rowcache.RowCache(tmp_path / "cache") if cache else None)

    served = {"base": before / SERVED_GGUF, "sft": before / SERVED_GGUF}
    with servers.running(before / SERVED_GGUF, tmp_path, port=port, models=served):
        first, _ = answers({"base": before, "sft": before})
    with servers.running(before / SERVED_GGUF, tmp_path, port=port, models={**served, "sft": after / SERVED_GGUF}):
        again, stats = answers({"base": before, "sft": after})
        fresh, _ = answers({"base": before, "sft": after}, cache=False)
    assert {m: (s["rows"], s["cache_hits"]) for m, s in stats.items()} == {
        "base": (0, len(PROMPTS)),
        "sft": (len(PROMPTS), 0),
    }
    assert again.equals(fresh), "the retrained model's answers, as a build without a cache makes them"
    sft = pl.col("model") == "sft"
    assert not again.filter(sft)["answer"].equals(first.filter(sft)["answer"]), "new weights, new answers"


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
        section.update(row_cache={"dir": str(tmp_path / "cache"), "keep_builds": 0})
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
