"""rlaif on the smoke profile, once per algorithm: outputs complete, the policy changes, metrics present."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml
from safetensors.torch import load_file

from caiforge import config, formats
from tests.conftest import load_stage, smoke_section, write_prompts
from tests.stages.test_pm import make_cfg as make_pm_cfg

stage = load_stage("rlaif")
pm_stage = load_stage("pm")


@pytest.fixture(scope="module")
def pm_dir(tmp_path_factory, tiny_model_dir):
    """A PM trained by the pm stage on synthetic preferences (they stay beside it for dpo)."""
    tmp = tmp_path_factory.mktemp("pm")
    pm_stage.run(make_pm_cfg(tmp, tiny_model_dir))
    return tmp


def make_cfg(tmp_path, policy_dir, pm_root, overrides=()):
    section = smoke_section("rlaif", list(overrides))
    section.update(
        prompts=str(write_prompts(tmp_path / "prompts.parquet")),
        policy=str(policy_dir),
        reward_model=str(pm_root / "pm" / "model"),
        preferences=str(pm_root / "preferences.parquet"),
        out_dir=str(tmp_path / "rlaif"),
    )
    return config.build(stage.RlaifConfig, section, "params.yaml", "rlaif")


@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "dpo"])
def test_rlaif_trains_and_reports_reward_and_kl(tmp_path, tiny_model_dir, pm_dir, algorithm):
    cfg = make_cfg(tmp_path, tiny_model_dir, pm_dir, [f"rlaif.algorithm={algorithm}"])
    assert cfg.beta > 0
    metrics = stage.run(cfg)
    out = tmp_path / "rlaif"
    assert {p.name for p in out.iterdir()} == {"model", "dvclive", "metrics.json"}
    model_dir = out / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "caiforge_config.json"} <= {
        p.name for p in model_dir.iterdir()
    }
    assert json.loads((model_dir / "caiforge_config.json").read_text())["algorithm"] == algorithm
    before, after = (
        load_file(str(tiny_model_dir / "model.safetensors")),
        load_file(str(model_dir / "model.safetensors")),
    )
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the policy must change"

    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["algorithm"] == algorithm and metrics["steps"] == cfg.max_steps
    assert metrics["heldout_prompts"] > 0
    assert isinstance(metrics["reward_before"], float) and isinstance(metrics["reward_after"], float)
    assert metrics["kl_heldout"]["tokens"] > 0 and metrics["kl_heldout"]["kl_per_token"] is not None
    kl = metrics["kl_heldout"]
    assert kl["decoding"].startswith("sampled from the policy, temperature 1") and 0 <= kl["truncated"] <= 1
    assert metrics["heldout_prompts"] <= kl["tokens"] <= metrics["heldout_prompts"] * kl["max_new_tokens"]
    if algorithm == "dpo":
        assert metrics["dpo_reward_margin_mean"] is not None
        # The synthetic labels' confidence cycles through 0, 0.25, 0.5, 0.75, 1: the 0s stay out of training.
        prefs = pl.read_parquet(pm_dir / "preferences.parquet")
        outside = prefs.filter(~formats.stable_mask(prefs["prompt_id"], cfg.heldout_fraction, salt="rlaif-heldout"))
        assert metrics["train_rows"] == (outside["confidence"] >= cfg.dpo_min_confidence).sum() < outside.height
        assert metrics["dpo_pairs_below_min_confidence"] == outside.height - metrics["train_rows"]
    else:
        assert metrics["kl_train_mean"] is not None, "beta > 0 must log TRL's KL"
        assert metrics["train_reward_mean"] is not None
    assert any((out / "dvclive").rglob("*.tsv"))


def test_beta_zero_is_rejected(tmp_path, tiny_model_dir, pm_dir):
    with pytest.raises(config.ConfigError, match="beta must be > 0"):
        make_cfg(tmp_path, tiny_model_dir, pm_dir, ["rlaif.beta=0"])


def test_held_out_answers_never_come_from_servers(tmp_path, tiny_model_dir, pm_dir):
    """Servers serve the SFT model, not the one rlaif just trained: asking them would report a reward gain of 0."""
    server = ["+rlaif.generation.server.urls=[http://127.0.0.1:9/v1]", "rlaif.generation.backend=openai"]
    with pytest.raises(config.ConfigError, match="generation.backend must be 'transformers'"):
        make_cfg(tmp_path, tiny_model_dir, pm_dir, server)


def test_missing_pm_names_the_stage(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="dvc repro pm"):
        stage.run(cfg)
    assert not (tmp_path / "rlaif").exists()


def test_dpo_confidence_filter_and_its_bounds(tmp_path, tiny_model_dir, pm_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, pm_dir, ["rlaif.algorithm=dpo", "rlaif.dpo_min_confidence=0.99999"])
    cfg_none = make_cfg(tmp_path, tiny_model_dir, pm_dir, ["rlaif.algorithm=dpo"])
    assert cfg_none.dpo_min_confidence == 0.2
    kept, dropped = stage.dpo_pairs(cfg)
    assert (kept["confidence"] >= 0.99999).all() and dropped > 0
    with pytest.raises(config.ConfigError, match="dpo_min_confidence must be in"):
        make_cfg(tmp_path, tiny_model_dir, pm_dir, ["rlaif.dpo_min_confidence=1.0"])


def test_online_sampling_is_explicit_and_masks_truncated_completions(tmp_path, tiny_model_dir, pm_dir):
    """GRPO/RLOO sample with exactly the params' settings (TRL's own defaults would leave top-k, min-p and the
    repetition penalty to the model's generation_config), and a completion cut off at max_completion_length gets no
    loss (TRL's default would train on it as if complete). The paper-shaped default keeps the mask on."""
    from trl import GRPOConfig

    defaults = yaml.safe_load((Path(__file__).resolve().parents[2] / "conf/rlaif/default.yaml").read_text())
    assert defaults["mask_truncated_completions"] is True
    cfg = make_cfg(tmp_path, tiny_model_dir, pm_dir, ["rlaif.mask_truncated_completions=true", "rlaif.top_p=0.9"])
    args = GRPOConfig(output_dir=str(tmp_path / "scratch"), use_cpu=True, **stage.online_args(cfg))
    assert args.mask_truncated_completions is True
    assert (args.temperature, args.top_p, args.top_k, args.min_p, args.repetition_penalty) == (
        cfg.temperature,
        0.9,
        0,
        None,
        1.0,
    )
