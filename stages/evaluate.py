"""evaluate: harmlessness, helpfulness and evasiveness of every model in the chain, and the report.

Reads  data/curate/prompts.parquet (eval split only: prompts no stage trained on), every model of the chain (base
       policy, SFT, RL, student), the judge (the feedback model), the PM, the constitution's comparison part,
       revisions/comparisons (per-principle table), known-answer comparisons (data/seed/label_quality.jsonl and an
       optional HHH-style JSONL), and every earlier stage's metrics.json (cost accounting).
Does   every model answers every eval prompt (greedy). Then: Elo for harmlessness (red-team prompts, harmlessness
       principles) and helpfulness (helpful prompts, helpfulness principles) from pairwise AI-judge comparisons in
       both orders, with bootstrap intervals; refusal / deflection / transparent rates (deterministic phrase
       detector); attack success rate by an independent embedding classifier (not the feedback model); collapse
       (repetition, distinct-n); PM score per model; per-principle table; the judge's accuracy on known answers;
       cost per AI label.
Writes data/evaluate/metrics.json (DVC metrics: `dvc metrics show`, `dvc exp show`), samples.parquet, principles
       .parquet, plots/*.json (DVC plots) and report.html (one self-contained page).
Run    uv run dvc repro evaluate
       uv run python stages/evaluate.py evaluate.prompts_per_kind=4
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import polars as pl

from caiforge import (
    config,
    constitution,
    elo,
    engines,
    evaluation,
    harm_judge,
    io,
    planmode,
    preference,
    report,
    rowcache,
    schemas,
)
from caiforge.engines import serving

log = logging.getLogger("caiforge.stages.evaluate")

STAGES_WITH_METRICS = ("critique_revise", "sft", "label", "pm", "rlaif", "distill")
"""Stages whose metrics.json feed the cost accounting (declared deps in dvc.yaml)."""
CURVES = ("sft", "pm", "rlaif", "distill")
"""Stages whose dvclive loss curve goes into the report (declared deps in dvc.yaml)."""


@dataclass(frozen=True)
class LabellerConfig:
    """How `label` asks the feedback model (conf/ copies these from label's params): label quality is measured on
    the labeller exactly as it labels."""

    few_shot: int
    """Comparison demos in front of each question."""
    principles_per_pair: int
    """Principles drawn per comparison (both orders each)."""
    chain_of_thought: bool
    """Reason first, then read the option probabilities (clamped to cot_band)."""
    cot_band: tuple[float, float]
    """Clamp for chain-of-thought probabilities."""
    cot_generation: engines.GenerationConfig
    """Decoding of the reasoning (on the judge's engine)."""

    def __post_init__(self) -> None:
        engines.decoding_only(self.cot_generation, "evaluate.labeller.cot_generation")


@dataclass(frozen=True)
class EvaluateConfig:
    prompts: str
    """prompts.parquet from curate (the eval split is used)."""
    models: dict[str, str]
    """Model name -> directory, in report order (base, sft, rl, student)."""
    judge: str
    """The AI judge (the feedback model)."""
    reward_model: str
    """The PM, for score distributions."""
    revisions: str
    """revisions.parquet (per-principle table)."""
    comparisons: str
    """comparisons.parquet (per-principle label agreement)."""
    known_answers: str
    """Known-answer comparisons (HHH-style JSONL) written for caiforge: the judge's label quality."""
    harm_judge: str
    """The independent harm judge (JSON weights; `caiforge harm-judge fit` writes the shipped one)."""
    hhh: str | None
    """Optional extra known-answer JSONL: Anthropic's HHH evaluations format or caiforge's (declare it in dvc.yaml
    deps when you set it)."""
    metrics_dir: str
    """Folder holding every stage's <stage>/metrics.json (cost accounting)."""
    out_dir: str
    """Where metrics.json, samples.parquet, principles.parquet, plots/ and report.html go."""
    seed: int
    """Seeds the prompt subset, principle draws and bootstrap."""
    prompts_per_kind: int
    """Eval prompts per kind (red_team, helpful), a seeded subset."""
    judge_principles: int
    """Principles drawn per comparison (both orders each)."""
    bootstrap: int
    """Bootstrap resamples for Elo intervals."""
    usd_per_cpu_hour: float
    """Price of one machine hour, for the cost per AI label."""
    harm_threshold: float
    """Harm classifier probability above which an answer counts as a successful attack."""
    report_examples: int
    """Prompts per kind shown side by side in the report."""
    labeller: LabellerConfig
    """The labeller's settings, for label quality."""
    collapse_drop_on: tuple[str, ...]
    """critique_revise's `collapse.drop_on`: a revision carrying one of these flags counts as collapsed in the
    per-principle table (it is the one SFT never saw)."""
    generation: engines.GenerationConfig
    """Decoding for the models' answers (greedy by default). With the openai backend each model's requests name
    it (`base`, `sft`, `rl`, `student`): the servers must list every one of them (e.g. a multi-model router)."""
    scoring: engines.ScoringConfig
    """Judge scoring settings."""
    pm_batch_size: int
    """PM scoring batch size."""
    pm_max_length: int
    """PM token cap per chat."""
    constitution: constitution.Constitution
    """The comparison part (principles by category)."""
    row_cache: rowcache.RowCacheConfig
    """Where every answer and judgement is kept: a model whose weights did not change is never asked again."""

    def __post_init__(self) -> None:
        found = {p.category for p in self.constitution.comparison}
        if not {"harmlessness", "helpfulness"} <= found:
            raise ValueError(
                "constitution: comparison: evaluate needs at least one 'harmlessness' and one 'helpfulness' principle "
                f"(the two Elo axes); this one has {sorted(found) or 'none'}"
            )
        if min(self.prompts_per_kind, self.judge_principles, self.report_examples) < 1 or self.bootstrap < 0:
            raise ValueError(
                "evaluate: prompts_per_kind, judge_principles, report_examples must be >= 1, bootstrap >= 0"
            )


def model_generation(gen: engines.GenerationConfig, name: str) -> engines.GenerationConfig:
    """One model's decoding config: on servers, its requests name it, so one URL list can serve every model."""
    return replace(gen, server=replace(gen.server, model=name)) if gen.backend == "openai" else gen


def answer_all(
    cfg: EvaluateConfig, chosen: pl.DataFrame, cache: rowcache.RowCache | None = None
) -> tuple[pl.DataFrame, dict[str, dict]]:
    """Every model's answer to every chosen prompt (one model in memory at a time), and each model's engine stats."""
    convs = [[{"role": "user", "content": t}] for t in chosen["text"]]
    rows, stats = [], {}
    for name, model_dir in cfg.models.items():
        gen = engines.make_generator(model_dir, model_generation(cfg.generation, name), cache)
        outs = gen.chat(convs, seed=cfg.seed, desc=name)
        stats[name] = gen.stats.as_dict()
        serving.release(model_dir)  # managed servers: the models are served in turn
        for prompt, answer in zip(chosen.iter_rows(named=True), outs, strict=True):
            rows.append(
                {
                    "prompt_id": prompt["id"],
                    "kind": prompt["kind"],
                    "category": prompt["category"],
                    "prompt": prompt["text"],
                    "model": name,
                    "answer": answer.text,
                    "completion_tokens": answer.completion_tokens,
                    "finished": answer.finished,
                }
            )
    return pl.DataFrame(rows, schema=dict(schemas.SAMPLES.columns)), stats


def run(cfg: EvaluateConfig) -> dict:
    prompts = io.read_parquet(cfg.prompts, schemas.PROMPTS)
    chosen = pl.concat(
        [evaluation.pick_eval_prompts(prompts, k, cfg.prompts_per_kind, cfg.seed) for k in ("red_team", "helpful")]
    )
    known_sets = {"seed": evaluation.read_known_answers(cfg.known_answers)}
    if cfg.hhh:
        known_sets["hhh"] = evaluation.read_known_answers(cfg.hhh)
    known = [(name, *item) for name, items in known_sets.items() for item in items]
    harm = harm_judge.HarmJudge.load(cfg.harm_judge)
    cache = rowcache.RowCache.open(cfg.row_cache)
    samples, answer_stats = answer_all(cfg, chosen, cache)
    names = list(cfg.models)
    principles = {c: constitution.by_category(cfg.constitution.comparison, c) for c in constitution.CATEGORIES}

    # The AI judge: every pair of models on every prompt, under principles of the axis, in both orders.
    judge = engines.make_choice_scorer(cfg.judge, cfg.scoring, cache)
    judge_identity = judge.identity
    started = time.perf_counter()
    ratings, judged = {}, 0
    for axis, kind in (("harmlessness", "red_team"), ("helpfulness", "helpful")):
        matchups = evaluation.model_matchups(samples, kind, names)
        games = evaluation.judge_games(
            judge, matchups, principles[axis], per_matchup=cfg.judge_principles, seed=cfg.seed
        )
        ratings[axis] = elo.rate(games, names, bootstrap=cfg.bootstrap, rng=random.Random(f"{cfg.seed}/{axis}"))
        judged += len(matchups)
    # Label quality: the labeller as `label` runs it (demos, principle draws, chain of thought), on known answers.
    lab = cfg.labeller
    known_matchups = [evaluation.Matchup(f"k{i:04d}", p, c, w) for i, (_, p, c, w) in enumerate(known)]
    known_p = evaluation.judge(
        judge,
        known_matchups,
        cfg.constitution.comparison,
        per_matchup=lab.principles_per_pair,
        seed=cfg.seed,
        examples=cfg.constitution.comparison_examples[: lab.few_shot],
        reasoner=judge.generator(lab.cot_generation) if lab.chain_of_thought else None,
        band=lab.cot_band,
    )
    hits = {name: [] for name in known_sets}
    for matchup, (name, *_) in zip(known_matchups, known, strict=True):
        hits[name].append(known_p[matchup.key] > 0.5)
    judge_seconds = time.perf_counter() - started
    planmode.end_of_requests()  # `caiforge plan` stops here: every request is counted
    judge_stats = judge.stats.as_dict()
    del judge

    pm = preference.PreferenceModel.from_dir(
        cfg.reward_model, max_length=cfg.pm_max_length, batch_size=cfg.pm_batch_size, device=cfg.scoring.device
    )
    per_model, found = {}, {}
    for name in names:
        mine = samples.filter(pl.col("model") == name)
        found[name] = evaluation.outcomes(mine, harm, cfg.harm_threshold)
        per_model[name] = {
            # The judge beside every Elo: a judge that also made the training labels grades its own signal.
            "elo_harmlessness": {**ratings["harmlessness"][name].as_dict(), "judge": judge_identity},
            "elo_helpfulness": {**ratings["helpfulness"][name].as_dict(), "judge": judge_identity},
            **evaluation.answer_metrics(mine, found[name]),
            "pm_score": evaluation.summary(pm.score(mine["prompt"].to_list(), mine["answer"].to_list())),
        }
    comparisons = io.read_parquet(cfg.comparisons, schemas.COMPARISONS)
    table = evaluation.per_principle_table(
        io.read_parquet(cfg.revisions, schemas.REVISIONS), comparisons, cfg.collapse_drop_on
    )
    labellers = sorted(set(comparisons["model_fingerprint"]))
    root = Path(cfg.metrics_dir)
    stage_metrics = {s: json.loads((root / s / "metrics.json").read_text()) for s in STAGES_WITH_METRICS}
    metrics = {
        "models": per_model,
        # Each model minus the first (base) on the same prompts, with paired intervals: whether training moved a rate.
        "versus": {"reference": names[0], "models": evaluation.versus(found, names[0])},
        "eval_prompts": {k: int((chosen["kind"] == k).sum()) for k in ("red_team", "helpful")},
        "label_quality": {
            "comparisons": len(known),
            "accuracy": evaluation.rate([p > 0.5 for p in known_p.values()], (True,)),
            "accuracy_ci95": evaluation.wilson([p > 0.5 for p in known_p.values()]),
            # seed: data/seed/label_quality.jsonl, clear-cut comparisons written for caiforge (easy);
            # hhh: the evaluate.hhh file when set (Anthropic's HHH set is much harder).
            "by_set": {
                name: {"comparisons": len(h), "accuracy": evaluation.rate(h, (True,)), "ci95": evaluation.wilson(h)}
                for name, h in hits.items()
            },
            "labeller": {
                "few_shot": lab.few_shot,
                "principles_per_pair": lab.principles_per_pair,
                "chain_of_thought": lab.chain_of_thought,
            },
        },
        # The independent harm judge behind attack_success_rate, and how often it is right on held-out responses.
        "harm_judge": harm.heldout,
        "judge": {
            "model": judge_identity,
            # True: the Elo ratings come from the weights that labelled the RL training pairs (on any backend);
            # read attack success and refusal rates (independent of it) as the harmlessness evidence. None: some
            # weights are unknown (a served model without server.weights).
            "is_the_labeller": engines.same_weights(judge_identity, labellers),
            "model_comparisons": judged,
            "engine": judge_stats,
            "seconds": round(judge_seconds, 2),
        },
        "cost": evaluation.cost_accounting(stage_metrics, cfg.usd_per_cpu_hour),
        "answers": answer_stats,
        "row_cache": rowcache.finish(cache, cfg.row_cache),
    }
    curves = {s: report.read_curve(root / s / "dvclive" / "plots" / "metrics" / "loss.tsv") for s in CURVES}
    page = report.evaluation_page(metrics, samples, table, curves, cfg.report_examples)

    out = Path(cfg.out_dir)
    io.write_parquet(samples, out / "samples.parquet", schemas.SAMPLES)
    io.write_parquet(table, out / "principles.parquet", schemas.PRINCIPLES)
    for name, rows in evaluation.plot_rows(per_model).items():
        io.write_json(rows, out / "plots" / f"{name}.json")
    io.write_text(page, out / "report.html")
    io.write_json(metrics, out / "metrics.json")
    io.write_json(evaluation.headline(per_model, metrics["label_quality"]["accuracy"]), out / "headline.json")
    log.info("evaluate: %s", json.dumps(per_model))
    return metrics


def main() -> None:
    config.stage_main("evaluate", EvaluateConfig, run)


if __name__ == "__main__":
    main()
