"""Bradley-Terry Elo with soft outcomes: recovers known strengths, honest intervals, reproducible."""

from __future__ import annotations

import random

import pytest

from caiforge import elo

TRUTH = {"rl": 1150.0, "sft": 1050.0, "student": 950.0, "base": 850.0}  # mean 1000, like the fit


def synthetic_games(rng: random.Random, per_pair: int = 60, soft: bool = False) -> list[elo.Game]:
    names = list(TRUTH)
    games = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            expected = elo.expected_score(TRUTH[a], TRUTH[b])
            for k in range(per_pair):
                # Alternate sides, so the fit cannot lean on who is listed first.
                p = expected if soft else float(rng.random() < expected)
                games.append(elo.Game(a, b, p) if k % 2 else elo.Game(b, a, 1 - p))
    return games


def test_soft_outcomes_at_the_expected_score_recover_the_truth():
    ratings = elo.fit(synthetic_games(random.Random(0), soft=True), list(TRUTH), prior=1e-6)
    for name, value in TRUTH.items():
        assert ratings[name] == pytest.approx(value, abs=0.5)


def test_sampled_games_recover_ordering_and_intervals_cover_the_truth():
    games = synthetic_games(random.Random(1))
    ratings = elo.rate(games, list(TRUTH), bootstrap=200, rng=random.Random(7))
    assert sorted(TRUTH, key=lambda n: ratings[n].elo) == sorted(TRUTH, key=TRUTH.get)
    assert sum(r.elo for r in ratings.values()) / len(ratings) == pytest.approx(1000)
    for name, rating in ratings.items():
        assert rating.low < rating.elo < rating.high
        assert rating.low <= TRUTH[name] <= rating.high, (name, rating)
        assert rating.games == 3 * 60
        assert rating.high - rating.low < 200, "180 games per player pin a rating down to well under 200 points"


def test_same_seed_same_result_other_seed_other_intervals():
    games = synthetic_games(random.Random(2), per_pair=20)
    first = elo.rate(games, list(TRUTH), bootstrap=50, rng=random.Random(3))
    assert elo.rate(games, list(TRUTH), bootstrap=50, rng=random.Random(3)) == first
    other = elo.rate(games, list(TRUTH), bootstrap=50, rng=random.Random(4))
    assert {n: r.elo for n, r in other.items()} == {n: r.elo for n, r in first.items()}
    assert other != first


def test_fit_does_not_depend_on_game_order():
    games = synthetic_games(random.Random(5), per_pair=10)
    shuffled = games[:]
    random.Random(0).shuffle(shuffled)
    a, b = elo.fit(games, list(TRUTH)), elo.fit(shuffled, list(TRUTH))
    assert a == pytest.approx(b)


def test_sweeps_stay_finite_and_draws_are_equal():
    sweep = [elo.Game("a", "b", 1.0)] * 10
    ratings = elo.fit(sweep, ["a", "b"])
    assert 1000 < ratings["a"] < 5000 and ratings["a"] + ratings["b"] == pytest.approx(2000)
    draws = elo.fit([elo.Game("a", "b", 0.5)] * 4, ["a", "b", "idle"])
    assert draws == pytest.approx({"a": 1000, "b": 1000, "idle": 1000})


def test_no_games_gives_the_base_rating():
    ratings = elo.rate([], ["a", "b"], bootstrap=10, rng=random.Random(0))
    assert ratings["a"].as_dict() == {"elo": 1000.0, "low": 1000.0, "high": 1000.0, "games": 0}


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        elo.Game("a", "b", 1.5)
    with pytest.raises(ValueError, match="itself"):
        elo.Game("a", "a", 0.5)
    with pytest.raises(ValueError, match="not in the player list.*'c'"):
        elo.fit([elo.Game("a", "c", 1.0)], ["a", "b"])
    with pytest.raises(ValueError, match="explicit rng"):
        elo.rate([elo.Game("a", "b", 1.0)], ["a", "b"], bootstrap=5)


def test_correlated_games_of_one_prompt_widen_the_interval():
    """Three games per prompt with the same outcome are one piece of evidence, not three: resampling prompts gives
    a wider interval than resampling games as if they were independent."""
    outcomes = [0.9, 0.2, 0.8, 0.7, 0.3, 0.9, 0.6, 0.8]

    def games(clustered: bool) -> list[elo.Game]:
        return [
            elo.Game("x", "y", p, cluster=f"prompt{i}" if clustered else "")
            for i, p in enumerate(outcomes)
            for _ in range(3)
        ]

    width = {}
    for clustered in (False, True):
        r = elo.rate(games(clustered), ["x", "y"], bootstrap=400, rng=random.Random(0))["x"]
        width[clustered] = r.high - r.low
    assert width[True] > 1.4 * width[False]


def test_principle_draws_are_redrawn_in_each_replicate():
    """Two games that average to the same p: principles that disagree (0.95 vs 0.05) leave more doubt than
    principles that agree, so the interval is wider."""

    def games(verdicts: tuple[float, float]) -> list[elo.Game]:
        return [elo.Game("x", "y", sum(verdicts) / 2, cluster=f"p{i}", verdicts=verdicts) for i in range(6)]

    agree = elo.rate(games((0.6, 0.6)), ["x", "y"], bootstrap=300, rng=random.Random(1))["x"]
    split = elo.rate(games((0.95, 0.25)), ["x", "y"], bootstrap=300, rng=random.Random(1))["x"]
    assert agree.elo == pytest.approx(split.elo)
    assert split.high - split.low > agree.high - agree.low + 10
    with pytest.raises(ValueError, match="verdicts must be in"):
        elo.Game("x", "y", 0.5, verdicts=(1.5, -0.5))
