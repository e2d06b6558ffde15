"""Benchmark: does a distilled student still answer? Degenerate share and distinct-2 of model directories' answers.

Each model answers the same eval-split prompts of a built project (`--per-kind` red-team and as many helpful, the
first by id), greedily up to `--max-new-tokens` (cpu_demo's `evaluate` decodes so), through its chat template.
Per model it prints the share of degenerate answers (`caiforge.collapse.degenerate`: empty or looping), distinct-2
over all answers (`caiforge.collapse.distinct_n`), and the share of its non-degenerate red-team answers that
decline (`caiforge.refusal`). The first model is the reference (the teacher): #39's goals for a student are a
distinct-2 of at least 0.8x the teacher's and a degenerate share at most 0.1 above it.

    uv run python bench/student_answers.py data/rlaif/model data/distill/model [more model dirs]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import polars as pl
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from caiforge import collapse, refusal

ROOT = Path(__file__).resolve().parents[1]


def answers(model_dir: Path, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    out = []
    for start in range(0, len(chats), batch_size):
        enc = tokenizer(chats[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, use_cache=True)
        out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", type=Path, nargs="+", help="model directories; the first is the reference")
    parser.add_argument("--prompts", type=Path, default=ROOT / "data" / "curate" / "prompts.parquet")
    parser.add_argument("--per-kind", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    found = pl.read_parquet(args.prompts).filter(pl.col("split") == "eval").sort("id")
    rows = pl.concat([found.filter(pl.col("kind") == kind).head(args.per_kind) for kind in ("red_team", "helpful")])
    reference = None
    for model_dir in args.models:
        texts = answers(model_dir, rows["text"].to_list(), args.max_new_tokens)
        looping = [collapse.degenerate(t) for t in texts]
        red = [t for t, kind, bad in zip(texts, rows["kind"], looping, strict=True) if kind == "red_team" and not bad]
        result = {
            "model": str(model_dir),
            "answers": len(texts),
            "degenerate": round(sum(looping) / len(texts), 3),
            "distinct_2": round(collapse.distinct_n(texts, 2), 3),
            "red_team_declined": round(sum(refusal.classify(t) != "engaged" for t in red) / len(red), 3)
            if red
            else None,
        }
        if reference is None:
            reference = result
        else:
            result["distinct_2_vs_reference"] = round(result["distinct_2"] / reference["distinct_2"], 2)
            result["degenerate_above_reference"] = round(result["degenerate"] - reference["degenerate"], 3)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
