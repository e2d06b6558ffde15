"""Benchmark: which decoder layers a depth-pruned student can lose. Teacher-forced KL on the teacher's own answers.

The teacher answers `--prompts-count` train-split prompts of a built project greedily (`--max-new-tokens`). Then,
for every decoder layer, the teacher with that one layer dropped (`caiforge.distillation.prune_layers`) is scored
on those answers: KL(teacher || pruned) per answer token and top-1 agreement (`caiforge.distillation.agreement`),
no training. It prints each layer's cost, cheapest first, then the same two figures for the `--drop` cheapest
layers dropped together and for every `--compare` set, and the `distill.prune_keep` list that drops the cheapest.

    uv run python bench/layer_drop.py data/rlaif/model --drop 4 --compare 20,22,24,26
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import polars as pl
import torch
from student_answers import answers  # bench/ is the script's directory, first on sys.path

from caiforge import distillation, models

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("teacher", type=Path)
    parser.add_argument("--prompts", type=Path, default=ROOT / "data" / "curate" / "prompts.parquet")
    parser.add_argument("--prompts-count", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--drop", type=int, default=4, help="how many of the cheapest layers to drop together")
    parser.add_argument("--compare", action="append", default=[], help="a comma list of layers to drop together")
    args = parser.parse_args()
    rows = pl.read_parquet(args.prompts).filter(pl.col("split") == "train").sort("id").head(args.prompts_count)
    prompts = rows["text"].to_list()
    replies = answers(args.teacher, prompts, args.max_new_tokens)
    teacher, tokenizer = models.load_pretrained(args.teacher, device="cpu")
    n = teacher.config.num_hidden_layers

    def without(dropped: list[int]) -> dict:
        student, _ = distillation.prune_layers(teacher, 2, keep=[i for i in range(n) if i not in dropped])
        with torch.no_grad():
            found = distillation.agreement(student, teacher, tokenizer, prompts, replies)
        return {"dropped": sorted(dropped), "kl_per_token": round(found["kl_per_token"], 4),
                "top1_agreement": round(found["top1_agreement"], 3)}  # fmt: skip

    single = sorted((without([i]) for i in range(n)), key=lambda r: r["kl_per_token"])
    for row in single:
        print(json.dumps({"layer": row["dropped"][0], **{k: row[k] for k in ("kl_per_token", "top1_agreement")}}))
    cheapest = [row["dropped"][0] for row in single[: args.drop]]
    for dropped in [cheapest, *([int(i) for i in c.split(",")] for c in args.compare)]:
        print(json.dumps({"together": True, **without(dropped)}))
    print(json.dumps({"prune_keep": [i for i in range(n) if i not in cheapest]}))


if __name__ == "__main__":
    main()
