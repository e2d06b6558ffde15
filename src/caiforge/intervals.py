"""95% intervals for the few-sample rates and means the stages report (PM accuracy, evaluation rates, RL reward
changes): honest at the sample sizes the CPU profiles have."""

from __future__ import annotations

import math
from collections.abc import Sequence


def wilson(hits: Sequence[bool], z: float = 1.959964) -> list[float] | None:
    """95% Wilson score interval [low, high] of a proportion of independent outcomes (None for none).

    With one outcome per prompt this is the prompt-level interval; unlike the normal approximation it stays inside
    [0, 1] and is honest at small n and at rates of 0 or 1 (8 prompts, 5 successes: [0.31, 0.86])."""
    n = len(hits)
    if not n:
        return None
    p = sum(hits) / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def mean_interval(values: Sequence[float], level: float = 0.95) -> dict[str, float | int | None]:
    """The mean of `values` (e.g. per-prompt reward changes) with its Student-t interval: `low`, `high` (None below
    two values), and `n`. With paired differences, an interval that contains 0 says the mean did not move."""
    n = len(values)
    if not n:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}
