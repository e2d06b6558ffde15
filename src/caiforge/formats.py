"""Polars tables <-> the `datasets` formats TRL trainers take, and stable hash-based row selection."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import polars as pl


def to_dataset(df: pl.DataFrame, columns: Sequence[str]) -> Any:
    """A `datasets.Dataset` with `columns` of `df` (chat columns stay lists of {role, content} dicts)."""
    from datasets import Dataset

    return Dataset.from_list(df.select(columns).to_dicts())


def completion_dataset(
    tokenizer: Any, prompts: Sequence[Sequence[dict]], completions: Sequence[str], finished: Sequence[bool]
) -> Any:
    """A tokenized `datasets.Dataset` (input_ids, completion_mask) of chat prompt -> assistant completion.

    A finished completion ends with the chat template's end-of-turn (the model learns to stop there); an unfinished
    one (it hit the token cap) does not: training on it as complete would teach the model to stop mid-sentence.
    The prompt is rendered as every engine renders it (message text never becomes a control token).
    """
    from datasets import Dataset

    from caiforge.engines.rendering import encode, neutralize, render_chat

    if not len(prompts) == len(completions) == len(finished):
        raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions, {len(finished)} finished flags")
    rows: dict[str, list] = {"input_ids": [], "completion_mask": []}
    for prompt, completion, done in zip(prompts, completions, finished, strict=True):
        head = render_chat(tokenizer, prompt)
        text = neutralize(tokenizer, completion)
        if done:
            full = render_chat(tokenizer, [*prompt, {"role": "assistant", "content": completion}], open_turn=False)
            if not full.startswith(head) or text not in full[len(head) :]:
                raise ValueError("the chat template does not render the assistant turn after its generation prompt")
            text = full[len(head) :]
        prompt_ids, completion_ids = encode(tokenizer, head), encode(tokenizer, text)
        rows["input_ids"].append(prompt_ids + completion_ids)
        rows["completion_mask"].append([0] * len(prompt_ids) + [1] * len(completion_ids))
    return Dataset.from_dict(rows)


def stable_fraction(key: str, salt: str) -> float:
    """A number in [0, 1) fixed by `key` and `salt` alone (so adding rows never moves other rows)."""
    digest = hashlib.sha256(f"{salt}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def stable_mask(ids: Iterable[str], fraction: float, salt: str = "heldout") -> pl.Series:
    """True for about `fraction` of `ids`, chosen by hash: stable under adding or removing other ids."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    return pl.Series([stable_fraction(i, salt) < fraction for i in ids], dtype=pl.Boolean)
