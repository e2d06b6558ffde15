"""label: RLAIF preference labels from AI feedback (Bai et al. 2022, section 4), with HRLAIF review.

Reads  data/curate/prompts.parquet (train split: red-team prompts, and helpful ones with `include_helpful`), the SFT
       model (samples responses), the feedback model (`data/models/feedback`; by default the same weights as the
       policy, the paper's self-feedback), the constitution's `comparison` and `comparison_examples` parts (only
       those: critique-principle edits reach this stage only through its data inputs) and, optionally, a human
       labels file (`human_labels`).
Does   samples K responses per prompt (seeded, temperature > 0); every two distinct samples make a pair (identical
       samples are skipped and counted). Per pair, M comparison principles are drawn (seeded by the pair); each is
       asked as a multiple-choice question "(A)"/"(B)" with few-shot demos in front, in both orders. The feedback
       model's next-token log-probabilities of the two option letters give P(A); averaging the two orders removes
       position bias, averaging the principles is the ensemble. Chain-of-thought mode: the feedback model reasons
       first, then the probabilities are read and clamped to `cot_band`. Pairs with low confidence or principles
       that disagree go to the review queue; human verdicts override the AI label of the pairs they prefer.
Writes data/label/comparisons.parquet (pair x principle x order, raw log-probs), preferences.parquet (soft labels,
       schemas.PREFERENCES, with critique_revise's revision pairs appended: caiforge.pairs), review_queue.parquet
       and metrics.json (label distribution, position bias before/after the swap, principle agreement, queue size,
       labels per second, tokens used).
Human labels: verdicts on pairs (caiforge.human_labels: the format; `caiforge review` writes them). A `prefer`
       verdict replaces the pair's AI label (p_chosen 1.0, label_source `human`); a tie or skip keeps the AI label.
       The default, data/seed/human_labels.jsonl, ships empty and is a declared dep; a verdict that matches no pair of
       the run is an error. metrics.json's `human_agreement` is how often the AI's label agreed with the people's
       preferences (with a 95% Wilson interval): label quality on this data, mostly on the pairs it was unsure of.
Run    uv run dvc repro label
       uv run python stages/label.py label.max_prompts=8 label.chain_of_thought=true
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from caiforge import (
    config,
    constitution,
    engines,
    human_labels,
    intervals,
    io,
    labeling,
    planmode,
    prompts,
    rowcache,
    schemas,
)

log = logging.getLogger("caiforge.stages.label")


@dataclass(frozen=True)
class LabelConfig:
    prompts: str
    """prompts.parquet from curate."""
    policy: str
    """The model that samples the responses to compare (the SFT model, data/sft/model)."""
    feedback: str
    """The feedback model that labels them (data/models/feedback)."""
    out_dir: str
    """Where the three parquet files and metrics.json go."""
    seed: int
    """Seeds the prompt subset, sampling and the principle draws."""
    samples_per_prompt: int
    """K responses per prompt (>= 2); every two distinct ones make a pair."""
    include_helpful: bool
    """Label helpful prompts too (else red-team prompts only, as in the paper's harmlessness labels)."""
    max_prompts: int | None
    """Cap on prompts (a seeded subset); null = all."""
    principles_per_pair: int
    """M distinct comparison principles per pair (the ensemble)."""
    principle_categories: dict[str, tuple[str, ...]]
    """Prompt kind -> the comparison-principle categories its pairs are judged under (red-team pairs under
    helpfulness principles would reward complying)."""
    few_shot: int
    """How many of the constitution's comparison demos go in front of each question."""
    chain_of_thought: bool
    """The feedback model writes its reasoning before the answer; probabilities are then clamped to cot_band."""
    cot_band: tuple[float, float]
    """[low, high] clamp for chain-of-thought probabilities (the paper: 0.4-0.6)."""
    review: labeling.ReviewConfig
    """When a pair goes to review_queue.parquet."""
    revision_pairs: str
    """critique_revise's pairs.parquet: appended to preferences.parquet (label_source `revision`), so the `both`
    preference source is one file (caiforge.pairs)."""
    human_labels: str
    """Human labels that override AI labels (see the module docstring): a declared dependency that always exists
    (the default ships empty), so editing it always reruns label; a label that matches no pair is an error."""
    generation: engines.GenerationConfig
    """Decoding for the K samples (temperature > 0)."""
    cot_generation: engines.GenerationConfig
    """Decoding for the feedback model's reasoning (chain-of-thought mode only); it runs on `scoring`'s engine."""
    scoring: engines.ScoringConfig
    """How the feedback model is run to score the options."""
    constitution: constitution.Constitution
    """Only the comparison part, as declared in dvc.yaml."""
    row_cache: rowcache.RowCacheConfig
    """Where every sample and question's answer is kept: a principle edit re-asks only the questions drawn
    under it."""

    def __post_init__(self) -> None:
        config.require_caps(self, "max_prompts")
        engines.decoding_only(self.cot_generation, "label.cot_generation")
        if self.samples_per_prompt < 2 or self.principles_per_pair < 1 or self.few_shot < 0:
            raise ValueError("label: samples_per_prompt must be >= 2, principles_per_pair >= 1 and few_shot >= 0")
        if self.generation.temperature <= 0:
            raise ValueError("label.generation.temperature must be > 0: greedy decoding gives K identical samples")
        kinds = ("red_team", "helpful") if self.include_helpful else ("red_team",)
        for kind in kinds:
            if kind not in self.principle_categories:
                raise ValueError(f"label.principle_categories: no entry for prompt kind {kind!r}")
            unknown = set(self.principle_categories[kind]) - set(constitution.CATEGORIES)
            if unknown:
                raise ValueError(
                    f"label.principle_categories.{kind}: unknown categories {sorted(unknown)} "
                    f"(known: {list(constitution.CATEGORIES)})"
                )
            pool = self.pool(kind)
            if len(pool) < self.principles_per_pair:
                raise ValueError(
                    f"label.principles_per_pair={self.principles_per_pair}, but the constitution has only "
                    f"{len(pool)} comparison principles in {list(self.principle_categories[kind])} for {kind} prompts"
                )
        if len(self.cot_band) != 2 or not 0 <= self.cot_band[0] <= 0.5 <= self.cot_band[1] <= 1:
            raise ValueError(f"label.cot_band must be [low, high] with 0 <= low <= 0.5 <= high <= 1: {self.cot_band}")
        if abs(self.cot_band[0] + self.cot_band[1] - 1) > 1e-9:
            raise ValueError(
                f"label.cot_band must be symmetric around 0.5 (low = 1 - high), got {list(self.cot_band)}: a lopsided "
                "clamp favours whichever slot its wide side covers"
            )

    def pool(self, kind: str) -> list[constitution.ComparisonPrinciple]:
        """The comparison principles a pair of `kind` prompts is judged under."""
        wanted = set(self.principle_categories[kind])
        return [p for p in self.constitution.comparison if p.category in wanted]


def run(cfg: LabelConfig, scorer: engines.ChoiceScorer | None = None) -> dict:
    human = human_labels.read(cfg.human_labels)
    principles = cfg.constitution.comparison
    kinds = ["red_team", "helpful"] if cfg.include_helpful else ["red_team"]
    table = io.read_parquet(cfg.prompts, schemas.PROMPTS)
    table = table.filter((pl.col("split") == "train") & pl.col("kind").is_in(kinds)).sort("id")
    if cfg.max_prompts is not None and cfg.max_prompts < table.height:
        keep = random.Random(cfg.seed).sample(table["id"].to_list(), cfg.max_prompts)
        table = table.filter(pl.col("id").is_in(keep))
    if table.is_empty():
        raise ValueError(f"{cfg.prompts}: no {' or '.join(kinds)} prompts in the train split")
    ids, texts = table["id"].to_list(), table["text"].to_list()
    kind_of = dict(zip(ids, table["kind"].to_list(), strict=True))

    cache = rowcache.RowCache.open(cfg.row_cache)
    gen = engines.make_generator(cfg.policy, cfg.generation, cache)
    convs = [prompts.answer(t) for t in texts]
    samples = [
        gen.chat(convs, seed=cfg.seed + 1000 * k, desc=f"sample {k + 1}") for k in range(cfg.samples_per_prompt)
    ]
    sampling_stats = gen.stats.as_dict()
    del gen
    pairs: list[labeling.Pair] = []
    skipped = 0
    for i, (pid, text) in enumerate(zip(ids, texts, strict=True)):
        made, n_skipped = labeling.make_pairs(pid, text, [s[i].text for s in samples])
        pairs.extend(made)
        skipped += n_skipped
    if not pairs:
        raise ValueError(f"all {cfg.samples_per_prompt} samples of every prompt were identical: nothing to label")

    drawn = {
        p.pair_id: labeling.draw_principles(p, cfg.pool(kind_of[p.prompt_id]), cfg.principles_per_pair, cfg.seed)
        for p in pairs
    }
    by_id = {p.id: p for p in principles}
    examples = cfg.constitution.comparison_examples[: cfg.few_shot]
    questions = [(pair, pr, order) for pair in pairs for pr in drawn[pair.pair_id] for order in labeling.ORDERS]
    chats = [
        labeling.comparison_turns(
            pair.prompt, *pair.slots(order), pr, examples, by_id, chain_of_thought=cfg.chain_of_thought
        )
        for pair, pr, order in questions
    ]
    scorer = scorer or engines.make_choice_scorer(cfg.feedback, cfg.scoring, cache)
    fingerprint = scorer.identity
    t0 = time.perf_counter()
    reasoning, cot_stats = [""] * len(chats), None
    if cfg.chain_of_thought:
        cot = scorer.generator(cfg.cot_generation)  # the same weights or servers: no second copy
        reasoning = [c.text for c in cot.chat(chats, seed=cfg.seed + 1, desc="reasoning")]
        cot_stats = cot.stats.as_dict()
    prefills = [labeling.answer_prefill(r if cfg.chain_of_thought else None) for r in reasoning]
    logprobs = scorer.choice_logprobs(chats, prefills)
    label_seconds = time.perf_counter() - t0
    planmode.end_of_requests()  # `caiforge plan` stops here: every request is counted

    judgements = [
        labeling.Judgement(pair.pair_id, pr.id, order, lp[0], lp[1])
        for (pair, pr, order), lp in zip(questions, logprobs, strict=True)
    ]
    band = cfg.cot_band if cfg.chain_of_thought else None
    labels = labeling.combine(judgements, band)
    consistency = labeling.pair_order_consistency(judgements)
    provenance = {"model_fingerprint": fingerprint, "seed": cfg.seed}
    comparisons = [
        {
            "prompt_id": pair.prompt_id,
            "pair_id": j.pair_id,
            "principle_id": j.principle_id,
            "order": j.order,
            "response_a": pair.slots(j.order)[0],
            "response_b": pair.slots(j.order)[1],
            "reasoning": r,
            "logprob_a": j.logprob_a,
            "logprob_b": j.logprob_b,
            "p_a": j.p_a,
            **provenance,
        }
        for (pair, _, _), j, r in zip(questions, judgements, reasoning, strict=True)
    ]
    preferences, queue, used, agreed = [], [], set(), []
    for pair in pairs:
        label, ids_ = labels[pair.pair_id], [p.id for p in drawn[pair.pair_id]]
        chosen, rejected, p = labeling.orient(pair, label.p_first)
        row = {"prompt_id": pair.prompt_id, "prompt": pair.prompt, "chosen": chosen, "rejected": rejected}
        row |= {"p_chosen": p, "confidence": abs(2 * p - 1), "principle_ids": ids_, **provenance}
        reasons = labeling.review_reasons(label, cfg.review)
        if reasons:  # queued whether or not a person has decided it: the reviewer can see and change the verdict
            per = dict(label.per_principle)
            per_chosen = [per[i] if chosen == pair.first else 1 - per[i] for i in ids_]
            queue.append(
                {**row, "pair_id": pair.pair_id, "disagreement": label.disagreement, "reasons": reasons}
                | {"principle_p_chosen": per_chosen}
            )
        verdict = human.get(labeling.pair_key(pair.prompt_id, pair.first, pair.second))
        source = "ai"
        if verdict is not None:
            used.add(verdict.key)
            if verdict.is_preference:
                agreed.append(verdict.chosen == chosen)
                row |= {"chosen": verdict.chosen, "rejected": verdict.rejected, "p_chosen": 1.0, "confidence": 1.0}
                source = "human"
        preferences.append({**row, "label_source": source, "order_consistency": consistency[pair.pair_id]})
    if len(used) < len(human):
        stale = sorted(k[0] for k in human if k not in used)
        raise human_labels.HumanLabelsError(
            f"{cfg.human_labels}: {len(stale)} human label(s) match no pair of this run (prompt_id "
            f"{', '.join(map(repr, stale[:5]))}{', ...' if len(stale) > 5 else ''}): the responses were resampled or "
            "the prompt is gone; relabel them from the new review_queue.parquet or delete them"
        )

    out = Path(cfg.out_dir)
    io.write_parquet(
        pl.DataFrame(comparisons, schema=dict(schemas.COMPARISONS.columns)),
        out / "comparisons.parquet",
        schemas.COMPARISONS,
    )
    revision_pairs = io.read_parquet(cfg.revision_pairs, schemas.PREFERENCES)
    io.write_parquet(
        pl.concat([pl.DataFrame(preferences, schema=dict(schemas.PREFERENCES.columns)), revision_pairs]),
        out / "preferences.parquet",
        schemas.PREFERENCES,
    )
    io.write_parquet(
        pl.DataFrame(queue, schema=dict(schemas.REVIEW_QUEUE.columns)),
        out / "review_queue.parquet",
        schemas.REVIEW_QUEUE,
    )
    p_chosen = [r["p_chosen"] for r in preferences if r["label_source"] == "ai"]
    bias = labeling.position_bias(judgements, band)
    if abs(bias["measured"]) > 0.1:
        log.warning(
            "label: the feedback model prefers slot %s (bias %+.3f); the order swap removes it",
            "A" if bias["measured"] > 0 else "B",
            bias["measured"],
        )
    metrics = {
        "prompts": len(ids),
        "pairs": len(pairs),
        "identical_pairs_skipped": skipped,
        "comparisons": len(comparisons),
        "label_distribution": _histogram(p_chosen),
        "label_source": dict(sorted(Counter(r["label_source"] for r in preferences).items())),
        "revision_pairs_appended": revision_pairs.height,
        "mean_p_chosen": round(sum(p_chosen) / len(p_chosen), 4) if p_chosen else None,
        "position_bias": {k: round(v, 4) + 0.0 for k, v in bias.items()},  # + 0.0: no "-0.0"
        "principle_agreement": {
            "all_agree_rate": round(sum(lb.principles_agree for lb in labels.values()) / len(labels), 4),
            "mean_disagreement": round(sum(lb.disagreement for lb in labels.values()) / len(labels), 4),
        },
        "review_queue": {
            "size": len(queue),
            **{r: sum(r in q["reasons"] for q in queue) for r in labeling.REVIEW_REASONS},
        },
        "human_labels": {
            "rows": len(human),
            "applied": len(agreed),
            **{v: sum(h.verdict == v for h in human.values()) for v in ("tie", "skip")},
            "unmatched": len(human) - len(used),
        },
        "human_agreement": {
            "pairs": len(agreed),
            "rate": round(sum(agreed) / len(agreed), 4) if agreed else None,
            "interval": intervals.wilson(agreed),
        },
        "labels_per_second": round(len(pairs) / label_seconds, 3) if label_seconds else None,
        "tokens": {"sampling": sampling_stats, "reasoning": cot_stats, "scoring": scorer.stats.as_dict()},
        "row_cache": rowcache.finish(cache, cfg.row_cache),
    }
    io.write_json(metrics, out / "metrics.json")
    log.info("label: %s", metrics)
    return metrics


def _histogram(ps: list[float]) -> dict[str, int]:
    """Counts of p_chosen in [0.5, 0.6), ..., [0.9, 1.0]."""
    bins = Counter(min(int((p - 0.5) * 10 + 1e-9), 4) for p in ps)
    return {f"{0.5 + b / 10:.1f}-{0.6 + b / 10:.1f}": bins.get(b, 0) for b in range(5)}


def main() -> None:
    config.stage_main("label", LabelConfig, run)


if __name__ == "__main__":
    main()
