"""sft: SL-CAI fine-tuning of the policy on its own revised answers (+ helpful answers).

Reads  data/critique_revise/sft.parquet (prompt -> completion chats) and the policy model.
Does   TRL SFTTrainer with the loss on the assistant completion only (prompt-completion format), a full fine-tune
       or LoRA (merged into the saved weights), bf16 on GPU, fp32 on CPU, seeded. A stable `heldout_fraction` of the
       red-team rows (by prompt id hash) is kept out of training to measure held-out loss on revisions.
Writes data/sft/model/ (safetensors + tokenizer + the resolved stage config), data/sft/dvclive/ (loss curves,
       DVC plots) and data/sft/metrics.json (final train loss, held-out loss before and after).
Run    uv run dvc repro sft
       uv run python stages/sft.py sft.epochs=1 sft.lora.enabled=true
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl

from caiforge import config, formats, io, models, schemas, training

log = logging.getLogger("caiforge.stages.sft")


@dataclass(frozen=True)
class SftConfig(training.TrainingSchedule):
    data: str
    """sft.parquet from critique_revise."""
    policy: str
    """The model to fine-tune (data/models/policy)."""
    out_dir: str
    """Where model/, dvclive/ and metrics.json go."""
    heldout_fraction: float
    """Share of red-team rows (by id hash) held out for the held-out loss."""
    max_length: int
    """Token cap per row (prompt + completion); longer rows are truncated."""
    lora: training.LoraConfig
    """LoRA instead of a full fine-tune (merged on save)."""
    batching: Literal["padded", "padding_free", "auto"]
    """padding_free: each batch flattened into one sequence without pad tokens (TRL; needs flash_attention_2);
    auto: padding_free when the attention kernel is flash_attention_2, else padded."""


def chats(tokenizer, rows: pl.DataFrame):
    """sft.parquet rows as tokenized prompt -> completion (unfinished completions without the end token)."""
    completions = [c[0]["content"] for c in rows["completion"].to_list()]
    return formats.completion_dataset(tokenizer, rows["prompt"].to_list(), completions, rows["finished"].to_list())


def run(cfg: SftConfig) -> dict:
    from trl import SFTConfig, SFTTrainer

    rows = io.read_parquet(cfg.data, schemas.SFT)
    picked = formats.stable_mask(rows["prompt_id"], cfg.heldout_fraction, salt="sft-heldout")
    rows = rows.with_columns(heldout=picked & (pl.col("kind") == "red_team"))
    train, evals = rows.filter(~pl.col("heldout")), rows.filter(pl.col("heldout"))
    if train.is_empty():
        raise ValueError(f"{cfg.data}: no training rows left (heldout_fraction={cfg.heldout_fraction})")
    out = Path(cfg.out_dir)
    ckpt = training.Checkpoints.for_stage(cfg, out, cfg.data, cfg.policy)
    resume = ckpt.resume()
    kernel = training.attention(cfg.attention)
    padding_free = training.padding_free(cfg.batching, kernel)
    model, tokenizer = models.load_pretrained(cfg.policy, attention=kernel)
    main = training.is_main_process()  # the held-out loss and every output: rank 0 only
    heldout = chats(tokenizer, evals) if evals.height else None
    before = training.completion_loss(model, heldout, cfg.max_length) if heldout is not None and main else None
    with tempfile.TemporaryDirectory(prefix="caiforge-sft-") as scratch:
        args = SFTConfig(
            **ckpt.trainer_args(cfg, Path(scratch)),
            **training.prompt_completion_args(cfg.max_length, padding_free),
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=chats(tokenizer, train),
            processing_class=tokenizer,
            peft_config=training.peft_config(cfg.lora),
            callbacks=ckpt.callbacks(resume),
        )
        result = trainer.train(resume_from_checkpoint=resume)
        if not training.finish(trainer, tokenizer, out / "model", cfg):
            return {}  # rank 0 writes the one copy of every output
    ckpt.done()
    after = None
    if heldout is not None:  # from the saved weights: the same figure whatever the sharding
        trained, _ = models.load_pretrained(out / "model", device=str(next(model.parameters()).device))
        after = training.completion_loss(trained, heldout, cfg.max_length)
    metrics = {
        "train_rows": train.height,
        "heldout_rows": evals.height,
        "steps": result.global_step,
        "final_train_loss": training.final_train_loss(trainer.state.log_history),
        "mean_train_loss": round(result.training_loss, 6),
        "heldout_loss_before": before,
        "heldout_loss_after": after,
        **training.batch_metrics(cfg, trainer),
        "lora": cfg.lora.enabled,
        "resumed_from_step": training.step_of(resume),
        "train_seconds": round(result.metrics["train_runtime"], 2),
    }
    io.write_json(metrics, out / "metrics.json")
    log.info("sft: %s", metrics)
    return metrics


def main() -> None:
    config.stage_main("sft", SftConfig, run)


if __name__ == "__main__":
    main()
