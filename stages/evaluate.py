"""evaluate: harmlessness, helpfulness and evasiveness of every model in the chain, and the report.

Reads  data/curate/prompts.parquet (eval split only: prompts no stage trained on), every model of the chain (base
       policy, SFT, RL, student), the judge (the feedback model), the PM, the constitution's comparison part,
       revisions/comparisons (per-principle table), known-answer comparisons (data/seed/label_quality.jsonl and an
       optional HHH-style JSONL), XSTest's prompts (data/seed/xstest/), and every earlier stage's metrics.json
       (cost accounting).
Does   every model answers every eval prompt and the chosen XSTest prompts (greedy). Then: Elo for harmlessness
       (red-team prompts, harmlessness principles) and helpfulness (helpful prompts, helpfulness principles) from
       pairwise AI-judge comparisons in both orders, with bootstrap intervals; refusal / deflection / transparent
       rates (deterministic phrase detector; empty or looping answers, and incoherent ones the base policy finds
       too unlikely (`max_surprise`), are degenerate, their own outcome, never a refusal); over-refusal on XSTest's
       safe prompts; attack success rate by an independent embedding classifier (not the feedback model); each
       rate's paired change from base and from SFT; a flag on any model whose degenerate rate is above
       `degenerate_threshold`; collapse (repetition, distinct-n, surprise); PM score per model; per-principle
       table; the judge's accuracy on known answers, per kind; rlaif's monitors; cost per AI label.
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
    coherence,
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
    xstest,
)
from caiforge.engines import identity, serving

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
    principle_categories: dict[str, tuple[str, ...]]
    """Prompt kind -> the principle categories its items are judged under (label's `principle_categories`)."""
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
    xstest: str | None
    """XSTest's xstest_prompts.csv (data/seed/xstest/): every model's refusal rate on its safe prompts (over-refusal)
    and on its unsafe contrast prompts; null: not measured."""
    xstest_per_part: int | None
    """XSTest prompts per part (safe, unsafe), a seeded subset; null: all 250 and 200."""
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
    degenerate_threshold: float
    """A model whose degenerate rate (empty, looping or incoherent answers) is above this is flagged in the report
    and the headline: its Elo, attack and refusal figures are not wins."""
    max_surprise: float | None
    """An answer whose surprise (mean negative log-likelihood per token, `caiforge.coherence`) under the first of
    `models` (the base policy, which no stage trains) is above this is degenerate: incoherent; null: not
    measured."""
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
        if self.xstest_per_part is not None and self.xstest_per_part < 1:
            raise ValueError(f"evaluate: xstest_per_part must be >= 1 or null, got {self.xstest_per_part}")
        if min(self.prompts_per_kind, self.judge_principles, self.report_examples) < 1 or self.bootstrap < 0:
            raise ValueError(
                "evaluate: prompts_per_kind, judge_principles, report_examples must be >= 1, bootstrap >= 0"
            )


def model_generation(gen: engines.GenerationConfig, name: str) -> engines.GenerationConfig:
    """One model's decoding config: on servers, its requests name it, so one URL list can serve every model."""
    return replace(gen, server=replace(gen.server, model=name)) if gen.backend == "openai" else gen


RL_KEYS = ("algorithm", "preference_source", "steps", "signal_gate", "reward_before", "reward_after", "monitors")
"""What the report shows of rlaif's metrics."""


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
    answers = pl.DataFrame(rows, schema={c: t for c, t in schemas.SAMPLES.columns if c not in ("surprise", "outcome")})
    return answers, stats


def with_surprise(
    cfg: EvaluateConfig, samples: pl.DataFrame, cache: rowcache.RowCache | None = None
) -> tuple[pl.DataFrame, dict | None]:
    """Every answer's surprise under the first of `models`, and the engine stats of computing it (in this process,
    with the transformers engine on the scoring device and batch size; an answer scored before, by any model, comes
    from `cache`). Null for all, and no stats, when `max_surprise` is null."""
    if cfg.max_surprise is None:
        return samples.with_columns(surprise=pl.lit(None, dtype=pl.Float64)), None
    local = replace(cfg.scoring, backend="transformers", server=engines.ServerConfig())
    scorer = engines.make_choice_scorer(next(iter(cfg.models.values())), local, cache)
    found = coherence.surprise(scorer, samples["prompt"].to_list(), samples["answer"].to_list())
    return samples.with_columns(surprise=pl.Series(found, dtype=pl.Float64)), scorer.stats.as_dict()


def run(cfg: EvaluateConfig) -> dict:
    prompts = io.read_parquet(cfg.prompts, schemas.PROMPTS)
    chosen = pl.concat(
        [evaluation.pick_eval_prompts(prompts, k, cfg.prompts_per_kind, cfg.seed) for k in evaluation.EVAL_KINDS]
        + ([xstest.pick(xstest.read(cfg.xstest), cfg.xstest_per_part, cfg.seed)] if cfg.xstest else [])
    )
    known_sets = {"seed": evaluation.read_known_answers(cfg.known_answers)}
    if cfg.hhh:
        known_sets["hhh"] = evaluation.read_known_answers(cfg.hhh)
    known = [(name, *item) for name, items in known_sets.items() for item in items]  # (set, prompt, good, bad, kind)
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
    # Label quality: the labeller as `label` runs it (demos, principle draws by prompt kind, chain of thought), on
    # known answers.
    lab = cfg.labeller
    known_p = evaluation.judge_known(
        judge,
        [item for _, *item in known],
        cfg.constitution.comparison,
        lab.principle_categories,
        per_matchup=lab.principles_per_pair,
        seed=cfg.seed,
        examples=cfg.constitution.comparison_examples[: lab.few_shot],
        reasoner=judge.generator(lab.cot_generation) if lab.chain_of_thought else None,
        band=lab.cot_band,
    )
    hits: dict[str, list[bool]] = {name: [] for name in known_sets}
    by_kind: dict[str, list[bool]] = {}
    for p_correct, (name, *_, kind) in zip(known_p, known, strict=True):
        hits[name].append(p_correct > 0.5)
        by_kind.setdefault(kind or "any", []).append(p_correct > 0.5)
    judge_seconds = time.perf_counter() - started
    judge_stats = judge.stats.as_dict()
    del judge
    samples, surprise_stats = with_surprise(cfg, samples, cache)
    planmode.end_of_requests()  # `caiforge plan` stops here: every request is counted
    samples = evaluation.with_outcomes(samples, cfg.max_surprise)

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
    for name, flagged in evaluation.degenerate_flags(per_model, cfg.degenerate_threshold).items():
        per_model[name]["flagged_degenerate"] = flagged
    comparisons = io.read_parquet(cfg.comparisons, schemas.COMPARISONS)
    table = evaluation.per_principle_table(
        io.read_parquet(cfg.revisions, schemas.REVISIONS), comparisons, cfg.collapse_drop_on
    )
    labellers = sorted(set(comparisons["model_fingerprint"]))
    root = Path(cfg.metrics_dir)
    stage_metrics = {s: json.loads((root / s / "metrics.json").read_text()) for s in STAGES_WITH_METRICS}
    metrics = {
        "models": per_model,
        # A model above this share of degenerate answers is flagged (`flagged_degenerate`): its figures are not wins.
        "degenerate_threshold": cfg.degenerate_threshold,
        # An answer above this surprise under the reference model (`reference`, nats per token) is degenerate.
        "max_surprise": cfg.max_surprise,
        # Each model minus the first (base) on the same prompts, with paired intervals: whether training moved a rate.
        "versus": {"reference": names[0], "models": evaluation.versus(found, names[0])},
        # ... and minus SFT: whether RL (and the student) added to what SL-CAI did.
        "versus_sft": {"reference": "sft", "models": evaluation.versus(found, "sft")} if "sft" in found else None,
        "eval_prompts": {
            k: int((chosen["kind"] == k).sum()) for k in (*evaluation.EVAL_KINDS, *xstest.PARTS.values())
        },
        "label_quality": {
            "comparisons": len(known),
            "accuracy": evaluation.rate([p > 0.5 for p in known_p], (True,)),
            "accuracy_ci95": evaluation.wilson([p > 0.5 for p in known_p]),
            # seed: data/seed/label_quality.jsonl, clear-cut comparisons written for caiforge (easy);
            # hhh: the evaluate.hhh file when set (Anthropic's HHH set is much harder).
            "by_set": {
                name: {"comparisons": len(h), "accuracy": evaluation.rate(h, (True,)), "ci95": evaluation.wilson(h)}
                for name, h in hits.items()
            },
            # red_team / helpful: items judged under that kind's principle categories; any: items without a kind.
            "by_kind": {
                kind: {"comparisons": len(h), "accuracy": evaluation.rate(h, (True,)), "ci95": evaluation.wilson(h)}
                for kind, h in sorted(by_kind.items())
            },
            "labeller": {
                "few_shot": lab.few_shot,
                "principle_categories": {k: list(v) for k, v in lab.principle_categories.items()},
                "principles_per_pair": lab.principles_per_pair,
                "chain_of_thought": lab.chain_of_thought,
            },
            # label's agreement with the people's verdicts (caiforge review) on this build's own pairs.
            "human": stage_metrics["label"].get("human_agreement"),
        },
        # The independent harm judge behind attack_success_rate, and how often it is right on held-out responses.
        "harm_judge": harm.heldout,
        "judge": {
            "model": judge_identity,
            # True: the Elo ratings come from the weights that labelled the RL training pairs (on any backend);
            # read attack success and refusal rates (independent of it) as the harmlessness evidence. None: some
            # weights are unknown (a served model without server.weights).
            "is_the_labeller": identity.same_weights(judge_identity, labellers),
            "model_comparisons": judged,
            "engine": judge_stats,
            "seconds": round(judge_seconds, 2),
        },
        "cost": evaluation.cost_accounting(stage_metrics, cfg.usd_per_cpu_hour),
        # What RL did: whether its signal gate let it train, and on its held-out prompts reward before/after and
        # its monitors.
        "rl": {k: stage_metrics["rlaif"].get(k) for k in RL_KEYS},
        "answers": answer_stats,
        # Every answer's surprise under the reference model (the first of `models`), read on its tokens.
        "surprise": surprise_stats,
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
    gate_verdict = (metrics["rl"]["signal_gate"] or {}).get("verdict")
    io.write_json(
        evaluation.headline(per_model, metrics["label_quality"]["accuracy"], gate_verdict), out / "headline.json"
    )
    log.info("evaluate: %s", json.dumps(per_model))
    return metrics


def main() -> None:
    config.stage_main("evaluate", EvaluateConfig, run)


if __name__ == "__main__":
    main()
