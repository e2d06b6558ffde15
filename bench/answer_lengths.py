"""Benchmark: how many of the policy's sampled answers end before rlaif's token cap, per way of asking.

GRPO and RLOO mask an answer cut off at `rlaif.max_completion_length` out of the loss, so RL learns only from the
answers that end. This samples the SFT model on rlaif's own training prompts (the stage's split and order), as TRL
samples them (temperature, no top-k / top-p, the model's chat template), `--samples` answers per prompt up to the
largest cap, and prints for each way of asking and temperature the share of answers still running at each cap:
the prompt as it is, with a system prompt, and with `rlaif.instruction` appended.

Run it in a project where `uv run dvc repro sft` has built the SFT model and the prompts:

    uv run python bench/answer_lengths.py [--prompts 16] [--samples 4] [--caps 48 64 96 128]
        [--ways instruction] [--dtypes float32 bfloat16] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "stages"))

import rlaif  # noqa: E402  (the stage's own prompt split)

from caiforge import config  # noqa: E402

WAYS = {
    "as is": (None, ""),
    "system prompt": ("You are a helpful AI assistant. Answer in one or two short sentences.", ""),
    "instruction": (None, "Answer in one sentence."),
}


def still_running(
    model, tokenizer, chats: list[list[dict]], temperature: float, samples: int, cap: int, seed: int, dtype: str
):
    """Per sampled answer: the tokens it took to end (its end-of-turn token included), or None if it ran past cap.
    `dtype` bfloat16 samples the fp32 model under bf16 autocast, as rlaif does with `sampling_dtype: bfloat16`."""
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=cap,
            num_return_sequences=samples,
            use_cache=True,
        )
    ends = {tokenizer.eos_token_id, *(model.generation_config.eos_token_id or [])} - {None}
    lengths = []
    for row in out[:, enc["input_ids"].shape[1] :].tolist():
        hit = [i for i, token in enumerate(row) if token in ends]
        lengths.append(hit[0] + 1 if hit else None)
    return lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--caps", type=int, nargs="+", default=[48, 64, 96, 128])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7])
    parser.add_argument("--ways", nargs="+", choices=list(WAYS), default=list(WAYS))
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32"])
    parser.add_argument("--seeds", type=int, nargs="+", help="sampling seeds (default: rlaif's seed)")
    parser.add_argument("--instruction", help=f"asked instead of {WAYS['instruction'][1]!r} (the instruction way)")
    args = parser.parse_args()
    cfg = config.load("rlaif", rlaif.RlaifConfig, [], root=ROOT)
    train, _ = rlaif.split_prompts(cfg)
    prompts = train["text"].to_list()[: args.prompts]
    tokenizer = AutoTokenizer.from_pretrained(cfg.policy)
    model = AutoModelForCausalLM.from_pretrained(cfg.policy, dtype=torch.float32).eval()
    if isinstance(model.generation_config.eos_token_id, int):
        model.generation_config.eos_token_id = [model.generation_config.eos_token_id]
    print(f"{len(prompts)} rlaif training prompts x {args.samples} samples, {cfg.policy}")
    print("share of answers still running at each cap:")
    for way in args.ways:
        system, suffix = WAYS[way]
        if way == "instruction" and args.instruction:
            suffix = args.instruction
        chats = [
            [
                *([{"role": "system", "content": system}] if system else []),
                {"role": "user", "content": f"{p} {suffix}".strip()},
            ]
            for p in prompts
        ]
        for temperature, dtype in itertools.product(args.temperatures, args.dtypes):
            start = time.monotonic()
            lengths = [
                n
                for seed in args.seeds or [cfg.seed]
                for n in still_running(model, tokenizer, chats, temperature, args.samples, max(args.caps), seed, dtype)
            ]
            shares = [sum(n is None or n > cap for n in lengths) / len(lengths) for cap in args.caps]
            cells = "  ".join(f"{cap}: {share:.2f}" for cap, share in zip(args.caps, shares, strict=True))
            print(
                f"{way:14s} temperature {temperature:.1f} {dtype:8s} n={len(lengths)}  {cells}  "
                f"({time.monotonic() - start:.0f} s)"
            )


if __name__ == "__main__":
    main()
