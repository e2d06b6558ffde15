"""rlaif: RL from AI feedback -- tune the SFT policy against the preference model, with a KL leash to the SFT model.

Reads  data/curate/prompts.parquet (train split), the SFT model (policy and KL reference), the PM (data/pm/model),
       pm's signal.json and, for `algorithm: dpo`, the preference pairs of `source` (caiforge.pairs: label's AI
       labels, critique_revise's revision pairs, or both).
Does   first the signal gate (caiforge.gate): when the labels' order consistency or confident share, or the PM's
       held-out accuracy interval, falls short, `gate.on_noise` decides: keep_sft writes the SFT model unchanged
       as this stage's model (marked `kept_sft`), fail stops, warn trains anyway (`trained_without_signal`).
       Then one of (`rlaif.algorithm`):
       - grpo (default): TRL GRPOTrainer, `num_generations` sampled answers per prompt, rewarded by the PM, with the
         per-token KL penalty `beta` to the SFT model (the paper's L_LM + lambda L_RL; TRL's default beta is 0 = no
         KL, so it is always set here);
       - rloo: TRL RLOOTrainer (leave-one-out baseline), same reward and KL penalty;
       - dpo: TRL DPOTrainer offline on the preference pairs (cheaper: no sampling, no PM in the loop;
         `beta` is the implicit KL strength; the soft labels only fix which side is chosen). On revision pairs this
         is Hugging Face's constitutional-ai recipe: DPO after SFT, chosen = revision, rejected = initial answer.
       The PM reward is a callable over caiforge.preference (not TRL's reward-model path), so training and the
       reported reward score chats identically. A stable `heldout_fraction` of train prompt ids (hash) is never
       trained on; on those, the SFT model and the tuned model answer (`generation`: greedy by default), the PM
       scores both (mean reward before/after), and KL(tuned || SFT) is estimated by Monte Carlo on answers sampled
       from the tuned model at temperature 1 with no top-k/top-p cut, read on the sampled token ids
       (`preference.sampled_kl`; `kl_max_new_tokens` caps them, `truncated` says how many hit the cap). Reward-
       hacking monitors (`monitors`): answer length against SFT, KL per token, the paired reward change with its
       interval, the truncated share of training samples, and warnings in words. Full fine-tune or LoRA (merged on
       save), bf16 on GPU, fp32 on CPU (GRPO and RLOO sample in bf16 where it is native: `sampling_dtype`), seeded.
Writes data/rlaif/model/ (safetensors + tokenizer + the resolved stage config), data/rlaif/dvclive/ (curves, DVC
       plots) and data/rlaif/metrics.json (reward before/after, KL, monitors, steps).
Run    uv run dvc repro rlaif
       uv run python stages/rlaif.py rlaif.algorithm=dpo rlaif.max_steps=20
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import polars as pl

from caiforge import config, engines, formats, gate, intervals, io, models, pairs, preference, schemas, training
from caiforge.engines import hf, rendering

log = logging.getLogger("caiforge.stages.rlaif")


@dataclass(frozen=True)
class RlaifConfig(training.TrainingSchedule):
    prompts: str
    """prompts.parquet from curate (its train split is used)."""
    policy: str
    """The SFT model: the policy's start and the KL reference."""
    reward_model: str
    """The preference model from pm."""
    pm_signal: str
    """pm's signal.json: the labels' order consistency and confident share, and the PM's held-out accuracy."""
    gate: gate.GateConfig
    """When the labels carry signal, and what RL does when they do not (`on_noise`)."""
    source: pairs.Source
    """Which pairs DPO trains on: ai, revisions or both (caiforge.pairs; the global `preference_source`)."""
    preferences: str
    """The preferences file that holds `source`'s pairs (pm's `data`; read only by dpo)."""
    out_dir: str
    """Where model/, dvclive/ and metrics.json go."""
    algorithm: Literal["grpo", "rloo", "dpo"]
    """Online RL against the PM (grpo, rloo) or offline preference optimization on the labelled pairs (dpo)."""
    heldout_fraction: float
    """Share of train prompt ids (by hash) kept out of training, for reward and KL before/after."""
    max_prompts: int | None
    """Cap on training prompts (a stable hash-ordered subset); null = all."""
    max_heldout_prompts: int | None
    """Cap on held-out prompts scored before/after; null = all."""
    max_steps: int
    """Optimizer steps; -1 = use epochs."""
    beta: float
    """KL coefficient to the SFT model (grpo, rloo: explicit penalty; dpo: implicit); must be > 0."""
    num_generations: int
    """Sampled answers per prompt (grpo, rloo; >= 2, must divide batch_size * gradient_accumulation_steps)."""
    max_completion_length: int
    """Cap on sampled answer tokens (grpo, rloo)."""
    instruction: str
    """grpo, rloo: appended (after a space) to every prompt the policy samples on, in training and on the held-out
    prompts, e.g. a length instruction that lets a small model's answers end before `max_completion_length`;
    empty for none. DPO's pairs are fixed text and its held-out prompts stay as they are."""
    mask_truncated_completions: bool
    """grpo, rloo: a sampled answer cut off at the cap contributes no loss (its reward judged a half answer)."""
    sampling_dtype: Literal["auto", "float32", "bfloat16"]
    """grpo, rloo: the precision the policy samples its training answers in (bf16 by autocast); its log-probs, loss
    and gradients stay in `precision`, as when a bf16 vLLM server samples for an fp32 trainer. auto: bf16 on CUDA
    and on CPUs with native bf16 (as `generation.dtype: auto`), else float32."""
    temperature: float
    """Sampling temperature during training (grpo, rloo)."""
    top_p: float
    """Nucleus mass during training sampling (grpo, rloo)."""
    num_iterations: int
    """Updates per generated batch (mu in the GRPO paper)."""
    epsilon: float
    """Clip range of the policy ratio (grpo, rloo)."""
    grpo_loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"]
    """GRPO's loss aggregation (TRL 1.16 default: dapo)."""
    scale_rewards: Literal["group", "batch", "none"]
    """GRPO's advantage scaling by the reward std."""
    rloo_normalize_advantages: bool
    """RLOO: normalize advantages per generation batch."""
    dpo_loss_type: str
    """DPO loss (TRL names: sigmoid, ipo, robust, ...)."""
    dpo_max_length: int
    """DPO: token cap per prompt + answer."""
    dpo_min_confidence: float
    """DPO: pairs whose label confidence |2p - 1| is below this are left out: a near-0.5 soft label is no
    preference, and DPO would train it as a hard one (human labels have confidence 1)."""
    reward_max_length: int
    """PM token cap per chat (the end is kept), as in the pm stage."""
    reward_batch_size: int
    """Chats per PM forward pass."""
    kl_max_new_tokens: int
    """Token cap of the answers the held-out KL is estimated on (high: a capped answer is a truncated sample)."""
    generation: engines.GenerationConfig
    """How the SFT and tuned models answer the held-out prompts (greedy by default), on the transformers engine:
    the tuned model exists only here, and both are measured the same way."""
    lora: training.LoraConfig
    """LoRA instead of a full fine-tune (merged on save; the reference is then the adapter-free model)."""

    def __post_init__(self) -> None:
        config.require_caps(self, "max_prompts", "max_heldout_prompts")
        if self.generation.backend != "transformers":
            raise ValueError(
                "generation.backend must be 'transformers': the held-out reward after RL is measured on the model "
                "this stage just trained, which no server serves (and before RL the same way)"
            )
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0 (a KL leash to the SFT model), got {self.beta}")
        if not 0 <= self.dpo_min_confidence < 1:
            raise ValueError(f"dpo_min_confidence must be in [0, 1), got {self.dpo_min_confidence}")
        if self.kl_max_new_tokens < 1:
            raise ValueError(f"kl_max_new_tokens must be >= 1, got {self.kl_max_new_tokens}")


def dpo_pairs(cfg: RlaifConfig) -> tuple[pl.DataFrame, int]:
    """The pairs of `source` DPO trains on (outside the held-out prompts, confident enough) and how many fell
    short."""
    found = io.read_parquet(cfg.preferences, schemas.PREFERENCES)
    rows = pairs.training_rows(found, cfg.source, cfg.gate.confident, cfg.preferences)
    # Pairs on held-out prompts stay out, so the reward before/after is measured on prompts DPO never saw.
    rows = rows.filter(~formats.stable_mask(rows["prompt_id"], cfg.heldout_fraction, salt="rlaif-heldout"))
    if rows.is_empty():
        raise ValueError(f"{cfg.preferences}: no preference pairs outside the held-out prompts")
    kept = rows.filter(pl.col("confidence") >= cfg.dpo_min_confidence)
    if kept.is_empty():
        raise ValueError(
            f"{cfg.preferences}: none of {rows.height} pairs reaches rlaif.dpo_min_confidence="
            f"{cfg.dpo_min_confidence} (confidence = |2 p_chosen - 1|)"
        )
    return kept, rows.height - kept.height


def signal_gate(cfg: RlaifConfig) -> dict[str, Any]:
    """The gate's verdict (caiforge.gate) on pm's evidence: the labels' order consistency and confident share (when
    the source uses AI labels), and the PM's held-out accuracy interval (when RL trains against the PM, or the
    source uses AI labels: then it is evidence about them too; DPO on revision pairs uses neither); with the
    evidence itself. `on_noise: fail` raises when it falls short."""
    path = Path(cfg.pm_signal)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: rlaif.pm_signal: the PM's signal.json is missing (run: dvc repro pm)")
    found = json.loads(path.read_text(encoding="utf-8"))
    label, heldout = found["label_signal"], found["heldout_after"]
    checks_pm = cfg.algorithm != "dpo" or pairs.USES_AI[cfg.source]
    reasons = [*label["reasons"], *(gate.pm_signal(heldout) if checks_pm else [])]
    verdict = {**gate.decide(reasons, cfg.gate, "rlaif"), "pm_accuracy_checked": checks_pm}
    evidence = {k: label[k] for k in ("order_consistency", "confident_share", "ai_pairs")}
    accuracy = {f"pm_{k}": heldout.get(k) for k in ("accuracy", "accuracy_ci95", "accuracy_pairs")}
    return {**verdict, **evidence, **accuracy}


def keep_sft(cfg: RlaifConfig, verdict: dict[str, Any]) -> dict:
    """The SFT model, unchanged, as this stage's model, marked as such (the gate found no signal to train on)."""
    out = Path(cfg.out_dir)
    metrics = {
        "algorithm": cfg.algorithm,
        "preference_source": cfg.source,
        "signal_gate": verdict,
        "steps": 0,
        "train_rows": 0,
    }
    if not training.is_main_process():
        return {}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".rlaif-") as tmp:
        staged = Path(tmp)
        shutil.copytree(cfg.policy, staged / "model")
        (staged / "dvclive").mkdir()  # no training, no curves
        io.write_json(metrics, staged / "metrics.json")
        out.mkdir(exist_ok=True)
        for name in ("model", "dvclive", "metrics.json"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            (staged / name).replace(target)
    log.warning("rlaif: kept the SFT model unchanged as data/rlaif/model (gate.on_noise: keep_sft)")
    return metrics


def instruction(cfg: RlaifConfig) -> str | None:
    """The request appended to the prompts the policy samples on: `instruction` under grpo and rloo, else None."""
    return (cfg.instruction.strip() or None) if cfg.algorithm != "dpo" else None


def asked(cfg: RlaifConfig, texts: list[str]) -> list[str]:
    """The prompts as the policy is asked them (`instruction` appended when there is one)."""
    request = instruction(cfg)
    return [f"{t} {request}" for t in texts] if request else list(texts)


def split_prompts(cfg: RlaifConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    prompts = io.read_parquet(cfg.prompts, schemas.PROMPTS).filter(pl.col("split") == "train")
    prompts = prompts.with_columns(
        heldout=formats.stable_mask(prompts["id"], cfg.heldout_fraction, salt="rlaif-heldout"),
        order=pl.Series([formats.stable_fraction(i, "rlaif-pick") for i in prompts["id"]], dtype=pl.Float64),
    ).sort("order", "id")
    train, heldout = prompts.filter(~pl.col("heldout")), prompts.filter(pl.col("heldout"))
    return train.head(cfg.max_prompts or train.height), heldout.head(cfg.max_heldout_prompts or heldout.height)


def common(cfg: RlaifConfig, scratch: Path, ckpt: training.Checkpoints) -> dict[str, Any]:
    """Trainer arguments all three algorithms share."""
    return {
        **ckpt.trainer_args(cfg, scratch),
        "max_steps": cfg.max_steps,
        "beta": cfg.beta,
        "disable_dropout": True,
        "sync_ref_model": False,
    }


def online_args(cfg: RlaifConfig) -> dict[str, Any]:
    """Sampling arguments GRPO and RLOO share."""
    return {
        "num_generations": cfg.num_generations,
        "max_completion_length": cfg.max_completion_length,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "top_k": 0,
        "min_p": None,
        "repetition_penalty": 1.0,
        "num_iterations": cfg.num_iterations,
        "epsilon": cfg.epsilon,
        "mask_truncated_completions": cfg.mask_truncated_completions,
        "shuffle_dataset": True,
        "use_vllm": False,
        "log_completions": False,
    }


def sampling_precision(cfg: RlaifConfig) -> str | None:
    """What grpo and rloo sample in (`sampling_dtype` resolved): bfloat16 or float32; None under dpo (no sampling)."""
    if cfg.algorithm == "dpo":
        return None
    _, dtype = hf.resolve_device("auto", cfg.sampling_dtype)
    return str(dtype).removeprefix("torch.")


def sample_in(model: Any, cfg: RlaifConfig) -> None:
    """Make `model.generate`, which GRPO and RLOO sample through, run under bf16 autocast on the model's device when
    `sampling_precision` is bfloat16; the weights keep their dtype and every other forward pass its precision."""
    if sampling_precision(cfg) != "bfloat16":
        return
    import torch

    generate = model.generate

    @functools.wraps(generate)
    def in_bf16(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type=model.device.type, dtype=torch.bfloat16):
            return generate(*args, **kwargs)

    model.generate = in_bf16


def make_trainer(
    cfg: RlaifConfig,
    train: pl.DataFrame,
    pm: preference.PreferenceModel,
    scratch: Path,
    ckpt: training.Checkpoints,
    resume: str | None,
) -> Any:
    from datasets import Dataset

    model, tokenizer = models.load_pretrained(cfg.policy, attention=training.attention(cfg.attention))
    specials = rendering.special_strings(tokenizer)

    def text(t: str) -> str:
        """TRL renders these chats itself: a prompt or answer spelling a control token must stay text."""
        return rendering.neutralize(tokenizer, t, specials)

    shared = {
        "model": model,
        "processing_class": tokenizer,
        "peft_config": training.peft_config(cfg.lora),
        "callbacks": ckpt.callbacks(resume),
    }
    if cfg.algorithm == "dpo":
        from trl import DPOConfig, DPOTrainer

        rows, _ = dpo_pairs(cfg)
        data = Dataset.from_dict(
            {
                "prompt": [[{"role": "user", "content": text(t)}] for t in rows["prompt"]],
                "chosen": [[{"role": "assistant", "content": text(t)}] for t in rows["chosen"]],
                "rejected": [[{"role": "assistant", "content": text(t)}] for t in rows["rejected"]],
            }
        )
        args = DPOConfig(
            **common(cfg, scratch, ckpt),
            loss_type=[cfg.dpo_loss_type],
            label_smoothing=0.0,
            max_length=cfg.dpo_max_length,
            truncation_mode="keep_start",
            precompute_ref_log_probs=False,
            dataset_num_proc=None,
        )
        return DPOTrainer(args=args, train_dataset=data, **shared), rows.height
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": text(t)}] for t in asked(cfg, train["text"])]})
    if cfg.algorithm == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(
            **common(cfg, scratch, ckpt),
            **online_args(cfg),
            loss_type=cfg.grpo_loss_type,
            scale_rewards=cfg.scale_rewards,
        )
        trainer = GRPOTrainer(reward_funcs=[preference.reward_function(pm)], args=args, train_dataset=data, **shared)
    else:
        from trl import RLOOConfig, RLOOTrainer

        args = RLOOConfig(
            **common(cfg, scratch, ckpt), **online_args(cfg), normalize_advantages=cfg.rloo_normalize_advantages
        )
        trainer = RLOOTrainer(reward_funcs=[preference.reward_function(pm)], args=args, train_dataset=data, **shared)
    sample_in(model, cfg)
    return trainer, len(data)


def generator(model_dir: str | Path, cfg: RlaifConfig) -> hf.TransformersGenerator:
    """The held-out answers' engine on `model_dir`; its model also serves the KL estimate, loaded once. No row
    cache here (the tuned model exists only in this run), so its weights are not fingerprinted."""
    model, tokenizer, device = hf.load_for_inference(model_dir, cfg.generation.device, cfg.generation.dtype)
    return hf.TransformersGenerator(model, tokenizer, cfg.generation, device)


def answer(gen: hf.TransformersGenerator, cfg: RlaifConfig, texts: list[str], desc: str) -> list[engines.Completion]:
    return gen.chat([[{"role": "user", "content": t}] for t in texts], seed=cfg.seed, desc=desc)


LENGTH_MOVED = 0.2
"""Relative change of the mean held-out answer length that counts as moved."""
KL_MOVED = 0.01
"""Held-out KL per token (nats) from the SFT model that counts as moved."""
MOSTLY_TRUNCATED = 0.5
"""Share of truncated training samples above which RL learned from few finished answers."""


def monitors(
    before: list[engines.Completion],
    after: list[engines.Completion],
    rewards: tuple[list[float], list[float]],
    kl_per_token: float | None,
    truncated: float | None,
    zero_gradient_steps: int = 0,
) -> dict[str, Any]:
    """Reward-hacking monitors on the held-out prompts: answer length against SFT, KL per token, the PM reward's
    paired change with its 95% interval, the share of truncated training samples and the logged steps whose
    gradient norm was exactly 0; a warning in words when length or KL moved (`LENGTH_MOVED`, `KL_MOVED`) while the
    reward did not (its interval contains 0), when most training samples were truncated (`MOSTLY_TRUNCATED`), and
    when a step had no gradient (it learned nothing)."""
    length = [sum(c.completion_tokens for c in side) / len(side) if side else None for side in (before, after)]
    change = intervals.mean_interval([a - b for b, a in zip(*rewards, strict=True)])
    flat = change["low"] is None or change["low"] <= 0 <= change["high"]
    relative = (length[1] - length[0]) / length[0] if length[0] and length[1] is not None else None
    warnings = []
    if flat and relative is not None and abs(relative) > LENGTH_MOVED:
        warnings.append(f"answer length moved {relative:+.0%} from SFT while the held-out PM reward did not")
    if flat and kl_per_token is not None and kl_per_token > KL_MOVED:
        warnings.append(
            f"the policy moved {kl_per_token:.3f} nats per token from SFT while the held-out PM reward did not"
        )
    if truncated is not None and truncated > MOSTLY_TRUNCATED:
        warnings.append(
            f"{truncated:.0%} of the training samples hit the token cap and were truncated: RL learned from few "
            "finished answers"
        )
    if zero_gradient_steps:
        warnings.append(
            f"{zero_gradient_steps} logged training step(s) had a gradient norm of exactly 0: they learned nothing"
        )
    return {
        "answer_tokens_sft": length[0],
        "answer_tokens_rl": length[1],
        "answer_length_change": relative,
        "kl_per_token": kl_per_token,
        "reward_change": change,
        "truncated_completion_fraction": truncated,
        "zero_gradient_steps": zero_gradient_steps,
        "warnings": warnings,
    }


def mean_logged(log_history: list[dict[str, Any]], key: str) -> float | None:
    values = [float(entry[key]) for entry in log_history if key in entry]
    return sum(values) / len(values) if values else None


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def run(cfg: RlaifConfig) -> dict:
    train, heldout = split_prompts(cfg)
    if train.is_empty() and cfg.algorithm != "dpo":
        raise ValueError(
            f"{cfg.prompts}: no train-split prompts left for RL (heldout_fraction={cfg.heldout_fraction})"
        )
    verdict = signal_gate(cfg)
    if verdict["verdict"] == "kept_sft":
        return keep_sft(cfg, verdict)
    out = Path(cfg.out_dir)
    pm = preference.PreferenceModel.from_dir(
        cfg.reward_model,
        max_length=cfg.reward_max_length,
        batch_size=cfg.reward_batch_size,
        device=cfg.generation.device,
        dtype=cfg.generation.dtype,
    )
    texts = asked(cfg, heldout["text"].to_list())
    ckpt = training.Checkpoints.for_stage(cfg, out, cfg.prompts, cfg.policy, cfg.reward_model, cfg.preferences)
    resume = ckpt.resume()
    with tempfile.TemporaryDirectory(prefix="caiforge-rlaif-") as scratch:
        trainer, train_rows = make_trainer(cfg, train, pm, Path(scratch), ckpt, resume)
        result = trainer.train(resume_from_checkpoint=resume)
        if not training.finish(trainer, trainer.processing_class, out / "model", cfg):
            return {}  # rank 0 writes the one copy of every output
    ckpt.done()
    history = trainer.state.log_history
    batch = training.batch_metrics(cfg, trainer)
    del trainer
    # Under several processes every one trains (each samples and rewards its own prompts); the held-out answers,
    # rewards and KL are rank 0's alone, on a capped set, as are every output.
    sft, tuned = generator(cfg.policy, cfg), generator(out / "model", cfg)
    sft_answers = answer(sft, cfg, texts, "sft answers")
    reward_before = pm.score(texts, [c.text for c in sft_answers])
    responses = answer(tuned, cfg, texts, "rlaif answers")
    reward_after = pm.score(texts, [c.text for c in responses])
    kl = preference.sampled_kl(
        tuned.model,
        sft.model,
        tuned.tokenizer,
        texts,
        seed=cfg.seed,
        max_new_tokens=cfg.kl_max_new_tokens,
        batch_size=cfg.generation.batch_size,
    )
    before, after = mean(reward_before), mean(reward_after)
    truncated = mean_logged(history, "completions/clipped_ratio")
    zero = sum(float(entry["grad_norm"]) == 0.0 for entry in history if "grad_norm" in entry)
    watch = monitors(sft_answers, responses, (reward_before, reward_after), kl["kl_per_token"], truncated, zero)
    for warning in watch["warnings"]:
        log.warning("rlaif: %s (a sign of reward hacking or wasted steps)", warning)
    metrics = {
        "algorithm": cfg.algorithm,
        "preference_source": cfg.source,
        "signal_gate": verdict,
        "instruction": instruction(cfg),
        "sampling_dtype": sampling_precision(cfg),
        "monitors": watch,
        "beta": cfg.beta,
        "train_rows": train_rows,
        "resumed_from_step": training.step_of(resume),
        "truncated_completion_fraction": truncated,
        "dpo_pairs_below_min_confidence": dpo_pairs(cfg)[1] if cfg.algorithm == "dpo" else None,
        "heldout_prompts": len(texts),
        "steps": result.global_step,
        "final_train_loss": training.final_train_loss(history),
        "reward_before": before,
        "reward_after": after,
        "reward_gain": after - before if before is not None and after is not None else None,
        "kl_heldout": kl,
        "kl_train_mean": mean_logged(history, "kl"),
        "dpo_reward_margin_mean": mean_logged(history, "rewards/margins"),
        "train_reward_mean": mean_logged(history, "reward"),
        **batch,
        "lora": cfg.lora.enabled,
        "train_seconds": round(result.metrics["train_runtime"], 2),
    }
    io.write_json(metrics, out / "metrics.json")
    log.info("rlaif: %s", metrics)
    return metrics


def main() -> None:
    config.stage_main("rlaif", RlaifConfig, run)


if __name__ == "__main__":
    main()
