"""Benchmark: evaluate's answer surprise one row at a time against the batched, row-cached engine path.

On a built project's `data/evaluate/samples.parquet` (every model's answers) and the reference model `evaluate`
scores them with (the first of its models, `data/models/policy`), loaded once as `evaluate` loads it (`dtype` and
device `auto`), this times, side by side in one run on the same rows:

- `per_row`: one unpadded forward per answer, the LM head on every position (what `coherence.surprise` did before
  it went through the engine);
- `batched`: `coherence.surprise` through `TransformersChoiceScorer.reply_logprobs` (`exact` batching at
  `--batch-size`, evaluate's scoring batch size; the shared prefix computed once), with an empty row cache;
- `cached`: the same call again on that cache (a rebuild in which no answer changed, e.g. after a principle edit).

It prints each one's seconds, `batched: <ratio>` and `cached: <ratio>` (per row over each), the largest difference
in surprise between the two computations and how many answers they put on different sides of `--max-surprise`.

    uv run python bench/surprise.py [--batch-size 8] [--limit 200]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import polars as pl
import torch
import torch.nn.functional as F

from caiforge import coherence, engines, models, rowcache
from caiforge.engines import hf, rendering

ROOT = Path(__file__).resolve().parents[1]


@torch.inference_mode()
def per_row(model, tokenizer, prompts: list[str], answers: list[str]) -> list[float | None]:
    out: list[float | None] = []
    for prompt, answer in zip(prompts, answers, strict=True):
        ids, start = rendering.completion_tokens(tokenizer, prompt, answer)
        if not answer.strip():
            out.append(None)
            continue
        input_ids = torch.tensor([ids], device=model.device)
        logits = model(input_ids=input_ids, use_cache=False).logits[0, start - 1 : -1].float()
        out.append(float(F.cross_entropy(logits, input_ids[0, start:])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=Path, default=ROOT / "data" / "evaluate" / "samples.parquet")
    parser.add_argument("--reference", type=Path, default=ROOT / "data" / "models" / "policy")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, help="the first N answers only")
    parser.add_argument("--max-surprise", type=float, default=3.0, help="evaluate.max_surprise's default")
    args = parser.parse_args()
    samples = pl.read_parquet(args.samples)
    if args.limit:
        samples = samples.head(args.limit)
    prompts, answers = samples["prompt"].to_list(), samples["answer"].to_list()
    device, dtype = hf.resolve_device("auto", "auto")
    model, tokenizer = models.load_pretrained(args.reference, dtype=str(dtype).removeprefix("torch."), device=device)
    model.eval()
    cfg = engines.ScoringConfig(batch_size=args.batch_size, progress=False)

    started = time.perf_counter()
    one = per_row(model, tokenizer, prompts, answers)
    seconds = {"per_row": time.perf_counter() - started}
    with tempfile.TemporaryDirectory() as scratch:
        for name in ("batched", "cached"):
            scorer = hf.TransformersChoiceScorer(model, tokenizer, cfg, device)
            scorer.cache = rowcache.RowCache(scratch)
            started = time.perf_counter()
            batched = coherence.surprise(scorer, prompts, answers)
            seconds[name] = time.perf_counter() - started
            scorer.cache.close()
            stats = scorer.stats
        assert stats.rows == 0, "the second call runs nothing"

    pairs = [(a, b) for a, b in zip(one, batched, strict=True) if a is not None]
    assert len(pairs) == sum(b is not None for b in batched)
    result = {
        "answers": len(answers),
        "scored": len(pairs),
        "reference": str(args.reference),
        "dtype": str(dtype),
        "batch_size": args.batch_size,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "batched": round(seconds["per_row"] / seconds["batched"], 2),
        "cached": round(seconds["per_row"] / seconds["cached"], 1),
        "max_abs_difference": round(max(abs(a - b) for a, b in pairs), 5),
        "other_side_of_max_surprise": sum((a > args.max_surprise) != (b > args.max_surprise) for a, b in pairs),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
