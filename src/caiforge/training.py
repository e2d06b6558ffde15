"""What every training stage shares: precision choice, LoRA, explicit trainer arguments, curves, saving.

TRL and transformers flip defaults between releases (bf16, gradient checkpointing, reporting); the stages set
every one that matters through `common_args`, so a library upgrade cannot silently change a run.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from caiforge import config, distributed, io

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


world_size = distributed.world_size
"""Training processes of this run: 1 for a plain process, WORLD_SIZE under `accelerate launch` / torchrun."""


is_main_process = io.is_main_process
"""Rank 0 alone writes model/, metrics.json, dvclive/ and checkpoint markers."""


def parallelism(trainer: Any) -> str:
    """How the Trainer's accelerator trained: NO (one process), MULTI_CPU or MULTI_GPU (DDP), FSDP1 or FSDP2, or
    DEEPSPEED_ZERO<stage>, as the accelerate config file made it."""
    state = trainer.accelerator.state
    kind = state.distributed_type.value
    if kind == "FSDP":
        return f"FSDP{state.fsdp_plugin.fsdp_version}"
    if kind == "DEEPSPEED":
        return f"DEEPSPEED_ZERO{state.deepspeed_plugin.zero_stage}"
    return kind


def batch_metrics(cfg: TrainingSchedule, trainer: Any) -> dict[str, int | str]:
    """How the run was parallel and the global batch with its three factors, for metrics.json."""
    return {
        "parallelism": parallelism(trainer),
        "processes": world_size(),
        "per_device_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "global_batch_size": world_size() * cfg.batch_size * cfg.gradient_accumulation_steps,
    }


def precision(choice: Literal["auto", "fp32", "bf16"]) -> dict[str, bool]:
    """Trainer precision flags: bf16 on a CUDA device that supports it (auto), fp32 on CPU."""
    bf16 = choice == "bf16" or (choice == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if bf16 and not torch.cuda.is_available():
        raise ValueError("precision: bf16 needs a CUDA device; use fp32 or auto on CPU")
    return {"bf16": bf16, "fp16": False}


Attention = Literal["auto", "eager", "sdpa", "flash_attention_2"]
FusedLoss = Literal["auto", "liger", "none"]


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def attention(choice: Attention) -> str:
    """The attention kernel a training stage loads its model with (transformers' `attn_implementation`).

    auto: FlashAttention 2 on CUDA when the flash-attn package is installed, else PyTorch's SDPA (fused kernels on
    GPU, the math path on CPU). Asking for flash_attention_2 where it cannot run is an error, not a silent fallback.
    """
    flash = torch.cuda.is_available() and _installed("flash_attn")
    if choice == "flash_attention_2" and not flash:
        raise ValueError(
            "attention: flash_attention_2 needs a CUDA device and the flash-attn package (pip install flash-attn); "
            "use sdpa, or auto to take it when it is there"
        )
    if choice == "auto":
        return "flash_attention_2" if flash else "sdpa"
    return choice


def fused_loss(choice: FusedLoss) -> bool:
    """Whether the trainer uses Liger's fused kernels (`use_liger_kernel`: the linear layer and cross-entropy in one
    kernel, so the logits of a long sequence are never materialised). auto: on CUDA when liger-kernel is installed."""
    liger = torch.cuda.is_available() and _installed("liger_kernel")
    if choice == "liger" and not liger:
        raise ValueError(
            "fused_loss: liger needs a CUDA device and the liger-kernel package (pip install liger-kernel); "
            "use none, or auto to take it when it is there"
        )
    return choice == "liger" or (choice == "auto" and liger)


def padding_free(batching: Literal["padded", "padding_free", "auto"], kernel: str) -> bool:
    """Whether SFT batches go padding-free. TRL flattens the rows of a batch into one sequence, which only
    FlashAttention's variable-length kernel keeps apart: with any other kernel the rows would attend to each other."""
    if batching == "padding_free" and kernel != "flash_attention_2":
        raise ValueError(f"batching: padding_free needs attention flash_attention_2, but attention is {kernel}")
    return batching == "padding_free" or (batching == "auto" and kernel == "flash_attention_2")


def common_args(
    *,
    out_dir: Path,
    seed: int,
    precision_choice: Literal["auto", "fp32", "bf16"],
    gradient_checkpointing: bool,
    fused_loss_choice: FusedLoss = "none",
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
        "use_liger_kernel": fused_loss(fused_loss_choice),
        "dataloader_num_workers": 0,
        "use_cpu": not torch.cuda.is_available(),
        # Token-level losses average over the tokens of every process's batch, not per process: N processes of
        # batch b then take the same step as one process of batch N x b.
        "average_tokens_across_devices": True,
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
    attention: Attention
    """Attention kernel: auto (FlashAttention 2 on CUDA when installed, else SDPA), sdpa, flash_attention_2, eager."""
    fused_loss: FusedLoss
    """Liger's fused linear + cross-entropy kernels: auto (on CUDA when liger-kernel is installed), liger, none."""
    logging_steps: int
    """Log the loss (and the dvclive curve) every N steps."""
    checkpoint_every: int
    """Save a resumable checkpoint every N optimizer steps under <out_dir>/checkpoints (0: never). A killed run
    resumes from the last one; they are deleted when the stage completes."""


def trainer_args(cfg: TrainingSchedule, out_dir: Path) -> dict[str, Any]:
    """`common_args` plus the schedule (epochs, linear decay after warmup, batch, logging; no in-training eval)."""
    return {
        **common_args(
            out_dir=out_dir,
            seed=cfg.seed,
            precision_choice=cfg.precision,
            gradient_checkpointing=cfg.gradient_checkpointing,
            fused_loss_choice=cfg.fused_loss,
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


CHECKPOINTS = "checkpoints"
COMPLETE = "caiforge_complete"
"""Written last into a checkpoint: one without it was cut short by a kill and is never resumed from."""


def inputs_fingerprint(cfg: Any, *paths: str | Path) -> str:
    """sha256 of the resolved stage config and the bytes of its input files (directories walked): what must match
    for a checkpoint to be resumed."""
    digest = hashlib.sha256(json.dumps(config.to_dict(cfg), sort_keys=True, default=str).encode())
    for root in paths:
        root = Path(root)
        for path in sorted([root] if root.is_file() else (p for p in root.rglob("*") if p.is_file())):
            digest.update(path.as_posix().encode())
            with path.open("rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


class Checkpoints:
    """Resumable training: checkpoints every `every` steps in <out_dir>/checkpoints/<inputs fingerprint>/.

    A checkpoint holds what the Trainer needs to continue exactly (weights, optimizer, scheduler, RNG states, the
    data position) and a copy of the dvclive curve so far. Checkpoints of other inputs (a params or data edit since
    the kill) are deleted, never resumed. None is written at the last step (transformers saves one there by
    default): the stage saves its model next and deletes every checkpoint, so it would be weights and optimizer
    state written to disk for nothing; a kill in between resumes from the last periodic one.
    """

    def __init__(self, every: int, out_dir: Path, fingerprint: str, live_dir: Path) -> None:
        if every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {every}")
        self.every = every
        self.root = out_dir / CHECKPOINTS
        self.dir = self.root / fingerprint[:16]
        self.live_dir = live_dir
        if self.root.is_dir() and is_main_process():
            for other in self.root.iterdir():
                if other != self.dir:
                    shutil.rmtree(other, ignore_errors=True)

    @classmethod
    def for_stage(cls, cfg: Any, out_dir: Path, *inputs: str | Path) -> Checkpoints:
        """A training stage's checkpoints: every `cfg.checkpoint_every` steps, for these inputs (model directories
        are followed through role links)."""
        from caiforge import models

        paths = [models.resolve(p) if Path(p).is_dir() else p for p in inputs]
        fingerprint = inputs_fingerprint(cfg, *paths)
        if world_size() > 1:  # the process count is part of the data order: 2 processes never resume at 1
            fingerprint = hashlib.sha256(f"{fingerprint}/processes={world_size()}".encode()).hexdigest()
        return cls(cfg.checkpoint_every, out_dir, fingerprint, out_dir / "dvclive")

    def trainer_args(self, cfg: TrainingSchedule, scratch: Path) -> dict[str, Any]:
        """`trainer_args` with this run's checkpointing."""
        return {**trainer_args(cfg, scratch), **self.args(scratch)}

    def callbacks(self, resume: str | None) -> list[Any]:
        """The dvclive curve (continued when resuming; main process only) and the checkpoint completer."""
        live = dvclive_callback(self.live_dir, resume=resume is not None)
        return [live, self.callback()] if live is not None else [self.callback()]

    def args(self, scratch: Path) -> dict[str, Any]:
        """Trainer arguments: save every `every` steps (keeping two, so one is always whole), else nothing."""
        if not self.every:
            return {"output_dir": str(scratch), "save_strategy": "no"}
        return {"output_dir": str(self.dir), "save_strategy": "steps", "save_steps": self.every, "save_total_limit": 2}

    def latest(self) -> Path | None:
        """The newest complete checkpoint of these inputs, or None."""
        found = [p for p in self.dir.glob("checkpoint-*") if (p / COMPLETE).is_file()] if self.every else []
        return max(found, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)

    def resume(self) -> str | None:
        """The checkpoint to resume from (its dvclive curve restored), or None to start afresh."""
        last = self.latest()
        if last is None:
            return None
        if not is_main_process():
            return str(last)
        if self.live_dir.exists():
            shutil.rmtree(self.live_dir)
        if (last / "dvclive").is_dir():
            shutil.copytree(last / "dvclive", self.live_dir)
        log.info("resuming from %s", last)
        return str(last)

    def callback(self) -> Any:
        """Completes each checkpoint (the dvclive curve so far, then the marker) and cancels the last step's."""
        from transformers import TrainerCallback

        outer = self

        class Complete(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
                if state.global_step >= state.max_steps:
                    control.should_save = False
                return control

            def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if not is_main_process() or not ckpt.is_dir():
                    return
                if outer.live_dir.is_dir():
                    shutil.copytree(outer.live_dir, ckpt / "dvclive", dirs_exist_ok=True)
                (ckpt / COMPLETE).write_text(str(state.global_step))

        return Complete()

    def done(self) -> None:
        """The stage completed: no checkpoint is needed any more."""
        if is_main_process():
            shutil.rmtree(self.root, ignore_errors=True)


def step_of(checkpoint: str | None) -> int | None:
    """The optimizer step a checkpoint was saved at (None: the run did not resume)."""
    return int(checkpoint.rsplit("-", 1)[1]) if checkpoint else None


def prompt_completion_args(max_length: int, padding_free: bool = False) -> dict[str, Any]:
    """SFTConfig data settings for prompt-completion chats: loss on the completion only, no packing, shuffled;
    `padding_free` flattens each batch into one sequence without pad tokens (TRL: FlashAttention only)."""
    return {
        "max_length": max_length,
        "packing": False,
        "padding_free": padding_free,
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


def dvclive_callback(live_dir: Path, resume: bool = False) -> Any:
    """Loss curves into `live_dir` (declared as DVC plots); dvcyaml=False so the root dvc.yaml is left alone.
    None on every process but the main one (which logs the loss averaged over all of them).

    `resume`: continue the curve already in `live_dir` (restored from a checkpoint) instead of starting afresh.
    """
    if not is_main_process():
        return None
    from dvclive import Live
    from transformers.integrations import DVCLiveCallback

    if live_dir.exists() and not resume:
        shutil.rmtree(live_dir)
    live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None, resume=resume)
    return DVCLiveCallback(live=live)


def save_model(model: Any, tokenizer: Any, out_dir: Path, stage_cfg: Any) -> None:
    """Save a trained model atomically: LoRA adapters merged, safetensors, tokenizer, and the resolved config. The
    saved model generates with its KV cache (`use_cache: true` in config.json and generation_config.json), whatever
    training set: the Trainers turn it off, and `generate` on a model saved that way recomputes every earlier token
    at each new one (TRL's GRPO/RLOO sampling from the SFT model was 5-10x slower per token)."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = model.to(torch.float32) if next(model.parameters()).dtype == torch.float16 else model
    model.config.use_cache = True
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = True
    with io.atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        cfg = config.to_dict(stage_cfg)
        (tmp / "caiforge_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")


def finish(trainer: Any, tokenizer: Any, model_dir: Path, stage_cfg: Any) -> bool:
    """End a training run; every process must call it. The weights are gathered whole however the Trainer
    sharded them (`accelerator.get_state_dict`, a collective under FSDP and ZeRO-3), and the main process saves
    them as `save_model` does (LoRA merged, safetensors that `from_pretrained` loads). True on the main process,
    which then computes its held-out metrics from `model_dir` (the same figures whatever the sharding), False on
    the others, which write nothing."""
    # The engine (DeepSpeed) or the sharded module (FSDP2), which the gather needs, not the bare module.
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not is_main_process():
        return False
    save_model(unsharded(trainer.accelerator.unwrap_model(trainer.model), state_dict), tokenizer, model_dir, stage_cfg)
    return True


def unsharded(model: Any, state_dict: dict[str, torch.Tensor]) -> Any:
    """A model of `model`'s architecture (LoRA adapters included) that holds `state_dict`'s whole tensors, built
    without allocating weights of its own and never partitioned; `model` itself may be sharded."""
    import copy

    import peft

    base = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    with _unpartitioned(), torch.device("meta"):
        plain = _built_class(base)._from_config(copy.deepcopy(base.config))
        if isinstance(model, peft.PeftModel):
            plain = peft.get_peft_model(plain, copy.deepcopy(model.peft_config[model.active_adapter]))
    missing, unexpected = plain.load_state_dict(state_dict, strict=False, assign=True)
    plain.tie_weights()  # a tied output layer may be missing from the gathered dict
    empty = sorted(n for n, t in plain.state_dict().items() if t.is_meta)
    if unexpected or empty:
        raise RuntimeError(
            f"the gathered weights do not fit {type(plain).__name__}: missing {empty[:5]}, unexpected "
            f"{sorted(unexpected)[:5]} (of {len(missing)} missing, {len(unexpected)} unexpected)"
        )
    return plain


def _built_class(module: Any) -> type:
    """The class `module` was built as (FSDP2's `fully_shard` swaps in a subclass of it)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


@contextlib.contextmanager
def _unpartitioned() -> Any:
    """Models built inside hold whole tensors, even while a ZeRO-3 Trainer is alive (transformers would otherwise
    build them under `deepspeed.zero.Init`, partitioned across processes that are not taking part)."""
    from transformers.integrations import deepspeed

    ref = deepspeed._hf_deepspeed_config_weak_ref
    deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        deepspeed._hf_deepspeed_config_weak_ref = ref


@torch.no_grad()
def completion_loss(model: Any, dataset: Any, max_length: int) -> float | None:
    """Mean cross-entropy per completion token of a `formats.completion_dataset` (rows truncated to `max_length`,
    as the trainer truncates them), one row per forward pass: no padding, and the same number whatever the batch
    size or process count. The caller runs it on one process (the main one). None for no rows."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for row in dataset:
        ids = torch.tensor([row["input_ids"][:max_length]], device=device)
        mask = torch.tensor(row["completion_mask"][:max_length], device=device)[1:].bool()
        logits = model(input_ids=ids).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        total += float(nll[mask].sum())
        tokens += int(mask.sum())
    model.train(was_training)
    return round(total / tokens, 6) if tokens else None


def final_train_loss(log_history: list[dict[str, Any]]) -> float | None:
    """The last logged training loss from a Trainer's state.log_history."""
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    return float(losses[-1]) if losses else None
