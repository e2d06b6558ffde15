"""Elo ratings from pairwise comparisons with soft outcomes, with bootstrap confidence intervals.

A `Game` says how strongly player `a` beat player `b`: `p` in [0, 1] (1 = a won, 0.5 = a draw, or a judge's
probability that a's answer is better). Ratings are the Bradley-Terry fit: P(a beats b) = sigma(s_a - s_b),
maximizing sum p log sigma(s_a - s_b) + (1 - p) log sigma(s_b - s_a) by Newton's method, with a weak Gaussian prior
(`prior`, an L2 penalty on the strengths) so that a player who wins or loses everything still gets a finite rating.
The fit is deterministic (no order dependence, unlike sequential Elo updates) and the prior centres the strengths on 0,
so the ratings have mean `base`. Strengths convert to Elo points with 400 / ln(10): a 400-point gap means 10:1 odds.

Intervals come from a percentile cluster bootstrap: games that share a `cluster` (the prompt they were played on)
are correlated, so each of `bootstrap` replicates resamples whole clusters with replacement (a game without a
cluster is its own); a game judged under several principles (`verdicts`) also redraws its principles with
replacement in every replicate, so the interval covers the judge's principle draw too. Refit, and take the
(1 - level) / 2 and (1 + level) / 2 quantiles of each player's rating. All draws come from the caller's
`random.Random`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SCALE = 400 / math.log(10)
"""Elo points per unit of logistic strength."""


@dataclass(frozen=True)
class Game:
    """One comparison: player `a` against player `b`, with `p` = how much `a` won (in [0, 1])."""

    a: str
    b: str
    p: float
    cluster: str = ""
    """What the game's outcome is correlated with (the prompt); "" = independent of every other game."""
    verdicts: tuple[float, ...] = ()
    """Per-principle outcomes whose mean is `p` (redrawn in bootstrap replicates); () = `p` is fixed."""

    def __post_init__(self) -> None:
        if not 0 <= self.p <= 1 or math.isnan(self.p):
            raise ValueError(f"game {self.a} vs {self.b}: outcome must be in [0, 1], got {self.p}")
        if any(not 0 <= v <= 1 for v in self.verdicts):
            raise ValueError(f"game {self.a} vs {self.b}: verdicts must be in [0, 1], got {self.verdicts}")
        if self.a == self.b:
            raise ValueError(f"game {self.a} vs {self.b}: a player cannot play itself")


@dataclass(frozen=True)
class Rating:
    """One player's Elo rating with its bootstrap interval."""

    elo: float
    """The fitted rating (the mean over all players is `base`)."""
    low: float
    """Lower end of the bootstrap interval (equals `elo` without bootstrap)."""
    high: float
    """Upper end of the bootstrap interval."""
    games: int
    """Games this player took part in."""

    def as_dict(self) -> dict[str, float | int]:
        return {"elo": round(self.elo, 2), "low": round(self.low, 2), "high": round(self.high, 2), "games": self.games}


def fit(
    games: Sequence[Game], players: Sequence[str], *, prior: float = 0.01, base: float = 1000.0, max_iter: int = 100
) -> dict[str, float]:
    """Bradley-Terry Elo ratings of `players` (in that order) from soft-outcome `games`; mean rating = `base`."""
    if prior <= 0:
        raise ValueError(f"prior must be > 0 (it keeps all-win/all-loss players finite), got {prior}")
    index = {name: i for i, name in enumerate(players)}
    if len(index) != len(players):
        raise ValueError(f"duplicate player names in {list(players)}")
    unknown = sorted(({g.a for g in games} | {g.b for g in games}) - set(index))
    if unknown:
        raise ValueError(f"games name players not in the player list: {unknown}")
    n = len(players)
    a = np.array([index[g.a] for g in games], dtype=np.int64)
    b = np.array([index[g.b] for g in games], dtype=np.int64)
    p = np.array([g.p for g in games], dtype=np.float64)
    s = np.zeros(n)
    for _ in range(max_iter):
        q = 1 / (1 + np.exp(-(s[a] - s[b])))
        residual = p - q
        grad = np.bincount(a, residual, n) - np.bincount(b, residual, n) - prior * s
        w = q * (1 - q)
        hess = np.diag(np.bincount(a, w, n) + np.bincount(b, w, n) + prior)
        np.add.at(hess, (a, b), -w)
        np.add.at(hess, (b, a), -w)
        # Newton step on the concave penalized log-likelihood: the Hessian above is its negative (positive definite).
        step = np.linalg.solve(hess, grad)
        s += step
        if np.max(np.abs(step)) < 1e-10:
            break
    s -= s.mean()
    return {name: base + SCALE * float(s[i]) for name, i in index.items()}


def rate(
    games: Sequence[Game],
    players: Sequence[str],
    *,
    bootstrap: int = 0,
    rng: random.Random | None = None,
    level: float = 0.95,
    prior: float = 0.01,
    base: float = 1000.0,
) -> dict[str, Rating]:
    """Fitted ratings of `players` with percentile cluster-bootstrap intervals over `bootstrap` replicates."""
    if bootstrap < 0 or not 0 < level < 1:
        raise ValueError(f"bootstrap must be >= 0 and level in (0, 1), got {bootstrap}, {level}")
    if bootstrap and rng is None:
        raise ValueError("bootstrap needs an explicit rng (random.Random(seed)) to be reproducible")
    point = fit(games, players, prior=prior, base=base)
    counts = {name: sum((g.a == name) + (g.b == name) for g in games) for name in players}
    if not bootstrap or not games:
        return {name: Rating(point[name], point[name], point[name], counts[name]) for name in players}
    assert rng is not None
    samples: dict[str, list[float]] = {name: [] for name in players}
    clusters: dict[str, list[Game]] = {}
    for i, game in enumerate(games):
        clusters.setdefault(game.cluster or f"\x00game{i}", []).append(game)
    keys = sorted(clusters)
    for _ in range(bootstrap):
        resampled = [_redraw(game, rng) for _ in keys for game in clusters[keys[rng.randrange(len(keys))]]]
        for name, value in fit(resampled, players, prior=prior, base=base).items():
            samples[name].append(value)
    lo, hi = (1 - level) / 2, (1 + level) / 2
    return {
        name: Rating(point[name], quantile(samples[name], lo), quantile(samples[name], hi), counts[name])
        for name in players
    }


def _redraw(game: Game, rng: random.Random) -> Game:
    """The game with its principles redrawn with replacement (itself when it has no per-principle verdicts)."""
    if len(game.verdicts) < 2:
        return game
    drawn = [game.verdicts[rng.randrange(len(game.verdicts))] for _ in game.verdicts]
    return Game(game.a, game.b, sum(drawn) / len(drawn), game.cluster)


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile of `values` with linear interpolation (numpy's default method)."""
    return float(np.quantile(np.asarray(values, dtype=np.float64), q))


def expected_score(elo_a: float, elo_b: float) -> float:
    """P(a beats b) for two Elo ratings: 1 / (1 + 10^((elo_b - elo_a) / 400))."""
    return 1 / (1 + 10 ** ((elo_b - elo_a) / 400))
