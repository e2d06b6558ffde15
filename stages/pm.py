"""pm: the preference model, a one-output sequence classifier trained on the AI-labelled comparisons.

Reads  the preference pairs of `source` (caiforge.pairs; params.yaml resolves `data` to one file: label's
       preferences.parquet for ai and both, critique_revise's pairs.parquet for revisions) and the SFT model, whose
       weights initialize the classifier (a new, seeded one-output head on top).
Does   TRL RewardTrainer with the soft-label Bradley-Terry loss (caiforge.preference): the chat (user prompt +
       assistant response) is rendered with the chat template and scored at its last token. A stable
       `heldout_fraction` of prompt ids (hash) is kept out of training for held-out loss, accuracy and expected
       calibration error against the soft labels, measured before and after training. Before training, when the
       source uses AI labels, their signal (caiforge.gate: order consistency, share of confident labels) is
       measured; with `gate.on_noise: fail` labels without it stop the stage. Full fine-tune or LoRA (merged on
       save), bf16 on GPU, fp32 on CPU, seeded.
Writes data/pm/model/ (safetensors + tokenizer + the resolved stage config), data/pm/dvclive/ (curves, DVC plots),
       data/pm/metrics.json and data/pm/signal.json (the gate's evidence, for rlaif: label signal and held-out
       accuracy with its interval; no timings, so an unchanged PM leaves rlaif cached).
Run    uv run dvc repro pm
       uv run python stages/pm.py pm.epochs=1 pm.lora.enabled=true
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from caiforge import config, formats, gate, io, pairs, preference, schemas, training

log = logging.getLogger("caiforge.stages.pm")


@dataclass(frozen=True)
class PmConfig(training.TrainingSchedule):
    source: pairs.Source
    """Which pairs to train on: ai, revisions or both (caiforge.pairs; the global `preference_source`)."""
    files: dict[str, str]
    """The one preferences file that holds each source's pairs (caiforge.pairs); `data` is resolved from it."""
    data: str
    """The file pm reads (`files[source]` in params.yaml, so that dvc.yaml declares exactly it); `source` picks the
    rows (a file without them is an error naming it)."""
    gate: gate.GateConfig
    """When the labels carry signal (shared with rlaif.gate); `on_noise: fail` stops pm before it trains."""
    policy: str
    """The model whose weights initialize the PM (data/sft/model)."""
    out_dir: str
    """Where model/, dvclive/ and metrics.json go."""
    heldout_fraction: float
    """Share of prompt ids (by hash) held out for accuracy and calibration."""
    max_length: int
    """Token cap per chat; longer chats keep their end (the reward is read at the last token)."""
    center_rewards_coefficient: float | None
    """Weight of a penalty on (r_c + r_r)^2 that keeps rewards centred at 0; null = off."""
    calibration_bins: int
    """Equal-width probability bins for the expected calibration error."""
    score_batch_size: int
    """Chats per forward pass when scoring the held-out pairs."""
    lora: training.LoraConfig
    """LoRA instead of a full fine-tune (merged on save; the new head is always trained)."""


def heldout_metrics(pm: preference.PreferenceModel, rows: pl.DataFrame, bins: int) -> dict[str, float | None]:
    chosen = pm.score(rows["prompt"].to_list(), rows["chosen"].to_list())
    rejected = pm.score(rows["prompt"].to_list(), rows["rejected"].to_list())
    return preference.evaluate_pairs(chosen, rejected, rows["p_chosen"].to_list(), bins)


def run(cfg: PmConfig) -> dict:
    from trl import RewardConfig

    found = io.read_parquet(cfg.data, schemas.PREFERENCES)
    rows = pairs.training_rows(found, cfg.source, cfg.gate.confident, cfg.data)
    rows = rows.with_columns(heldout=formats.stable_mask(rows["prompt_id"], cfg.heldout_fraction, salt="pm-heldout"))
    train, evals = rows.filter(~pl.col("heldout")), rows.filter(pl.col("heldout"))
    if train.is_empty():
        raise ValueError(f"{cfg.data}: no training pairs left (heldout_fraction={cfg.heldout_fraction})")
    signal = gate.source_signal(found, cfg.source, cfg.gate)
    if cfg.gate.on_noise == "fail":
        gate.decide(signal["reasons"], cfg.gate, "pm")  # raises before any training
    out = Path(cfg.out_dir)
    model, tokenizer = preference.init_from_causal_lm(
        cfg.policy, seed=cfg.seed, attention=training.attention(cfg.attention)
    )
    pm = preference.PreferenceModel(model, tokenizer, max_length=cfg.max_length, batch_size=cfg.score_batch_size)
    main = training.is_main_process()  # held-out scoring and every output: rank 0 only
    before = heldout_metrics(pm, evals, cfg.calibration_bins) if main else None
    ckpt = training.Checkpoints.for_stage(cfg, out, cfg.data, cfg.policy)
    resume = ckpt.resume()
    with tempfile.TemporaryDirectory(prefix="caiforge-pm-") as scratch:
        args = RewardConfig(
            **ckpt.trainer_args(cfg, Path(scratch)),
            max_length=None,  # pairs arrive tokenized and truncated by preference.encode_chat
            center_rewards_coefficient=cfg.center_rewards_coefficient,
            disable_dropout=True,
            dataset_num_proc=None,
            remove_unused_columns=True,
        )
        trainer = preference.soft_label_trainer_class()(
            model=model,
            args=args,
            train_dataset=preference.pair_dataset(train, tokenizer, cfg.max_length),
            processing_class=tokenizer,
            peft_config=training.peft_config(cfg.lora, task_type="SEQ_CLS"),
            callbacks=ckpt.callbacks(resume),
        )
        result = trainer.train(resume_from_checkpoint=resume)
        if not training.finish(trainer, tokenizer, out / "model", cfg):
            return {}  # rank 0 writes the one copy of every output
    ckpt.done()
    device = str(next(model.parameters()).device)
    pm = preference.PreferenceModel.from_dir(
        out / "model", max_length=cfg.max_length, batch_size=cfg.score_batch_size, device=device, dtype="float32"
    )
    after = heldout_metrics(pm, evals, cfg.calibration_bins)
    metrics = {
        "train_pairs": train.height,
        "heldout_pairs": evals.height,
        "steps": result.global_step,
        "final_train_loss": training.final_train_loss(trainer.state.log_history),
        "mean_train_loss": round(result.training_loss, 6),
        "heldout_before": before,
        "heldout_after": after,
        "mean_p_chosen": round(float(rows["p_chosen"].mean()), 6),
        "preference_source": cfg.source,
        "pairs_by_source": dict(sorted(rows["label_source"].value_counts().iter_rows())),
        "label_signal": signal,
        **training.batch_metrics(cfg, trainer),
        "lora": cfg.lora.enabled,
        "resumed_from_step": training.step_of(resume),
        "train_seconds": round(result.metrics["train_runtime"], 2),
    }
    io.write_json(metrics, out / "metrics.json")
    io.write_json({"label_signal": signal, "heldout_after": after}, out / "signal.json")
    log.info("pm: %s", metrics)
    return metrics


def main() -> None:
    config.stage_main("pm", PmConfig, run)


if __name__ == "__main__":
    main()
