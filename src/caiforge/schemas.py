"""Every Parquet artifact's schema, declared once.

A `Schema` is an ordered column -> Polars dtype mapping plus the sort key every writer applies, so that row order is
part of the contract (and of byte-reproducibility). Readers and writers both check against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl


class SchemaError(ValueError):
    """A table does not match its declared schema; the message names the file and the column."""


@dataclass(frozen=True)
class Schema:
    """Column names and dtypes of one artifact, in order, and the columns its rows are sorted by."""

    name: str
    columns: tuple[tuple[str, pl.DataType], ...]
    sort_by: tuple[str, ...]

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.columns]

    def check(self, df: pl.DataFrame, where: str) -> pl.DataFrame:
        """Return `df` with columns in schema order and rows sorted, or raise naming the offending column."""
        missing = [name for name in self.names if name not in df.columns]
        if missing:
            raise SchemaError(f"{where}: {self.name} table is missing column(s) {missing}; has {df.columns}")
        extra = [name for name in df.columns if name not in self.names]
        if extra:
            raise SchemaError(f"{where}: {self.name} table has unexpected column(s) {extra}")
        for name, dtype in self.columns:
            if df.schema[name] != dtype and not (df.height == 0 and df.schema[name] == pl.Null):
                raise SchemaError(f"{where}: {self.name}.{name} has dtype {df.schema[name]}, expected {dtype}")
        out = df.select([pl.col(name).cast(dtype) for name, dtype in self.columns])
        return out.sort(list(self.sort_by), maintain_order=True)

    def empty(self) -> pl.DataFrame:
        return pl.DataFrame(schema=dict(self.columns))


PROMPTS = Schema(
    name="prompts",
    columns=(
        ("id", pl.String()),
        ("text", pl.String()),
        ("kind", pl.String()),
        ("category", pl.String()),
        ("source", pl.String()),
        ("split", pl.String()),
    ),
    sort_by=("kind", "split", "id"),
)
"""data/curate/prompts.parquet: id = content hash of the normalized text; kind in {red_team, helpful};
category in the constitution categories; split in {train, eval} (stable: decided by the id hash)."""

CHAT = pl.List(pl.Struct({"role": pl.String(), "content": pl.String()}))
"""A chat as stored in Parquet: a list of {role, content} turns (TRL's conversational format)."""

REVISIONS = Schema(
    name="revisions",
    columns=(
        ("prompt_id", pl.String()),
        ("prompt", pl.String()),
        ("round", pl.Int32()),
        ("principle_id", pl.String()),
        ("response", pl.String()),
        ("critique", pl.String()),
        ("revision", pl.String()),
        ("flags", pl.List(pl.String())),
        ("critique_tokens", pl.Int32()),
        ("revision_tokens", pl.Int32()),
        ("model_fingerprint", pl.String()),
        ("seed", pl.Int64()),
    ),
    sort_by=("prompt_id", "round"),
)
"""data/critique_revise/revisions.parquet: one row per red-team prompt per round. `response` is the answer
critiqued in that round (round 1: the policy's initial answer); `critique` is "" in revision-only mode; `flags`
are the revision's degeneracy flags (caiforge.collapse)."""

SFT = Schema(
    name="sft",
    columns=(
        ("prompt_id", pl.String()),
        ("kind", pl.String()),
        ("prompt", CHAT),
        ("completion", CHAT),
        ("round", pl.Int32()),
        ("finished", pl.Boolean()),
    ),
    sort_by=("kind", "prompt_id"),
)
"""data/critique_revise/sft.parquet: TRL prompt-completion chats. kind = red_team (completion = the last usable
revision, from `round`) or helpful (the policy's own answer, round 0). finished = False: the completion hit the token
cap; it is trained without the end-of-turn token."""

PREFERENCES = Schema(
    name="preferences",
    columns=(
        ("prompt_id", pl.String()),
        ("prompt", pl.String()),
        ("chosen", pl.String()),
        ("rejected", pl.String()),
        ("p_chosen", pl.Float64()),
        ("confidence", pl.Float64()),
        ("principle_ids", pl.List(pl.String())),
        ("label_source", pl.String()),
        ("order_consistency", pl.Float64()),
        ("model_fingerprint", pl.String()),
        ("seed", pl.Int64()),
    ),
    sort_by=("prompt_id", "chosen", "rejected"),
)
"""data/label/preferences.parquet and data/critique_revise/pairs.parquet: one row per labelled response pair.
`p_chosen` >= 0.5 is the soft label (the probability that `chosen` is better, after order-swap debiasing and the
principle ensemble, or 1.0 from a human label or a revision pair); `confidence` = |2 p - 1|; `label_source` in
{ai, human, revision} (caiforge.pairs); `order_consistency` is the share of the pair's principles whose verdicts in
the two answer orders lean the same way (null for revision pairs); `model_fingerprint` is the feedback model's (the
policy's for revision pairs)."""

COMPARISONS = Schema(
    name="comparisons",
    columns=(
        ("prompt_id", pl.String()),
        ("pair_id", pl.String()),
        ("principle_id", pl.String()),
        ("order", pl.String()),
        ("response_a", pl.String()),
        ("response_b", pl.String()),
        ("reasoning", pl.String()),
        ("logprob_a", pl.Float64()),
        ("logprob_b", pl.Float64()),
        ("p_a", pl.Float64()),
        ("model_fingerprint", pl.String()),
        ("seed", pl.Int64()),
    ),
    sort_by=("prompt_id", "pair_id", "principle_id", "order"),
)
"""data/label/comparisons.parquet: one row per response pair x drawn comparison principle x order. `order` is `ab`
(the pair's first sample is option (A)) or `ba` (swapped); `logprob_a`/`logprob_b` are the feedback model's raw
next-token log-probabilities of the option letters and `p_a` = P(A) normalized over the two (before any
chain-of-thought clamp); `reasoning` is the chain of thought ("" when off). `pair_id` is a content hash of the
prompt id and the two texts (caiforge.labeling.Pair); `model_fingerprint` is the feedback model's."""

REVIEW_QUEUE = Schema(
    name="review_queue",
    columns=(
        ("prompt_id", pl.String()),
        ("pair_id", pl.String()),
        ("prompt", pl.String()),
        ("chosen", pl.String()),
        ("rejected", pl.String()),
        ("p_chosen", pl.Float64()),
        ("confidence", pl.Float64()),
        ("disagreement", pl.Float64()),
        ("principle_ids", pl.List(pl.String())),
        ("principle_p_chosen", pl.List(pl.Float64())),
        ("reasons", pl.List(pl.String())),
        ("model_fingerprint", pl.String()),
        ("seed", pl.Int64()),
    ),
    sort_by=("prompt_id", "pair_id"),
)
"""data/label/review_queue.parquet: AI-labelled pairs a human should check (HRLAIF), whether or not the human labels
file already has a verdict on them (so a verdict can be revisited, and the queue does not move as verdicts come in).
`chosen`/`rejected`/`p_chosen` are always the AI's verdict; `principle_p_chosen[i]` is the debiased probability that
`chosen` is better under `principle_ids[i]`; `disagreement` = max - min of those; `reasons` in {low_confidence,
principle_disagreement}. `caiforge review` is the way to decide them (caiforge.human_labels: the file format)."""

SAMPLES = Schema(
    name="samples",
    columns=(
        ("prompt_id", pl.String()),
        ("kind", pl.String()),
        ("category", pl.String()),
        ("prompt", pl.String()),
        ("model", pl.String()),
        ("answer", pl.String()),
        ("completion_tokens", pl.Int64()),
        ("finished", pl.Boolean()),
        ("surprise", pl.Float64()),
        ("outcome", pl.String()),
    ),
    sort_by=("kind", "prompt_id", "model"),
)
"""data/evaluate/samples.parquet: every evaluated model's answer to every chosen eval-split prompt, how it reads to
the reference model (`surprise`, nats per token, `caiforge.coherence`; null when empty or not measured), and what
the answer is (`evaluation.OUTCOMES`: degenerate, refusal or compliance)."""

PRINCIPLES = Schema(
    name="principles",
    columns=(
        ("principle_id", pl.String()),
        ("drawn_in_revisions", pl.Int64()),
        ("mean_edit_distance", pl.Float64()),
        ("collapse_rate", pl.Float64()),
        ("drawn_in_labels", pl.Int64()),
        ("label_agreement", pl.Float64()),
    ),
    sort_by=("principle_id",),
)
"""data/evaluate/principles.parquet: per principle, draws and mean edit distance (1 - difflib ratio) of its
revisions, their collapse rate, and how often its order-debiased verdict agreed with the pair's ensemble label."""
