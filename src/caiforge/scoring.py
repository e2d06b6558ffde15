"""Score text with a model instead of sampling from it: log-probabilities of multiple-choice answers.

Choice scoring (the AI-feedback labeller, Bai et al. 2022 section 4): a conversation ends in a question, the
assistant turn is pre-filled with text that ends right where the answer letter goes (e.g. "The answer is: ("), and
the scorer returns the log-probability of each option ("A", "B", ...) as the model's next token(s).

Tokenization is where this goes wrong in practice, so the option tokens are found the way the model would emit them:
the scorer tokenizes `prompt + option` for every option and takes the longest token prefix they all share as the
context. Usually that is the prompt itself and each option is one more token ("(" then "A"); when a tokenizer merges
the last prompt character with the letter ("(A" as one token) the context is one token shorter and the merged tokens
are the options. Either way, when every option is a single token after the context, one forward pass reads them all
(the fast path); otherwise each option is scored as a sequence (sum of its tokens' log-probabilities).

Stages depend on the `ChoiceScorer` protocol, so tests inject fakes and other backends can be added without
touching stages. Preference-model scoring is meant to live here too, beside choice scoring.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from caiforge.generation import Message, Stats, load_for_inference

log = logging.getLogger(__name__)

OPTIONS = ("A", "B")
"""Option letters of a two-way comparison, in slot order."""


@dataclass(frozen=True)
class ScoringConfig:
    """How to run a scoring model."""

    batch_size: int = 8
    """Sequences per forward pass (grouped by length, left-padded)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when available, else CPU."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: bfloat16 on CUDA, float32 on CPU (log-softmax is always taken in float32)."""
    progress: bool = True
    """Show a progress bar on stderr."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


class ChoiceScorer(Protocol):
    """What the labeller calls: one tuple of option log-probs per (conversation, prefill), in input order."""

    stats: Stats

    def choice_logprobs(
        self,
        conversations: Sequence[Sequence[Message]],
        prefills: Sequence[str],
        options: Sequence[str] = OPTIONS,
    ) -> list[tuple[float, ...]]: ...


@dataclass(frozen=True)
class OptionPlan:
    """How one prompt's options are read: a shared context and each option's continuation tokens."""

    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]

    @property
    def single_token(self) -> bool:
        return all(len(c) == 1 for c in self.continuations)


def plan_options(tokenizer: Any, text: str, options: Sequence[str]) -> OptionPlan:
    """Tokenize `text + option` for each option; split into the common token prefix and per-option continuations."""
    if len(set(options)) != len(options) or len(options) < 2:
        raise ValueError(f"options must be at least two distinct strings, got {list(options)}")
    full = [tokenizer(text + opt, add_special_tokens=False)["input_ids"] for opt in options]
    common = 0
    while all(len(f) > common for f in full) and len({f[common] for f in full}) == 1:
        common += 1
    if common == 0:
        raise ValueError("the prompt shares no tokens with its options; cannot score (is the prompt empty?)")
    conts = tuple(tuple(f[common:]) for f in full)
    if any(not c for c in conts):
        raise ValueError(f"options {list(options)} tokenize identically after the prompt; cannot tell them apart")
    return OptionPlan(tuple(full[0][:common]), conts)


@dataclass(frozen=True)
class _Row:
    """One sequence to run: `ids`, and the (request, option, continuation) read from it."""

    ids: tuple[int, ...]
    reads: tuple[tuple[int, int, tuple[int, ...]], ...]
    start: int
    """Index in `ids` of the first continuation token (= len(context))."""


class TransformersChoiceScorer:
    """Choice scoring with a local Hugging Face causal LM: batched, length-grouped, left-padded, deterministic."""

    def __init__(self, model: Any, tokenizer: Any, cfg: ScoringConfig, device: str = "cpu") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.device = device
        self.stats = Stats()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token to pad batches with")
        self.pad_id = pad

    @classmethod
    def from_dir(cls, model_dir: str | Path, cfg: ScoringConfig) -> TransformersChoiceScorer:
        model, tokenizer, device = load_for_inference(model_dir, cfg.device, cfg.dtype)
        return cls(model, tokenizer, cfg, device)

    def render(self, conversation: Sequence[Message], prefill: str) -> str:
        """The chat template with an open assistant turn, followed by the pre-filled start of the answer."""
        text = self.tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=True)
        return text + prefill

    def choice_logprobs(
        self,
        conversations: Sequence[Sequence[Message]],
        prefills: Sequence[str],
        options: Sequence[str] = OPTIONS,
    ) -> list[tuple[float, ...]]:
        if len(conversations) != len(prefills):
            raise ValueError(f"{len(conversations)} conversations but {len(prefills)} prefills")
        rows: list[_Row] = []
        for req, (conv, prefill) in enumerate(zip(conversations, prefills, strict=True)):
            plan = plan_options(self.tokenizer, self.render(conv, prefill), options)
            start = len(plan.context)
            if plan.single_token:
                reads = tuple((req, o, c) for o, c in enumerate(plan.continuations))
                rows.append(_Row(plan.context, reads, start))
            else:
                for o, c in enumerate(plan.continuations):
                    rows.append(_Row(plan.context + c[:-1], ((req, o, c),), start))
        out = [[0.0] * len(options) for _ in conversations]
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].ids), i))
        from tqdm.auto import tqdm

        with tqdm(total=len(rows), desc="score", unit="row", disable=not self.cfg.progress, mininterval=2.0) as bar:
            for begin in range(0, len(order), self.cfg.batch_size):
                batch = [rows[i] for i in order[begin : begin + self.cfg.batch_size]]
                t0 = time.perf_counter()
                for req, opt, value in self._score(batch):
                    out[req][opt] = value
                self.stats.seconds += time.perf_counter() - t0
                self.stats.rows += len(batch)
                self.stats.prompt_tokens += sum(len(r.ids) for r in batch)
                bar.update(len(batch))
        return [tuple(v) for v in out]

    @torch.inference_mode()
    def _score(self, batch: list[_Row]) -> list[tuple[int, int, float]]:
        width = max(len(r.ids) for r in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):
            input_ids[i, width - len(row.ids) :] = torch.tensor(row.ids, dtype=torch.long)
            attention[i, width - len(row.ids) :] = 1
        # Positions count real tokens only, as in generate(): left padding must not shift a row's positions.
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            position_ids=positions.to(self.device),
        ).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        out = []
        for i, row in enumerate(batch):
            pad = width - len(row.ids)
            for req, opt, cont in row.reads:
                # Token t of the unpadded row is predicted at position t - 1.
                total = sum(float(logprobs[i, pad + row.start - 1 + k, tok]) for k, tok in enumerate(cont))
                out.append((req, opt, total))
        return out


def make_choice_scorer(model_dir: str | Path, cfg: ScoringConfig) -> TransformersChoiceScorer:
    """The choice scorer serving the model in `model_dir`."""
    return TransformersChoiceScorer.from_dir(model_dir, cfg)
