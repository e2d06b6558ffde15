"""Benchmark: the generation engine against a naive one-prompt-at-a-time `generate` loop.

Same model, prompts and settings (greedy, N new tokens, stop at the chat end token) for three runners:

- naive:   `model.generate` on one prompt at a time;
- batched: one plain left-padded `model.generate` call per batch of all prompts (the obvious baseline);
- engine:  caiforge.generation.TransformersGenerator (length grouping, stop handling, seeded, progress).

Prints tokens/s of each (useful tokens: up to and including the end token) and, last, `speedup: <engine/naive>`.
The batched and engine runs alternate `--repeats` times and the fastest of each counts, so a busy machine
(another process on a shared core) disturbs the ratio as little as possible.

    uv run python bench/generation.py                        # CPU, SmolLM2-135M from data/models/policy
    uv run python bench/generation.py --prompts 512 --new-tokens 128 --batch-size 512   # CUDA-sized
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from caiforge import generation, models

ROOT = Path(__file__).resolve().parents[1]


def load_prompts(n: int) -> list[list[dict[str, str]]]:
    lines = (ROOT / "data/seed/helpful_prompts.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines if line.strip()]
    return [[{"role": "user", "content": texts[i % len(texts)]}] for i in range(n)]


def count_useful(new_tokens: list[int], stop_ids: list[int]) -> int:
    for pos, tok in enumerate(new_tokens):
        if tok in stop_ids:
            return pos + 1
    return len(new_tokens)


@torch.inference_mode()
def run_naive(engine: generation.TransformersGenerator, convs, new_tokens: int) -> tuple[int, float]:
    tokens, t0 = 0, time.perf_counter()
    for conv in convs:
        ids = torch.tensor([engine.render(conv)], device=engine.device)
        out = engine.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=engine.stop_ids,
            pad_token_id=engine.pad_id,
        )
        tokens += count_useful(out[0, ids.shape[1] :].tolist(), engine.stop_ids)
    return tokens, time.perf_counter() - t0


@torch.inference_mode()
def run_batched(
    engine: generation.TransformersGenerator, convs, new_tokens: int, batch_size: int
) -> tuple[int, float]:
    tokens, t0 = 0, time.perf_counter()
    rendered = [engine.render(c) for c in convs]
    for start in range(0, len(rendered), batch_size):
        chunk = rendered[start : start + batch_size]
        enc = engine.tokenizer.pad({"input_ids": chunk}, padding=True, return_tensors="pt", padding_side="left")
        out = engine.model.generate(
            input_ids=enc["input_ids"].to(engine.device),
            attention_mask=enc["attention_mask"].to(engine.device),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=engine.stop_ids,
            pad_token_id=engine.pad_id,
        )
        width = enc["input_ids"].shape[1]
        tokens += sum(count_useful(row[width:].tolist(), engine.stop_ids) for row in out)
    return tokens, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "data/models/policy"), help="a caiforge model directory")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--naive-prompts", type=int, default=None, help="time the naive loop on fewer prompts")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of batched and engine; best counts")
    args = parser.parse_args()

    cfg = generation.GenerationConfig(
        batch_size=args.batch_size, max_new_tokens=args.new_tokens, device=args.device, progress=False
    )
    engine = generation.TransformersGenerator.from_dir(args.model, cfg)
    convs = load_prompts(args.prompts)
    print(
        f"device={engine.device} dtype={engine.model.dtype} prompts={len(convs)} new_tokens={args.new_tokens} "
        f"batch_size={args.batch_size} threads={torch.get_num_threads()} params={models.parameter_count(engine.model)}"
    )
    engine.chat(convs[:2], seed=0)  # warm-up (allocator, kernels)

    naive_convs = convs[: args.naive_prompts or len(convs)]
    n_tok, n_s = run_naive(engine, naive_convs, args.new_tokens)
    b_runs, e_runs = [], []
    for _ in range(args.repeats):
        b_runs.append(run_batched(engine, convs, args.new_tokens, args.batch_size))
        t0 = time.perf_counter()
        outs = engine.chat(convs, seed=0)
        e_runs.append((sum(o.completion_tokens for o in outs), time.perf_counter() - t0))
    b_tok, b_s = min(b_runs, key=lambda r: r[1])
    e_tok, e_s = min(e_runs, key=lambda r: r[1])

    naive, batched, eng = n_tok / n_s, b_tok / b_s, e_tok / e_s
    print(f"naive:   {n_tok:6d} tokens in {n_s:7.2f} s = {naive:8.1f} tokens/s ({len(naive_convs)} prompts)")
    print(f"batched: {b_tok:6d} tokens in {b_s:7.2f} s = {batched:8.1f} tokens/s ({batched / naive:.1f}x naive)")
    print(f"engine:  {e_tok:6d} tokens in {e_s:7.2f} s = {eng:8.1f} tokens/s ({eng / batched:.2f}x batched)")
    print(f"speedup: {eng / naive:.2f}")


if __name__ == "__main__":
    main()
