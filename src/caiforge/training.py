"""What every training stage shares: precision choice, LoRA, explicit trainer arguments, curves, saving.

TRL and transformers flip defaults between releases (bf16, gradient checkpointing, reporting); the stages set
every one that matters through `common_args`, so a library upgrade cannot silently change a run.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from caiforge import config, io

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters instead of a full fine-tune; merged into the saved model."""

    enabled: bool = False
    """Train LoRA adapters (True) or all weights (False)."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Adapter scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Linear layers that get adapters."""


def precision(choice: Literal["auto", "fp32", "bf16"]) -> dict[str, bool]:
    """Trainer precision flags: bf16 on a CUDA device that supports it (auto), fp32 on CPU."""
    bf16 = choice == "bf16" or (choice == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if bf16 and not torch.cuda.is_available():
        raise ValueError("precision: bf16 needs a CUDA device; use fp32 or auto on CPU")
    return {"bf16": bf16, "fp16": False}


def common_args(
    *, out_dir: Path, seed: int, precision_choice: Literal["auto", "fp32", "bf16"], gradient_checkpointing: bool
) -> dict[str, Any]:
    """Trainer arguments every stage sets explicitly (checkpoints go to a scratch dir; nothing reports online)."""
    return {
        "output_dir": str(out_dir),
        "seed": seed,
        "data_seed": seed,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": False,
        "gradient_checkpointing": gradient_checkpointing,
        "dataloader_num_workers": 0,
        "use_cpu": not torch.cuda.is_available(),
        "full_determinism": False,
        **precision(precision_choice),
    }


@dataclass(frozen=True)
class TrainingSchedule:
    """Optimisation settings every training stage (sft, pm, rlaif, distill) carries under the same names; the stage
    configs subclass it, so each section of params.yaml keeps these keys."""

    seed: int
    """Seeds initialization, data order and dropout."""
    epochs: float
    """Passes over the training rows."""
    learning_rate: float
    """Peak learning rate (linear decay after warmup)."""
    batch_size: int
    """Training examples per device step."""
    gradient_accumulation_steps: int
    """Steps per optimizer update."""
    warmup_ratio: float
    """Share of steps spent warming up the learning rate."""
    weight_decay: float
    """AdamW weight decay."""
    precision: Literal["auto", "fp32", "bf16"]
    """auto: bf16 on CUDA, fp32 on CPU."""
    gradient_checkpointing: bool
    """Trade compute for memory on large models."""
    logging_steps: int
    """Log the loss (and the dvclive curve) every N steps."""


def trainer_args(cfg: TrainingSchedule, out_dir: Path) -> dict[str, Any]:
    """`common_args` plus the schedule (epochs, linear decay after warmup, batch, logging; no in-training eval)."""
    return {
        **common_args(
            out_dir=out_dir,
            seed=cfg.seed,
            precision_choice=cfg.precision,
            gradient_checkpointing=cfg.gradient_checkpointing,
        ),
        "num_train_epochs": cfg.epochs,
        "learning_rate": cfg.learning_rate,
        "per_device_train_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "warmup_steps": cfg.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        "weight_decay": cfg.weight_decay,
        "lr_scheduler_type": "linear",
        "logging_steps": cfg.logging_steps,
        "eval_strategy": "no",
    }


def prompt_completion_args(max_length: int) -> dict[str, Any]:
    """SFTConfig data settings for prompt-completion chats: loss on the completion only, no packing, shuffled."""
    return {
        "max_length": max_length,
        "packing": False,
        "completion_only_loss": True,
        "assistant_only_loss": False,
        "shuffle_dataset": True,
        "dataset_num_proc": None,
    }


def peft_config(lora: LoraConfig, task_type: str = "CAUSAL_LM") -> Any:
    """A peft LoraConfig, or None for a full fine-tune."""
    if not lora.enabled:
        return None
    import peft

    return peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type=task_type,
    )


def dvclive_callback(live_dir: Path) -> Any:
    """Loss curves into `live_dir` (declared as DVC plots); dvcyaml=False so the root dvc.yaml is left alone."""
    from dvclive import Live
    from transformers.integrations import DVCLiveCallback

    if live_dir.exists():
        shutil.rmtree(live_dir)
    return DVCLiveCallback(live=Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None))


def save_model(model: Any, tokenizer: Any, out_dir: Path, stage_cfg: Any) -> None:
    """Save a trained model atomically: LoRA adapters merged, safetensors, tokenizer, and the resolved config."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = model.to(torch.float32) if next(model.parameters()).dtype == torch.float16 else model
    with io.atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        cfg = config.to_dict(stage_cfg)
        (tmp / "caiforge_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")


def final_train_loss(log_history: list[dict[str, Any]]) -> float | None:
    """The last logged training loss from a Trainer's state.log_history."""
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    return float(losses[-1]) if losses else None
