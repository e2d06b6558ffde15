"""Preference models (PMs): the soft-label Bradley-Terry loss, its TRL trainer, calibration, scoring, policy KL.

A PM is a sequence classifier with one output (`AutoModelForSequenceClassification`, `num_labels=1`) that reads a
whole chat (user prompt + assistant response, rendered with the chat template) and returns a scalar reward at its
last token. It is trained on pairs with the Bradley-Terry objective on *soft* labels (the paper's PM targets are
the feedback model's normalized probabilities, not 0/1):

    loss = -[p log sigma(r_c - r_r) + (1 - p) log sigma(r_r - r_c)]

which is TRL's stock `RewardTrainer` loss exactly when p = 1. Training and scoring tokenize through the same
function (`encode_chat`: chat template, keep the *end* when too long, since the reward is read at the last token),
so the reward a policy is trained against equals the reward reported for it.

Later stages reuse `PreferenceModel` (load a saved PM, score chats in batches), `reward_function` (a TRL reward
callable), `evaluate_pairs` (held-out accuracy / calibration) and `sampled_kl` (a Monte-Carlo KL of a tuned policy
to its reference). TRL is imported lazily: it takes seconds to import and the pure functions do not need it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import polars as pl
import torch
import torch.nn.functional as F

from caiforge import intervals

log = logging.getLogger(__name__)

Message = dict[str, str]


# ---------------------------------------------------------------------------------------------------------------
# The objective and its metrics (pure)


def soft_bt_loss(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor, p_chosen: torch.Tensor) -> torch.Tensor:
    """Mean soft-label Bradley-Terry loss: -[p log sigma(r_c - r_r) + (1 - p) log sigma(r_r - r_c)]."""
    diff = rewards_chosen - rewards_rejected
    p = p_chosen.to(diff.dtype)
    return -(p * F.logsigmoid(diff) + (1 - p) * F.logsigmoid(-diff)).mean()


def preference_prob(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor) -> torch.Tensor:
    """The PM's probability that `chosen` is better: sigma(r_c - r_r)."""
    return torch.sigmoid(rewards_chosen - rewards_rejected)


def accuracy(
    rewards_chosen: Sequence[float], rewards_rejected: Sequence[float], p_chosen: Sequence[float]
) -> float | None:
    """Share of pairs ranked like the label (r_c > r_r), over pairs whose label prefers one side (p != 0.5)."""
    hits = ranked_like_label(rewards_chosen, rewards_rejected, p_chosen)
    return sum(hits) / len(hits) if hits else None


def ranked_like_label(
    rewards_chosen: Sequence[float], rewards_rejected: Sequence[float], p_chosen: Sequence[float]
) -> list[bool]:
    """Per pair whose label prefers one side (p != 0.5): whether the PM ranks it like the label."""
    return [
        (rc > rr) == (p > 0.5)
        for rc, rr, p in zip(rewards_chosen, rewards_rejected, p_chosen, strict=True)
        if p != 0.5
    ]


def expected_calibration_error(predicted: Sequence[float], target: Sequence[float], bins: int = 10) -> float | None:
    """ECE against soft targets: sum over equal-width bins of predicted prob of (share of rows) * |mean q - mean p|."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if not predicted:
        return None
    groups: dict[int, list[tuple[float, float]]] = {}
    for q, p in zip(predicted, target, strict=True):
        groups.setdefault(min(int(q * bins), bins - 1), []).append((q, p))
    total = len(predicted)
    return sum(
        len(rows) / total * abs(sum(q for q, _ in rows) / len(rows) - sum(p for _, p in rows) / len(rows))
        for rows in groups.values()
    )


def evaluate_pairs(
    rewards_chosen: Sequence[float], rewards_rejected: Sequence[float], p_chosen: Sequence[float], bins: int = 10
) -> dict[str, float | None]:
    """Held-out PM quality: soft BT loss, accuracy with its 95% Wilson interval and the pairs it rests on (those
    whose label prefers a side), ECE against the soft labels, mean reward margin (None if empty)."""
    if not p_chosen:
        return {"loss": None, "accuracy": None, "accuracy_ci95": None, "accuracy_pairs": 0, "ece": None,
                "mean_margin": None}  # fmt: skip
    rc, rr, p = (torch.tensor(list(x), dtype=torch.float64) for x in (rewards_chosen, rewards_rejected, p_chosen))
    hits = ranked_like_label(rewards_chosen, rewards_rejected, p_chosen)
    return {
        "loss": float(soft_bt_loss(rc, rr, p)),
        "accuracy": sum(hits) / len(hits) if hits else None,
        "accuracy_ci95": intervals.wilson(hits),
        "accuracy_pairs": len(hits),
        "ece": expected_calibration_error(preference_prob(rc, rr).tolist(), list(p_chosen), bins),
        "mean_margin": float((rc - rr).mean()),
    }


# ---------------------------------------------------------------------------------------------------------------
# Tokenization shared by training and scoring


def chat(prompt: str, response: str) -> list[Message]:
    """The two-turn chat a PM reads."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def encode_chat(tokenizer: Any, messages: Sequence[Message], max_length: int) -> list[int]:
    """Token ids of a rendered chat, keeping the last `max_length` tokens (the reward is read at the end). Message
    text never becomes a control token: an answer spelling `<|im_end|>` cannot end its turn early (see
    `engines.rendering.neutralize`)."""
    from caiforge.engines.rendering import encode, render_chat

    return encode(tokenizer, render_chat(tokenizer, messages, open_turn=False))[-max_length:]


def pair_dataset(rows: pl.DataFrame, tokenizer: Any, max_length: int) -> Any:
    """A tokenized `datasets.Dataset` (chosen_ids, rejected_ids, p_chosen) from preference rows."""
    from datasets import Dataset

    prompts = rows["prompt"].to_list()
    return Dataset.from_dict(
        {
            "chosen_ids": [
                encode_chat(tokenizer, chat(p, c), max_length) for p, c in zip(prompts, rows["chosen"], strict=True)
            ],
            "rejected_ids": [
                encode_chat(tokenizer, chat(p, r), max_length) for p, r in zip(prompts, rows["rejected"], strict=True)
            ],
            "p_chosen": rows["p_chosen"].to_list(),
        }
    )


# ---------------------------------------------------------------------------------------------------------------
# Training: TRL's RewardTrainer with soft labels


@functools.cache
def soft_label_trainer_class() -> type:
    """`SoftLabelRewardTrainer`: TRL's RewardTrainer whose loss is `soft_bt_loss` on a per-pair `p_chosen` column.

    Built on first use so that importing this module does not import TRL. The collator carries `p_chosen` next to
    TRL's chosen/rejected batch; TRL's own metrics (accuracy, margin, rewards) are kept, only the loss changes.
    """
    from dataclasses import dataclass

    from trl.trainer.reward_trainer import DataCollatorForPreference, RewardTrainer

    @dataclass
    class SoftLabelCollator(DataCollatorForPreference):
        def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            out = super().torch_call(examples)
            out["p_chosen"] = torch.tensor([e["p_chosen"] for e in examples], dtype=torch.float32)
            return out

    class SoftLabelRewardTrainer(RewardTrainer):
        def __init__(self, *args: Any, processing_class: Any, **kwargs: Any) -> None:
            pad_id = processing_class.pad_token_id
            if pad_id is None:
                raise ValueError("the PM tokenizer has no pad token (caiforge.models.save sets one)")
            kwargs.setdefault("data_collator", SoftLabelCollator(pad_token_id=pad_id))
            super().__init__(*args, processing_class=processing_class, **kwargs)

        def _set_signature_columns_if_needed(self) -> None:
            if self._signature_columns is None:
                self._signature_columns = ["chosen_ids", "rejected_ids", "p_chosen"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            p_chosen = inputs.pop("p_chosen")
            _, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            rewards_chosen, rewards_rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
            loss = soft_bt_loss(rewards_chosen, rewards_rejected, p_chosen)
            if self.args.center_rewards_coefficient is not None:
                loss = loss + self.args.center_rewards_coefficient * torch.mean(
                    (rewards_chosen + rewards_rejected) ** 2
                )
            return (loss, outputs) if return_outputs else loss

    return SoftLabelRewardTrainer


def init_from_causal_lm(model_dir: str | Path, *, seed: int, attention: str | None = None) -> tuple[Any, Any]:
    """A 1-output sequence classifier on top of a causal LM's weights, with its tokenizer; the new head is seeded.
    `attention` is transformers' `attn_implementation` (None: its default)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from caiforge import models

    path = models.resolve(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized" is the point, not a warning
    try:
        with torch.random.fork_rng(devices=[]), models.quiet_progress():
            torch.manual_seed(seed)
            kwargs = {"attn_implementation": attention} if attention else {}
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=torch.float32, use_safetensors=True, **kwargs
            )
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Scoring with a trained PM


class PreferenceModel:
    """A loaded PM that scores chats in batches (the reward of the last turn given the ones before it)."""

    def __init__(self, model: Any, tokenizer: Any, *, max_length: int, batch_size: int) -> None:
        if max_length < 1 or batch_size < 1:
            raise ValueError(f"max_length and batch_size must be >= 1, got {max_length}, {batch_size}")
        if model.config.pad_token_id is None:
            raise ValueError("the PM config has no pad_token_id: it could not find the last token of a padded row")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size

    @classmethod
    def from_dir(
        cls, model_dir: str | Path, *, max_length: int, batch_size: int, device: str = "auto", dtype: str = "auto"
    ) -> PreferenceModel:
        """Load a PM saved by the `pm` stage; device/dtype `auto` = bf16 on CUDA, fp32 on CPU."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from caiforge import models
        from caiforge.engines import hf

        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no preference model there (is the `pm` stage built? try `dvc repro pm`)")
        device, torch_dtype = hf.resolve_device(device, dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        with models.quiet_progress():
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch_dtype, use_safetensors=True)
        if model.config.num_labels != 1:
            raise ValueError(f"{path}: a PM has one output, this model has num_labels={model.config.num_labels}")
        return cls(model.to(device), tokenizer, max_length=max_length, batch_size=batch_size)

    @torch.inference_mode()
    def score_chats(self, chats: Sequence[Sequence[Message]]) -> list[float]:
        """One reward per chat, in order (float32 values, whatever the model's dtype)."""
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        pad = self.model.config.pad_token_id
        encoded = [encode_chat(self.tokenizer, c, self.max_length) for c in chats]
        # Similar lengths share a batch, so right padding wastes little; results go back in input order.
        order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
        scores = [0.0] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i], dtype=torch.long)
                mask[row, : len(encoded[i])] = 1
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            for i, value in zip(batch, logits[:, 0].float().tolist(), strict=True):
                scores[i] = value
        self.model.train(was_training)
        return scores

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Rewards of single-turn (user prompt, assistant response) pairs."""
        return self.score_chats([chat(p, r) for p, r in zip(prompts, responses, strict=True)])


def reward_function(pm: PreferenceModel) -> Callable[..., list[float]]:
    """A TRL reward callable (GRPOTrainer / RLOOTrainer `reward_funcs`) that scores completions with `pm`.

    A callable rather than TRL's own "reward model path" support, because (1) it tokenizes exactly as the PM was
    trained and evaluated (`encode_chat`, end kept), where TRL's path neither truncates nor lets us choose; (2) the
    PM gets its own device/dtype instead of the policy's `model_init_kwargs`; (3) the reward reported before/after
    training comes from the very same function.
    """

    def pm_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        chats = []
        for prompt, completion in zip(prompts, completions, strict=True):
            if isinstance(prompt, str) or isinstance(completion, str):
                raise TypeError("pm_reward expects conversational prompts and completions (lists of messages)")
            chats.append([*prompt, *completion])
        return pm.score_chats(chats)

    return pm_reward


# ---------------------------------------------------------------------------------------------------------------
# KL of a tuned policy to its reference


def _token_logprobs(model: Any, ids: list[int], start: int) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= start, under `model`, on CPU (one forward over the whole sequence)."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    logits = model(input_ids=input_ids, use_cache=False).logits[0, start - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, input_ids[0, start:, None])[:, 0].cpu()


@torch.inference_mode()
def sampled_kl(
    policy: Any,
    reference: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    seed: int,
    max_new_tokens: int,
    batch_size: int = 8,
) -> dict[str, Any]:
    """KL(policy || reference) by Monte Carlo: per prompt, one answer sampled from the policy at temperature 1 (no
    top-k / top-p, the distribution the KL is about), and the sum over its token ids of log p_policy - log
    p_reference, read on those very ids (no decoding and re-tokenising). The mean of those sums is an unbiased
    estimate of the sequence-level KL of answers up to `max_new_tokens`; `truncated` is the share of answers that
    reached the cap without ending (raise the cap when it is not 0). Both models must share `tokenizer`. Answers
    are sampled up to `batch_size` at a time by the generation engine (each row with its own seeded generator; no
    filler rows when there are fewer prompts: nothing here is cached, so batch invariance buys nothing).
    """
    from caiforge.engines import GenerationConfig
    from caiforge.engines.hf import TransformersGenerator

    device = str(next(policy.parameters()).device)
    cfg = GenerationConfig(
        batch_size=max(1, min(batch_size, len(prompts))),
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        progress=False,
    )
    sampler = TransformersGenerator(policy, tokenizer, cfg, device=device)
    per_sequence, diffs, truncated = [], [], 0
    for head, new in sampler.sample_ids([chat(p, "")[:1] for p in prompts], seed=seed):
        truncated += new[-1] not in sampler.stop_ids
        d = _token_logprobs(policy, head + new, len(head)) - _token_logprobs(reference, head + new, len(head))
        diffs.append(d)
        per_sequence.append(float(d.sum()))
    if not diffs:
        return {"kl_per_token": None, "kl_per_sequence": None, "tokens": 0, "truncated": None}
    pooled = torch.cat(diffs)
    return {
        "kl_per_token": float(pooled.mean()),
        "kl_per_sequence": sum(per_sequence) / len(per_sequence),
        "tokens": int(pooled.numel()),
        "truncated": truncated / len(prompts),
        "decoding": "sampled from the policy, temperature 1, no top-k/top-p",
        "max_new_tokens": max_new_tokens,
    }
