"""rlaif on the smoke profile, once per algorithm: outputs complete, the policy changes, metrics present."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml
from safetensors.torch import load_file

from caiforge import config, formats, models
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


def make_cfg(tmp_path, policy_dir, pm_root, overrides=(), pm_signal=None, preferences=None):
    section = smoke_section("rlaif", list(overrides))
    section.update(
        prompts=str(write_prompts(tmp_path / "prompts.parquet")),
        policy=str(policy_dir),
        reward_model=str(pm_root / "pm" / "model"),
        pm_signal=str(pm_signal or pm_root / "pm" / "signal.json"),
        preferences=str(preferences or pm_root / "preferences.parquet"),
        out_dir=str(tmp_path / "rlaif"),
    )
    return config.build(stage.RlaifConfig, section, "params.yaml", "rlaif")


@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "dpo"])
def test_rlaif_trains_and_reports_reward_and_kl(tmp_path, tiny_model_dir, pm_dir, algorithm, monkeypatch):
    cfg = make_cfg(tmp_path, tiny_model_dir, pm_dir, [f"rlaif.algorithm={algorithm}"])
    assert cfg.beta > 0
    loads, load = [], models.load_pretrained
    monkeypatch.setattr(models, "load_pretrained", lambda path, **kw: loads.append(Path(path)) or load(path, **kw))
    metrics = stage.run(cfg)
    out = tmp_path / "rlaif"
    assert loads == [tiny_model_dir, tiny_model_dir, out / "model"], (
        "the policy to train, then the SFT and the tuned model once each for the held-out answers and the KL"
    )
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
    # smoke's gate warns instead of keeping SFT: the tiny PM's interval may well reach 0.5.
    assert metrics["signal_gate"]["verdict"] in ("trained", "trained_without_signal")
    assert metrics["heldout_prompts"] > 0
    assert isinstance(metrics["reward_before"], float) and isinstance(metrics["reward_after"], float)
    assert metrics["kl_heldout"]["tokens"] > 0 and metrics["kl_heldout"]["kl_per_token"] is not None
    kl = metrics["kl_heldout"]
    assert kl["decoding"].startswith("sampled from the policy, temperature 1") and 0 <= kl["truncated"] <= 1
    assert metrics["heldout_prompts"] <= kl["tokens"] <= metrics["heldout_prompts"] * kl["max_new_tokens"]
    assert (metrics["sampling_dtype"] is None) == (algorithm == "dpo"), "dpo samples nothing"
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
    # Reward-hacking monitors, on the same held-out answers as the reward and KL.
    watch = metrics["monitors"]
    assert watch["kl_per_token"] == kl["kl_per_token"] and watch["reward_change"]["n"] == metrics["heldout_prompts"]
    assert watch["reward_change"]["mean"] == pytest.approx(metrics["reward_after"] - metrics["reward_before"])
    assert watch["answer_tokens_sft"] > 0 and watch["answer_tokens_rl"] > 0
    assert watch["truncated_completion_fraction"] == metrics["truncated_completion_fraction"]
    assert isinstance(watch["warnings"], list) and watch["zero_gradient_steps"] == 0, "every tiny-model step learns"


def completions(tokens: int, n: int = 8):
    from caiforge import engines

    return [engines.Completion("text", 10, tokens, True) for _ in range(n)]


def test_monitors_say_when_length_or_kl_moved_without_the_reward_or_samples_were_truncated():
    flat = ([0.1, 0.2, 0.3, 0.4] * 2, [0.2, 0.1, 0.4, 0.3] * 2)  # paired changes +-0.1: interval contains 0
    watch = stage.monitors(
        completions(20), completions(40), flat, kl_per_token=0.05, truncated=0.9, zero_gradient_steps=3
    )
    assert watch["answer_length_change"] == 1.0 and watch["reward_change"]["low"] < 0 < watch["reward_change"]["high"]
    assert watch["warnings"] == [
        "answer length moved +100% from SFT while the held-out PM reward did not",
        "the policy moved 0.050 nats per token from SFT while the held-out PM reward did not",
        "90% of the training samples hit the token cap and were truncated: RL learned from few finished answers",
        "3 logged training step(s) had a gradient norm of exactly 0: they learned nothing",
    ]
    # The reward rose on every prompt: length and KL moving with it is what RL is for.
    rose = ([0.1, 0.2, 0.3, 0.4] * 2, [0.6, 0.8, 0.7, 0.9] * 2)
    assert stage.monitors(completions(20), completions(40), rose, kl_per_token=0.05, truncated=0.1)["warnings"] == []
    quiet = stage.monitors(completions(20), completions(21), flat, kl_per_token=0.001, truncated=None)
    assert quiet["warnings"] == [] and quiet["truncated_completion_fraction"] is None


def test_mean_interval_is_a_student_t_interval():
    from caiforge import intervals

    found = intervals.mean_interval([1.0, 2.0, 3.0, 4.0])
    assert found["mean"] == 2.5 and found["n"] == 4
    assert (found["low"], found["high"]) == pytest.approx((0.4457, 4.5543), abs=1e-3)  # t(3) = 3.182, sd 1.291
    assert intervals.mean_interval([1.0]) == {"mean": 1.0, "low": None, "high": None, "n": 1}
    assert intervals.mean_interval([])["mean"] is None


def signal_file(tmp_path: Path, pm_root: Path, ci: list[float] | None, reasons: tuple[str, ...] = ()) -> Path:
    """pm_root's signal.json with the PM's held-out accuracy interval `ci` (None: no held-out pairs) and the label
    shortfalls `reasons`."""
    found = json.loads((pm_root / "pm" / "signal.json").read_text())
    found["label_signal"]["reasons"] = list(reasons)
    found["heldout_after"] = {"accuracy": 0.75 if ci else None, "accuracy_ci95": ci, "accuracy_pairs": 12 if ci else 0}
    path = tmp_path / "signal.json"
    path.write_text(json.dumps(found))
    return path


def test_the_gate_passes_confident_labels_and_fires_on_noise(tmp_path, tiny_model_dir, pm_dir):
    def verdict(ci, mode, reasons=(), more=()):
        path = signal_file(tmp_path, pm_dir, ci, reasons)
        overrides = [f"rlaif.gate.on_noise={mode}", *more]
        return stage.signal_gate(make_cfg(tmp_path, tiny_model_dir, pm_dir, overrides, path))

    passed = verdict([0.55, 0.9], "fail")
    assert passed["verdict"] == "trained" and passed["reasons"] == [], "signal: trained, whatever on_noise says"
    assert passed["pm_accuracy_ci95"] == [0.55, 0.9] and passed["order_consistency"] == 0.75
    assert verdict([0.45, 0.9], "keep_sft")["verdict"] == "kept_sft"
    noisy = verdict([0.45, 0.9], "warn")
    assert noisy["verdict"] == "trained_without_signal" and "which reaches 0.5" in noisy["reasons"][0]
    assert "no held-out accuracy" in verdict(None, "keep_sft")["reasons"][0]
    label_noise = verdict([0.55, 0.9], "keep_sft", ("0 of 8 AI labels have confidence >= 0.2",))
    assert label_noise["verdict"] == "kept_sft" and label_noise["reasons"] == [
        "0 of 8 AI labels have confidence >= 0.2"
    ]
    with pytest.raises(ValueError, match=r"interval \[0.45, 0.9\], which reaches 0.5\).*on_noise is 'fail'"):
        verdict([0.45, 0.9], "fail")
    # DPO on revision pairs trains on neither AI labels nor the PM: a PM without held-out signal does not stop it;
    # GRPO on the same pairs is rewarded by that PM, so it does.
    revisions = ["preference_source=revisions"]
    dpo = verdict([0.2, 0.9], "fail", more=[*revisions, "rlaif.algorithm=dpo"])
    assert dpo["verdict"] == "trained" and dpo["pm_accuracy_checked"] is False
    assert verdict([0.2, 0.9], "keep_sft", more=[*revisions, "rlaif.algorithm=grpo"])["verdict"] == "kept_sft"
    assert verdict([0.2, 0.9], "keep_sft", more=["rlaif.algorithm=dpo"])["verdict"] == "kept_sft", "AI labels"
    with pytest.raises(FileNotFoundError, match="dvc repro pm"):
        stage.signal_gate(make_cfg(tmp_path, tiny_model_dir, pm_dir, [], tmp_path / "none"))


def test_without_signal_keep_sft_writes_the_sft_model_and_fail_writes_nothing(tmp_path, tiny_model_dir, pm_dir):
    path = signal_file(tmp_path, pm_dir, [0.3, 0.8])
    with pytest.raises(ValueError, match="on_noise is 'fail'"):
        stage.run(make_cfg(tmp_path, tiny_model_dir, pm_dir, ["rlaif.gate.on_noise=fail"], path))
    assert not (tmp_path / "rlaif").exists(), "no half-written output"
    kept = stage.run(make_cfg(tmp_path, tiny_model_dir, pm_dir, ["rlaif.gate.on_noise=keep_sft"], path))
    out = tmp_path / "rlaif"
    assert kept["signal_gate"]["verdict"] == "kept_sft" and kept["steps"] == 0
    assert json.loads((out / "metrics.json").read_text()) == kept and (out / "dvclive").is_dir()
    assert (out / "model" / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()


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


@pytest.mark.parametrize("algorithm", ["grpo", "dpo"])
def test_the_instruction_reaches_every_prompt_grpo_samples_on_and_no_dpo_prompt(
    tmp_path, tiny_model_dir, pm_dir, monkeypatch, algorithm
):
    """Every chat the PM scores (training rewards and held-out answers) under GRPO asks the prompt with the
    instruction appended; DPO's prompts stay as they are."""
    from caiforge import preference

    scored: list[str] = []
    original = preference.PreferenceModel.score_chats

    def spy(self, chats):
        scored.extend(next(m["content"] for m in chat if m["role"] == "user") for chat in chats)
        return original(self, chats)

    monkeypatch.setattr(preference.PreferenceModel, "score_chats", spy)
    instruction = "Answer in one sentence."
    cfg = make_cfg(
        tmp_path, tiny_model_dir, pm_dir, [f"rlaif.algorithm={algorithm}", f"rlaif.instruction={instruction}"]
    )
    metrics = stage.run(cfg)
    train, heldout = stage.split_prompts(cfg)
    assert scored
    if algorithm == "grpo":
        assert all(text.endswith(" " + instruction) for text in scored)
        assert {t + " " + instruction for t in train["text"]} | {
            t + " " + instruction for t in heldout["text"]
        } >= set(scored)
        assert metrics["instruction"] == instruction
    else:
        assert not any(instruction in text for text in scored)
        assert metrics["instruction"] is None


def answer_logprob(model, tokenizer, prompt: str, answer: str) -> float:
    """Sum of log p(answer tokens | the chat prompt) under `model`, the chat rendered by its template."""
    head = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=False
    )
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], return_dict=False
    )
    assert full[: len(head)] == head
    ids = torch.tensor([full])
    with torch.no_grad():
        logits = model(ids).logits.log_softmax(-1)
    targets = ids[0, len(head) :]
    return float(logits[0, len(head) - 1 : -1].gather(-1, targets[:, None]).sum())


def test_dpo_on_revision_pairs_moves_the_margin_toward_the_revisions(tmp_path, tiny_model_dir, pm_dir):
    """Hugging Face's constitutional-ai recipe: DPO on (revision, initial answer) pairs. The policy's log-prob margin
    log p(revision) - log p(initial) rises on the pairs it trained on; the AI labels in the same file are not used."""
    from caiforge import io, models, schemas
    from tests.stages.test_pm import COMPLIANCE, REFUSAL, write_preferences

    ai = pl.read_parquet(pm_dir / "preferences.parquet")
    revision = pl.read_parquet(write_preferences(tmp_path / "rev.parquet", source="revision", pairs_per_prompt=1))
    both = tmp_path / "both.parquet"
    io.write_parquet(pl.concat([ai, revision]), both, schemas.PREFERENCES)
    overrides = ["rlaif.algorithm=dpo", "preference_source=revisions", "rlaif.max_steps=6"]
    cfg = make_cfg(tmp_path, tiny_model_dir, pm_dir, overrides, preferences=both)
    trained, _ = stage.dpo_pairs(cfg)
    assert set(trained["label_source"]) == {"revision"} and trained.height > 0

    def margins(model_dir):
        model, tokenizer = models.load_pretrained(model_dir, dtype="float32", device="cpu")
        return [
            answer_logprob(model, tokenizer, r["prompt"], r["chosen"])
            - answer_logprob(model, tokenizer, r["prompt"], r["rejected"])
            for r in trained.iter_rows(named=True)
        ]

    before = margins(tiny_model_dir)
    metrics = stage.run(cfg)
    after = margins(tmp_path / "rlaif" / "model")
    assert metrics["preference_source"] == "revisions" and metrics["train_rows"] == trained.height
    assert sum(after) / len(after) > sum(before) / len(before) + 0.1, (before, after)
    assert trained["chosen"].str.starts_with(REFUSAL).all() and trained["rejected"].str.starts_with(COMPLIANCE).all()


@pytest.mark.parametrize("sampling_dtype", ["bfloat16", "float32"])
def test_the_policy_samples_in_sampling_dtype_and_trains_in_fp32(
    tmp_path, tiny_model_dir, pm_dir, monkeypatch, sampling_dtype
):
    """GRPO's samples come from the policy under bf16 autocast when sampling_dtype says bfloat16 (never otherwise),
    while its weights, and so the saved model, stay float32."""
    import transformers

    loaded, load = [], models.load_pretrained
    monkeypatch.setattr(models, "load_pretrained", lambda path, **kw: loaded.append(load(path, **kw)) or loaded[-1])
    calls: list[tuple[object, bool, torch.dtype]] = []
    generate = transformers.GenerationMixin.generate

    def spy(self, *args, **kwargs):
        calls.append((self, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(transformers.GenerationMixin, "generate", spy)
    cfg = make_cfg(tmp_path, tiny_model_dir, pm_dir, [f"rlaif.sampling_dtype={sampling_dtype}"])
    metrics = stage.run(cfg)
    policy = loaded[0][0]
    sampled = [(on, dtype) for model, on, dtype in calls if model is policy]
    assert len(sampled) == cfg.max_steps, "one generate call per GRPO step, on the policy"
    assert all(on == (sampling_dtype == "bfloat16") for on, _ in sampled)
    assert all(dtype == torch.bfloat16 for on, dtype in sampled if on)
    assert not any(on for model, on, _ in calls if model is not policy), "held-out answers and the KL sample as is"
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    saved = load_file(str(tmp_path / "rlaif" / "model" / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert metrics["sampling_dtype"] == sampling_dtype
