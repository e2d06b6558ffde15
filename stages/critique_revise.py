"""critique_revise: the SL-CAI data loop (Bai et al. 2022, section 3).

Reads  data/curate/prompts.parquet (train split), the policy model, and the constitution's `critique_revision` and
       `critique_revision_examples` parts (only those: comparison-principle edits never rerun this stage).
Does   for every red-team prompt: the policy answers; then `rounds` times, a principle drawn at random (seeded per
       prompt, independently per round) -> the policy critiques its latest answer against it -> revises it in light
       of the critique (or, with `revision_only`, revises directly). Few-shot dialogues from the constitution go in
       front. Degenerate outputs are flagged (caiforge.collapse: loops, copies of a demo or of the critique,
       talk about the response); a collapsed revision is not built upon.
Writes data/critique_revise/revisions.parquet (every round), sft.parquet (prompt -> last usable revision, mixed with
       helpful prompts answered by the policy at `helpful_ratio`), pairs.parquet (revision pairs, caiforge.pairs:
       chosen = last usable revision, rejected = initial answer, for `preference_source: revisions` or `both`; a
       revision that is a non-answer (`pairs_drop`, caiforge.refusal) makes no pair) and
       metrics.json (drops by reason, tokens, speed).
Run    uv run dvc repro critique_revise
       uv run python stages/critique_revise.py critique_revise.rounds=1 critique_revise.max_prompts=8
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from caiforge import collapse, config, constitution, engines, io, pairs, planmode, prompts, refusal, rowcache, schemas

log = logging.getLogger("caiforge.stages.critique_revise")


@dataclass(frozen=True)
class CritiqueReviseConfig:
    prompts: str
    """prompts.parquet from curate."""
    policy: str
    """The policy model directory (data/models/policy)."""
    out_dir: str
    """Where revisions.parquet, sft.parquet, pairs.parquet and metrics.json go."""
    seed: int
    """Seeds principle draws, sampling and the helpful subset."""
    rounds: int
    """Critique/revision rounds per prompt (the paper: 4)."""
    revision_only: bool
    """Skip the critique and ask for the revision directly (the paper: as good for large models)."""
    few_shot: int
    """How many of the constitution's few-shot dialogues go in front of each request."""
    max_prompts: int | None
    """Cap on red-team train prompts (a seeded subset); null = all."""
    helpful_ratio: float
    """Helpful examples in sft.parquet per red-team example (answered by the policy, not revised)."""
    system_prompt: str | None
    """Optional system turn in front of every chat."""
    generation: engines.GenerationConfig
    """Decoding settings for answers, critiques and revisions."""
    collapse: collapse.CollapseConfig
    """Degeneracy thresholds and which flags drop a row."""
    pairs_drop: tuple[str, ...]
    """Revision pairs whose revision caiforge.refusal classifies as one of these kinds are left out of pairs.parquet
    (a non-answer preferred over an answer teaches DPO evasiveness, not harmlessness)."""
    constitution: constitution.Constitution
    """Only the critique/revision part, as declared in dvc.yaml."""
    row_cache: rowcache.RowCacheConfig
    """Where every request's answer is kept: a rerun after a principle edit runs only the rows that changed."""

    def __post_init__(self) -> None:
        config.require_caps(self, "max_prompts")
        unknown = sorted(set(self.pairs_drop) - set(refusal.KINDS))
        if unknown:
            raise ValueError(f"pairs_drop: unknown kinds {unknown}; choose from {', '.join(refusal.KINDS)}")
        if self.rounds < 1 or self.few_shot < 0 or self.helpful_ratio < 0:
            raise ValueError(
                f"rounds must be >= 1, few_shot >= 0 and helpful_ratio >= 0, got {self.rounds}, {self.few_shot}, "
                f"{self.helpful_ratio}"
            )


def subset(df: pl.DataFrame, n: int | None, rng: random.Random) -> pl.DataFrame:
    ids = df["id"].to_list()
    keep = set(ids if n is None or n >= len(ids) else rng.sample(sorted(ids), n))
    return df.filter(pl.col("id").is_in(keep)).sort("id")


def run(cfg: CritiqueReviseConfig) -> dict:
    table = io.read_parquet(cfg.prompts, schemas.PROMPTS).filter(pl.col("split") == "train")
    red = subset(table.filter(pl.col("kind") == "red_team"), cfg.max_prompts, random.Random(cfg.seed))
    if red.is_empty():
        raise ValueError(f"{cfg.prompts}: no red-team prompts in the train split (check the curate stage's sources)")
    principles = cfg.constitution.critique_revision
    examples = cfg.constitution.critique_revision_examples[: cfg.few_shot]
    parrots = [t for ex in examples for t in (ex.response, ex.critique, ex.revision)]
    cache = rowcache.RowCache.open(cfg.row_cache)
    gen = engines.make_generator(cfg.policy, cfg.generation, cache)
    fingerprint = gen.identity
    ids, texts = red["id"].to_list(), red["text"].to_list()

    first = gen.chat([prompts.answer(t, cfg.system_prompt) for t in texts], seed=cfg.seed, desc="answer")
    current = [c.text for c in first]
    # One RNG per prompt: adding prompts never changes another prompt's principles.
    drawn = [constitution.draw(principles, random.Random(f"{cfg.seed}/{pid}"), cfg.rounds) for pid in ids]
    rows, usable_round = [], [0] * len(ids)
    usable: dict[str, list[int]] = {pid: [] for pid in ids}
    current_done = [c.finished for c in first]
    for rnd in range(1, cfg.rounds + 1):
        picked = [d[rnd - 1] for d in drawn]
        crits = [None] * len(ids)
        if not cfg.revision_only:
            convs = [
                prompts.critique(t, a, p, examples, cfg.system_prompt)
                for t, a, p in zip(texts, current, picked, strict=True)
            ]
            crits = gen.chat(convs, seed=cfg.seed + 100 * rnd, desc=f"critique {rnd}/{cfg.rounds}")
        convs = [
            prompts.revision(t, a, p, c.text if c else None, examples, cfg.system_prompt)
            for t, a, p, c in zip(texts, current, picked, crits, strict=True)
        ]
        revs = gen.chat(convs, seed=cfg.seed + 100 * rnd + 1, desc=f"revise {rnd}/{cfg.rounds}")
        for i, (rev, crit, principle) in enumerate(zip(revs, crits, picked, strict=True)):
            found = collapse.revision_flags(
                rev.text,
                finished=rev.finished,
                previous=current[i],
                critique=crit.text if crit else None,
                references=[*parrots, principle.critique, principle.revision],
                cfg=cfg.collapse,
            )
            rows.append(
                {
                    "prompt_id": ids[i],
                    "prompt": texts[i],
                    "round": rnd,
                    "principle_id": principle.id,
                    "response": current[i],
                    "critique": crit.text if crit else "",
                    "revision": rev.text,
                    "flags": found,
                    "critique_tokens": crit.completion_tokens if crit else 0,
                    "revision_tokens": rev.completion_tokens,
                    "model_fingerprint": fingerprint,
                    "seed": cfg.seed,
                }
            )
            if not collapse.dropping(found, cfg.collapse):
                current[i], usable_round[i] = rev.text, rnd  # a collapsed revision is not built upon
                usable[ids[i]].append(rnd)
                current_done[i] = rev.finished
    revisions = pl.DataFrame(rows, schema=dict(schemas.REVISIONS.columns))

    dropped: Counter[str] = Counter()
    sft_rows = []
    for i, pid in enumerate(ids):
        if usable_round[i] == 0:
            final = [r["flags"] for r in rows if r["prompt_id"] == pid][-1]
            dropped[",".join(collapse.dropping(final, cfg.collapse)) or "no_usable_revision"] += 1
            continue
        sft_rows.append(
            _sft_row(pid, "red_team", texts[i], current[i], usable_round[i], cfg.system_prompt, current_done[i])
        )
    helpful = table.filter(pl.col("kind") == "helpful")
    n_helpful = min(round(cfg.helpful_ratio * len(sft_rows)), helpful.height)
    helpful = subset(helpful, n_helpful, random.Random(cfg.seed + 1))
    answers = gen.chat(
        [prompts.answer(t, cfg.system_prompt) for t in helpful["text"]], seed=cfg.seed + 1, desc="helpful"
    )
    planmode.end_of_requests()  # `caiforge plan` stops here: every request is counted
    for pid, text, ans in zip(helpful["id"], helpful["text"], answers, strict=True):
        bad = collapse.dropping(collapse.flags(ans.text, finished=ans.finished, cfg=cfg.collapse), cfg.collapse)
        if bad:
            dropped["helpful:" + ",".join(bad)] += 1
            continue
        sft_rows.append(_sft_row(pid, "helpful", text, ans.text, 0, cfg.system_prompt, ans.finished))
    sft = pl.DataFrame(sft_rows, schema=dict(schemas.SFT.columns))
    if sft.filter(pl.col("kind") == "red_team").is_empty():
        raise ValueError(f"every revision collapsed ({dict(dropped)}); nothing to train on: see revisions.parquet")

    out = Path(cfg.out_dir)
    io.write_parquet(revisions, out / "revisions.parquet", schemas.REVISIONS)
    io.write_parquet(sft, out / "sft.parquet", schemas.SFT)
    revision_pairs, pairs_dropped = [], Counter()
    for pair in pairs.revision_pairs(revisions, usable):
        kind = refusal.classify(pair["chosen"])
        if kind in cfg.pairs_drop:
            pairs_dropped[kind] += 1
        else:
            revision_pairs.append(pair)
    io.write_parquet(
        pl.DataFrame(revision_pairs, schema=dict(schemas.PREFERENCES.columns)),
        out / "pairs.parquet",
        schemas.PREFERENCES,
    )
    flag_counts = Counter(f for r in rows for f in r["flags"])
    metrics = {
        "prompts": len(ids),
        "rounds": cfg.rounds,
        "revision_rows": revisions.height,
        "sft_rows": {
            "red_team": sum(r["kind"] == "red_team" for r in sft_rows),
            "helpful": len(sft_rows) - sum(r["kind"] == "red_team" for r in sft_rows),
        },
        "revision_pairs": len(revision_pairs),
        "revision_pairs_dropped": dict(sorted(pairs_dropped.items())),
        "dropped_by_reason": dict(sorted(dropped.items())),
        "flags": {f: flag_counts.get(f, 0) for f in collapse.FLAGS},
        "collapse_rate": round(sum(bool(collapse.dropping(r["flags"], cfg.collapse)) for r in rows) / len(rows), 4),
        "mean_chars": {
            "initial": round(sum(len(a.text) for a in first) / len(first), 1),
            "critique": round(revisions["critique"].str.len_chars().mean() or 0.0, 1),
            "revision": round(revisions["revision"].str.len_chars().mean() or 0.0, 1),
        },
        "generation": gen.stats.as_dict(),
        "row_cache": rowcache.finish(cache, cfg.row_cache),
    }
    io.write_json(metrics, out / "metrics.json")
    log.info("critique_revise: %s", metrics)
    return metrics


def _sft_row(pid: str, kind: str, prompt: str, completion: str, rnd: int, system: str | None, finished: bool) -> dict:
    return {
        "prompt_id": pid,
        "kind": kind,
        "prompt": prompts.answer(prompt, system),
        "completion": [{"role": "assistant", "content": completion}],
        "round": rnd,
        "finished": finished,
    }


def main() -> None:
    config.stage_main("critique_revise", CritiqueReviseConfig, run)


if __name__ == "__main__":
    main()
