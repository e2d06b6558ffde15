"""Knowledge distillation: a smaller student from a teacher with the same tokenizer.

- `prune_layers`: depth pruning, a real compression technique that works offline. The student is the teacher's
  architecture with only every k-th decoder layer (0, k, 2k, ...); it starts with exactly those layers' weights plus
  the teacher's embeddings, final norm and LM head, so it begins close to the teacher rather than from noise.
- `forward_kl` / `distillation_loss`: the classic logit-matching objective, KL(teacher || student) of the
  temperature-softened next-token distributions over the completion tokens, scaled by T^2 (Hinton et al.) so that
  its gradients keep their size when the temperature changes.
- `logit_trainer_class`: TRL's SFTTrainer (its prompt-completion tokenization and completion mask) with that loss.
  TRL's own `DistillationTrainer` is on-policy only (the student generates every batch, then the teacher scores it):
  right for large GPU runs, but sampling inside every CPU step is slow and the teacher's answers are already at hand
  here, so this trains off-policy on them -- the setting of word-level KD (Kim & Rush, 2016).
- `agreement`: how closely a student follows its teacher on the teacher's own held-out answers: the share of
  completion positions where both models' most likely next token is the same, and the mean per-token KL (T = 1).
"""

from __future__ import annotations

import copy
import functools
import logging
import re
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from caiforge.engines import rendering

log = logging.getLogger(__name__)

_LAYER_KEY = re.compile(r"^(.*?\blayers\.)(\d+)(\..*)$")


# ---------------------------------------------------------------------------------------------------------------
# Depth pruning


def kept_layers(num_layers: int, every: int) -> list[int]:
    """Indices of the decoder layers a depth-pruned student keeps: 0, every, 2 * every, ..."""
    if every < 1:
        raise ValueError(f"prune_every must be >= 1, got {every}")
    if num_layers < 1:
        raise ValueError(f"the teacher has no decoder layers (num_hidden_layers={num_layers})")
    return list(range(0, num_layers, every))


def prune_layers(
    teacher: Any, every: int, attention: str | None = None, keep: Sequence[int] | None = None
) -> tuple[Any, list[int]]:
    """A copy of causal LM `teacher` keeping every `every`-th decoder layer (or exactly the layers `keep` lists),
    with the kept layers' weights and the teacher's embeddings, final norm and head; returns (student, kept layer
    indices). The teacher is not changed. `attention` is the student's `attn_implementation` (None: transformers'
    default)."""
    from transformers import AutoModelForCausalLM

    n = teacher.config.num_hidden_layers
    if keep is None:
        kept = kept_layers(n, every)
    else:
        kept = sorted(set(keep))
        if not kept or kept[0] < 0 or kept[-1] >= n or len(kept) == n:
            raise ValueError(f"prune_keep: {list(keep)} must name some but not all of the teacher's layers 0..{n - 1}")
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(kept)
    # Per-layer settings (e.g. `layer_types`: sliding vs full attention) must follow the layers they describe.
    for name, value in list(vars(cfg).items()):
        if isinstance(value, list | tuple) and len(value) == n and name != "architectures":
            setattr(cfg, name, type(value)(value[i] for i in kept))
    # Every weight is overwritten below; the fork keeps the throwaway random init from touching global RNG state.
    with torch.random.fork_rng(devices=[]):
        kwargs = {"attn_implementation": attention} if attention else {}
        student = AutoModelForCausalLM.from_config(cfg, dtype=teacher.dtype, **kwargs)
    new_index = {old: new for new, old in enumerate(kept)}
    state = {}
    for key, tensor in teacher.state_dict().items():
        match = _LAYER_KEY.match(key)
        if match is None:
            state[key] = tensor.detach().clone()
        elif int(match.group(2)) in new_index:
            state[f"{match.group(1)}{new_index[int(match.group(2))]}{match.group(3)}"] = tensor.detach().clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    # A tied head (lm_head = embed_tokens) may be absent from the state dict; anything else missing is a bug.
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"depth pruning could not map weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.tie_word_embeddings:
        student.tie_weights()
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.to(next(teacher.parameters()).device), kept


def check_same_vocabulary(teacher_tokenizer: Any, student_tokenizer: Any, where: str) -> None:
    """Logit distillation compares distributions token by token: both models must share one vocabulary."""
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise ValueError(
            f"{where}: the student's tokenizer differs from the teacher's ({len(student_tokenizer)} vs "
            f"{len(teacher_tokenizer)} tokens); pick a student with the teacher's tokenizer or use init: prune"
        )


# ---------------------------------------------------------------------------------------------------------------
# The objective (pure)


def forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position KL(p_teacher || p_student) of the temperature-softened distributions over the last axis."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def distillation_loss(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """T^2 * mean (or sum) over masked positions of KL(teacher || student); 0 when no position is masked in."""
    kl = forward_kl(teacher_logits, student_logits, temperature)
    mask = mask.to(kl.dtype)
    total = temperature**2 * (kl * mask).sum()
    return total if reduction == "sum" else total / mask.sum().clamp(min=1)


@functools.cache
def logit_trainer_class() -> type:
    """`LogitDistillationTrainer`: TRL's SFTTrainer whose loss is `distillation_loss` against a frozen teacher
    (plus `ce_weight` times the usual next-token cross-entropy on the teacher's answer).

    Built on first use so importing this module does not import TRL. SFTTrainer's prompt-completion preparation
    sets `labels` to -100 outside the completion; the same positions select the KL terms.
    """
    from trl import SFTTrainer

    class LogitDistillationTrainer(SFTTrainer):
        # The loss is normalized by `num_items_in_batch`: the answer tokens of every accumulation step on every
        # process, as SFTTrainer's own loss is. So the gradient is the mean over all of them, whatever the number of
        # processes (one process with batch 2b equals two with batch b) and however unevenly they hold tokens.
        loss_is_scaled_for_ga = True

        def __init__(self, *args: Any, teacher: Any, temperature: float, ce_weight: float, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if not 0 <= ce_weight <= 1:
                raise ValueError(f"ce_weight must be in [0, 1], got {ce_weight}")
            self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
            self.temperature = temperature
            self.ce_weight = ce_weight

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            labels = inputs["labels"]
            forward = {k: v for k, v in inputs.items() if k != "labels"}
            forward["use_cache"] = False
            outputs = model(**forward)
            with torch.no_grad():
                teacher_logits = self.teacher(**forward).logits
            student_logits = outputs.logits[:, :-1]
            target = labels[:, 1:]
            mask = target != -100
            tokens = mask.sum().clamp(min=1)
            kl = distillation_loss(teacher_logits[:, :-1], student_logits, mask, self.temperature, reduction="sum")
            total = (1 - self.ce_weight) * kl
            if self.ce_weight:
                ce = F.cross_entropy(
                    student_logits.float().flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum"
                )
                total = total + self.ce_weight * ce
            if num_items_in_batch is None:  # no count from the Trainer: this micro-batch's mean, scaled for GA
                loss = total / tokens / self.current_gradient_accumulation_steps
            else:
                loss = total / num_items_in_batch
                if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                    loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
            mode = "train" if model.training else "eval"
            self._metrics[mode]["kl"].append(float(kl.detach() / tokens))
            return (loss, outputs) if return_outputs else loss

    return LogitDistillationTrainer


# ---------------------------------------------------------------------------------------------------------------
# Agreement with the teacher


@torch.inference_mode()
def agreement(
    student: Any, teacher: Any, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str]
) -> dict[str, float | int | None]:
    """Teacher-forced on the teacher's `responses`: the share of completion positions where the student's most
    likely next token equals the teacher's (`top1_agreement`) and the mean per-token KL(teacher || student) at T=1."""
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    hits, positions, kl_sum = 0, 0, 0.0
    for prompt, response in zip(prompts, responses, strict=True):
        ids, start = rendering.completion_tokens(tokenizer, prompt, response)
        input_ids = torch.tensor([ids], device=device)
        # Position t predicts token t + 1: the completion is predicted from positions start - 1 .. len - 2.
        s = student(input_ids=input_ids, use_cache=False).logits[0, start - 1 : -1].float()
        t = teacher(input_ids=input_ids.to(next(teacher.parameters()).device), use_cache=False).logits
        t = t[0, start - 1 : -1].float().to(device)
        hits += int((s.argmax(-1) == t.argmax(-1)).sum())
        positions += s.shape[0]
        kl_sum += float(forward_kl(t, s).sum())
    student.train(was_training)
    if not positions:
        return {"top1_agreement": None, "kl_per_token": None, "tokens": 0}
    return {"top1_agreement": hits / positions, "kl_per_token": kl_sum / positions, "tokens": positions}
