"""Detect degenerate generations: the small-model failure mode the CAI paper warns about.

A text gets zero or more flags; a stage decides which flags drop a row and records the reasons, never silently.

- `empty`: nothing (or next to nothing) was generated;
- `repetition`: too large a share of its word n-grams repeat an earlier n-gram (loops like "I'm sorry. I'm sorry.");
- `unchanged`: a revision that equals the response it was meant to revise (after whitespace/case normalization);
- `runaway`: the model never emitted its end token and hit the token cap;
- `copied`: most of its word n-grams come from a reference text (small models parrot their few-shot examples, and a
  revision its own critique);
- `meta`: it opens by talking about a response ("The response offered to help ...", "My revised response ...")
  instead of being one. SmolLM2-135M writes such a critique-shaped "revision" for most red-team prompts, and SFT
  learns the template (README, "What cpu_study measured"). A heuristic on the opening words, checked on those rows.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

Flag = Literal["empty", "repetition", "unchanged", "runaway", "copied", "meta"]
FLAGS: tuple[Flag, ...] = ("empty", "repetition", "unchanged", "runaway", "copied", "meta")

# "The response ...", "In your previous reply ...", "My revised response ...", "The assistant's critique ...".
_META = re.compile(
    r"^\W*(?:in\s+)?(?:the|my|your|this|that|its)\s+"
    r"(?:(?:assistant'?s?|ai'?s?|model'?s?|previous|original|revised|rewritten|last|above|initial|first|new)\s+)*"
    r"(?:response|reply|critique|revision)s?\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class CollapseConfig:
    """Thresholds for the degeneracy flags and which flags drop a row."""

    ngram: int = 4
    """Word n-gram size for the repetition check."""
    max_repeated_fraction: float = 0.3
    """Flag `repetition` when more than this share of n-grams repeat an earlier one."""
    min_chars: int = 2
    """Flag `empty` below this many non-space characters."""
    max_copied_fraction: float = 0.5
    """Flag `copied` when more than this share of n-grams occur in one reference text (e.g. a few-shot example)."""
    drop_on: tuple[Flag, ...] = ("empty", "repetition", "unchanged", "copied", "meta")
    """Flags that make a row unusable for training. `runaway` alone (a long but sane answer) is kept by default."""

    def __post_init__(self) -> None:
        if self.ngram < 1 or not 0 <= self.max_repeated_fraction <= 1:
            raise ValueError(f"collapse.ngram must be >= 1 and max_repeated_fraction in [0, 1], got {self}")


def _words(text: str) -> list[str]:
    return text.lower().split()


def repeated_ngram_fraction(text: str, n: int) -> float:
    """Share of the word n-grams in `text` that already occurred earlier in it (0 for texts shorter than n)."""
    words = _words(text)
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct word n-grams over all n-grams across `texts` (diversity; low values mean collapse)."""
    grams = [tuple(w[i : i + n]) for w in map(_words, texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def copied_fraction(text: str, reference: str, n: int) -> float:
    """Share of the word n-grams of `text` that also occur in `reference` (0 for texts shorter than n)."""
    words, ref = _words(text), _words(reference)
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    known = {tuple(ref[i : i + n]) for i in range(len(ref) - n + 1)}
    return sum(g in known for g in grams) / len(grams)


def _same(a: str, b: str) -> bool:
    return " ".join(_words(a)) == " ".join(_words(b))


def flags(
    text: str,
    *,
    finished: bool,
    previous: str | None = None,
    references: Sequence[str] = (),
    cfg: CollapseConfig,
) -> list[Flag]:
    """The degeneracy flags of one generated text.

    `previous` is the text a revision was meant to change; `references` are texts the model must not parrot.
    """
    out: list[Flag] = []
    if len(text.strip()) < cfg.min_chars:
        out.append("empty")
    if repeated_ngram_fraction(text, cfg.ngram) > cfg.max_repeated_fraction:
        out.append("repetition")
    if previous is not None and _same(text, previous):
        out.append("unchanged")
    if not finished:
        out.append("runaway")
    if any(copied_fraction(text, ref, cfg.ngram) > cfg.max_copied_fraction for ref in references):
        out.append("copied")
    if is_meta(text):
        out.append("meta")
    return out


LOOP_COPIES = 3
"""A word n-gram that occurs this often makes repetitive text a loop (a sentence said twice is not one)."""


def max_ngram_count(text: str, n: int) -> int:
    """How often the most frequent word n-gram of `text` occurs (0 for texts shorter than n)."""
    words = _words(text)
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return max(counts.values(), default=0)


def degenerate(text: str, cfg: CollapseConfig | None = None) -> bool:
    """Empty or looping text: in evaluation its own outcome, never a refusal, an evasion or an attack.

    Empty is the `empty` flag. Looping is the `repetition` flag (more than `max_repeated_fraction` of the word
    n-grams repeat an earlier one) with some n-gram occurring at least `LOOP_COPIES` times: "which, which, which"
    and "a guide I'm not a guide I'm not a guide" loop, while a refusal that repeats itself once (every n-gram at
    most twice, up to half of them repeated) is still a refusal."""
    cfg = cfg or CollapseConfig()
    if len(text.strip()) < cfg.min_chars:
        return True
    return (
        repeated_ngram_fraction(text, cfg.ngram) > cfg.max_repeated_fraction
        and max_ngram_count(text, cfg.ngram) >= LOOP_COPIES
    )


def revision_flags(
    text: str, *, finished: bool, previous: str, critique: str | None, references: Sequence[str], cfg: CollapseConfig
) -> list[Flag]:
    """The flags of one revision: it must change `previous` and must not parrot its own `critique` or any of the
    `references` (the few-shot demos, the critique and revision requests)."""
    found = [*references, critique] if critique else list(references)
    return flags(text, finished=finished, previous=previous, references=found, cfg=cfg)


def is_meta(text: str) -> bool:
    """True when `text` opens by talking about a response, critique or revision instead of answering."""
    return _META.match(text) is not None


def dropping(found: Sequence[str], cfg: CollapseConfig) -> list[str]:
    """The subset of `found` flags that make the row unusable under `cfg.drop_on`."""
    return [f for f in found if f in cfg.drop_on]
