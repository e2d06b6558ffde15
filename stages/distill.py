"""distill: compress the RL-CAI model (the teacher) into a smaller student with the same tokenizer.

Reads  data/curate/prompts.parquet (train split, red-team + helpful), the teacher (data/rlaif/model) and, for
       `init: student`, the `student` role from models.
Does   the teacher answers the train prompts (`generation`: greedy by default), each answer kept in the row cache as
       it arrives (`row_cache`). Under several processes they share the work, or the main process alone serves
       the teacher (managed servers, `engines.stage_answers`) and stops the servers before any training.
       With `teacher_instruction` the teacher is asked with it appended, and the student learns the answer to the
       bare prompt (context distillation; under `method: logit` the teacher's distributions are still those given
       the bare prompt). Answers with a `drop_answers` flag (caiforge.collapse: loops, cut-off answers, ...) are
       not trained on.
       The student starts as either
       - prune (default): the teacher with every `prune_every`-th decoder layer kept (or exactly the layers
         `prune_keep` lists), weights copied; or
       - student: the `student` role (any smaller model with the teacher's tokenizer).
       It then learns from the teacher's answers by `method`:
       - logit (default): KL(teacher || student) of the next-token distributions (temperature `temperature`) on
         every answer token (caiforge.distillation; TRL's DistillationTrainer is on-policy only), optionally mixed
         with `ce_weight` x cross-entropy on the answer;
       - sequence: plain SFT (TRL SFTTrainer) on the teacher's answers, loss on the completion only.
       A stable `heldout_fraction` of train prompt ids (hash) is never trained on: there the student's top-1
       next-token agreement with the teacher and the per-token KL are measured on the teacher's answers, before and
       after training; and whether the student still talks: the trained student answers those prompts as the
       teacher did, and distinct-2 and the degenerate share (caiforge.collapse) of both are reported side by side.
       bf16 on GPU, fp32 on CPU, seeded.
Writes data/distill/model/ (safetensors + tokenizer + the resolved stage config), data/distill/dvclive/ (curves, DVC
       plots), data/distill/rowcache/ (the teacher's answers) and data/distill/metrics.json (parameter counts,
       distillation loss, agreement before/after, the held-out answers' distinct-2 and degenerate share, teacher
       and student).
Run    uv run dvc repro distill
       uv run python stages/distill.py distill.method=sequence distill.prune_every=3
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import polars as pl

from caiforge import (
    collapse,
    config,
    distillation,
    engines,
    formats,
    io,
    models,
    planmode,
    rowcache,
    schemas,
    training,
)
from caiforge.engines import hf

log = logging.getLogger("caiforge.stages.distill")


@dataclass(frozen=True)
class DistillConfig(training.TrainingSchedule):
    prompts: str
    """prompts.parquet from curate (its train split is used)."""
    teacher: str
    """The RL-CAI model (data/rlaif/model)."""
    student: str
    """The `student` role from models (read only by init: student)."""
    out_dir: str
    """Where model/, dvclive/ and metrics.json go."""
    init: Literal["prune", "student"]
    """Student start: the depth-pruned teacher, or the `student` role."""
    prune_every: int
    """init: prune keeps decoder layers 0, k, 2k, ... of the teacher (k = prune_every >= 2)."""
    prune_keep: tuple[int, ...] | None
    """init: prune keeps exactly these decoder layers of the teacher instead (e.g. all but a few late ones, which a
    small model misses least); null: every prune_every-th."""
    method: Literal["logit", "sequence"]
    """logit: KL to the teacher's token distributions; sequence: SFT on the teacher's answers."""
    temperature: float
    """logit: softening temperature of both distributions (the loss is scaled by T^2)."""
    ce_weight: float
    """logit: weight in [0, 1] of the cross-entropy on the teacher's answer (the KL gets 1 - ce_weight)."""
    heldout_fraction: float
    """Share of train prompt ids (by hash) kept out of training, for agreement before/after."""
    max_prompts: int | None
    """Cap on training prompts (a stable hash-ordered subset); null = all."""
    max_heldout_prompts: int | None
    """Cap on held-out prompts; null = all."""
    max_length: int
    """Token cap per prompt + answer; longer rows are truncated."""
    generation: engines.GenerationConfig
    """How the teacher answers (greedy by default)."""
    row_cache: rowcache.RowCacheConfig
    """The teacher's answers, kept across builds (a rerun after a failed training asks none again)."""
    teacher_instruction: str
    """Appended (after a space) to each training prompt when the teacher answers it; the student learns that
    answer to the bare prompt (context distillation). Empty: the teacher answers the bare prompt."""
    drop_answers: tuple[collapse.Flag, ...]
    """caiforge.collapse flags that keep a teacher answer out of training (e.g. repetition, runaway): the student
    does not learn the teacher's loops. Empty: every answer is trained on."""

    def __post_init__(self) -> None:
        config.require_caps(self, "max_prompts", "max_heldout_prompts")
        if unknown := set(self.drop_answers) - set(collapse.FLAGS):
            raise ValueError(f"drop_answers: unknown flags {sorted(unknown)}; known: {list(collapse.FLAGS)}")
        if self.init == "prune" and self.prune_every < 2:
            raise ValueError(f"prune_every must be >= 2 (1 keeps every layer: no compression), got {self.prune_every}")
        if self.temperature <= 0 or not 0 <= self.ce_weight <= 1:
            raise ValueError(
                f"temperature must be > 0 and ce_weight in [0, 1], got {self.temperature}, {self.ce_weight}"
            )


def split_prompts(cfg: DistillConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    prompts = io.read_parquet(cfg.prompts, schemas.PROMPTS).filter(pl.col("split") == "train")
    prompts = prompts.with_columns(
        heldout=formats.stable_mask(prompts["id"], cfg.heldout_fraction, salt="distill-heldout"),
        order=pl.Series([formats.stable_fraction(i, "distill-pick") for i in prompts["id"]], dtype=pl.Float64),
    ).sort("order", "id")
    train, heldout = prompts.filter(~pl.col("heldout")), prompts.filter(pl.col("heldout"))
    if train.is_empty():
        raise ValueError(f"{cfg.prompts}: no train-split prompts left (heldout_fraction={cfg.heldout_fraction})")
    return train.head(cfg.max_prompts or train.height), heldout.head(cfg.max_heldout_prompts or heldout.height)


def usable_answers(cfg: DistillConfig, train: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The rows whose teacher answer has none of the `drop_answers` flags, and how many rows that dropped (`rows`)
    and how many carry each flag (`flags`)."""
    if not cfg.drop_answers:
        return train, {"rows": 0, "flags": {}}
    found = [
        set(collapse.flags(a, finished=f, cfg=collapse.CollapseConfig())) & set(cfg.drop_answers)
        for a, f in zip(train["answer"], train["finished"], strict=True)
    ]
    kept = train.filter(pl.Series([not f for f in found]))
    if kept.is_empty():
        raise ValueError(f"distill.drop_answers={list(cfg.drop_answers)} drops every one of {train.height} answers")
    return kept, {
        "rows": train.height - kept.height,
        "flags": {flag: sum(flag in f for f in found) for flag in cfg.drop_answers},
    }


def init_student(cfg: DistillConfig, teacher: Any, tokenizer: Any) -> tuple[Any, list[int] | None]:
    kernel = training.attention(cfg.attention)  # the student's: it is the model that trains
    if cfg.init == "prune":
        return distillation.prune_layers(teacher, cfg.prune_every, attention=kernel, keep=cfg.prune_keep)
    student, student_tokenizer = models.load_pretrained(
        cfg.student, device=str(next(teacher.parameters()).device), attention=kernel
    )
    distillation.check_same_vocabulary(tokenizer, student_tokenizer, cfg.student)
    return student, None


def student_answers(cfg: DistillConfig, student_dir: Path, prompts: list[str], teacher: list[str]) -> dict[str, Any]:
    """Whether the student still talks: distinct-2 and the degenerate share (empty or looping, `collapse`) of its
    answers to the held-out prompts, decoded as the teacher's were (`generation`, in-process), beside the
    teacher's."""
    gen = engines.make_generator(student_dir, replace(cfg.generation, backend="transformers"))
    mine = [c.text for c in gen.chat([[{"role": "user", "content": t}] for t in prompts], seed=cfg.seed)]
    share = lambda texts: round(sum(map(collapse.degenerate, texts)) / len(texts), 4) if texts else None  # noqa: E731
    return {
        "prompts": len(prompts),
        "distinct_2_teacher": round(collapse.distinct_n(teacher, 2), 4),
        "distinct_2_student": round(collapse.distinct_n(mine, 2), 4),
        "degenerate_teacher": share(teacher),
        "degenerate_student": share(mine),
    }


def run(cfg: DistillConfig) -> dict:
    from trl import SFTConfig, SFTTrainer

    train, heldout = split_prompts(cfg)
    out = Path(cfg.out_dir)
    cache = rowcache.RowCache.open(cfg.row_cache)
    # Every process gets all answers, in row order; managed servers are started once, and stopped before training.
    asked = [f"{t} {cfg.teacher_instruction}" if cfg.teacher_instruction else t for t in train["text"]]
    conversations = [[{"role": "user", "content": t}] for t in asked + heldout["text"].to_list()]
    outs, teacher_stats = engines.stage_answers(cfg.teacher, cfg.generation, conversations, seed=cfg.seed, cache=cache)
    planmode.end_of_requests()  # `caiforge plan` stops here: every request is counted
    if cache is not None and not training.is_main_process():
        cache.close()  # its journal joins the cache at the next build; the main process compacts
    answers = [c.text for c in outs]
    train = train.with_columns(
        answer=pl.Series(answers[: train.height], dtype=pl.String),
        finished=pl.Series([c.finished for c in outs[: train.height]], dtype=pl.Boolean),
    )
    held_prompts, held_answers = heldout["text"].to_list(), answers[train.height :]
    train, dropped = usable_answers(cfg, train)

    # fp32 weights on the training device: a pruned student copies the teacher's dtype, and AdamW wants fp32.
    device, _ = hf.resolve_device(cfg.generation.device, cfg.generation.dtype)
    teacher, tokenizer = models.load_pretrained(cfg.teacher, device=device)
    student, kept = init_student(cfg, teacher, tokenizer)
    main = training.is_main_process()  # held-out agreement and every output: rank 0 only
    before = distillation.agreement(student, teacher, tokenizer, held_prompts, held_answers) if main else None
    # A teacher answer cut off at the token cap is learned without the end token (never as a finished answer).
    data = formats.completion_dataset(
        tokenizer,
        [[{"role": "user", "content": t}] for t in train["text"]],
        train["answer"].to_list(),
        train["finished"].to_list(),
    )
    ckpt = training.Checkpoints.for_stage(cfg, out, cfg.prompts, cfg.teacher, cfg.student)
    resume = ckpt.resume()
    with tempfile.TemporaryDirectory(prefix="caiforge-distill-") as scratch:
        args = SFTConfig(
            **ckpt.trainer_args(cfg, Path(scratch)),
            **training.prompt_completion_args(cfg.max_length),
        )
        shared = {
            "model": student,
            "args": args,
            "train_dataset": data,
            "processing_class": tokenizer,
            "callbacks": ckpt.callbacks(resume),
        }
        if cfg.method == "logit":
            trainer = distillation.logit_trainer_class()(
                **shared, teacher=teacher, temperature=cfg.temperature, ce_weight=cfg.ce_weight
            )
        else:
            trainer = SFTTrainer(**shared)
        result = trainer.train(resume_from_checkpoint=resume)
        if not training.finish(trainer, tokenizer, out / "model", cfg):
            return {}  # rank 0 writes the one copy of every output
    ckpt.done()
    history = trainer.state.log_history
    batch = training.batch_metrics(cfg, trainer)
    del trainer, student
    student, _ = models.load_pretrained(out / "model", device=device)
    after = distillation.agreement(student, teacher, tokenizer, held_prompts, held_answers)
    teacher_params, student_params = models.parameter_count(teacher), models.parameter_count(student)
    student_layers = student.config.num_hidden_layers
    del student
    talks = student_answers(cfg, out / "model", held_prompts, held_answers)
    metrics = {
        "method": cfg.method,
        "init": cfg.init,
        "teacher_parameters": teacher_params,
        "student_parameters": student_params,
        "compression": round(teacher_params / student_params, 4),
        "teacher_layers": teacher.config.num_hidden_layers,
        "student_layers": student_layers,
        "kept_layers": kept,
        "train_rows": train.height,
        "teacher_instruction": cfg.teacher_instruction,
        "dropped_answers": dropped,
        "resumed_from_step": training.step_of(resume),
        "heldout_prompts": len(held_prompts),
        "steps": result.global_step,
        "distillation_loss": training.final_train_loss(history),
        "mean_train_loss": round(result.training_loss, 6),
        "heldout_before": before,
        "heldout_after": after,
        "heldout_answers": talks,
        **batch,
        "teacher_generation": teacher_stats,
        "row_cache": rowcache.finish(cache, cfg.row_cache),
        "train_seconds": round(result.metrics["train_runtime"], 2),
    }
    io.write_json(metrics, out / "metrics.json")
    log.info("distill: %s", metrics)
    return metrics


def main() -> None:
    config.stage_main("distill", DistillConfig, run)


if __name__ == "__main__":
    main()
