"""How an answer reads to a reference model: its surprise, the mean negative log-likelihood per answer token (nats).

A damaged model (a depth-pruned student before healing) writes gibberish: "zeb dehyd:zeb dehyd =ze.ah.ah.ah". It is
diverse and does not loop, so neither distinct-n nor `collapse.degenerate` catches it; a working reference model
finds it far less likely than the answers of any model that still talks (README, "Distillation, evaluation and the
report").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from caiforge import distillation


@torch.no_grad()
def surprise(model: Any, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str]) -> list[float | None]:
    """Per (prompt, answer): the mean negative log-likelihood `model` gives the answer's tokens (the end of the turn
    included), teacher-forced after the prompt, both rendered as one user turn and the assistant's reply by the chat
    template (`distillation.completion_tokens`); None for an empty answer."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[float | None] = []
    for prompt, answer in zip(prompts, answers, strict=True):
        ids, start = distillation.completion_tokens(tokenizer, prompt, answer)
        if not answer.strip() or len(ids) <= start:
            out.append(None)
            continue
        input_ids = torch.tensor([ids], device=device)
        logits = model(input_ids=input_ids, use_cache=False).logits[0, start - 1 : -1].float()
        out.append(float(F.cross_entropy(logits, input_ids[0, start:])))
    model.train(was_training)
    return out
