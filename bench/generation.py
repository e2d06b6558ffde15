"""Benchmark: the transformers engine against a naive loop, prefix reuse, and the openai engine on a local server.

Same model, prompts and settings (greedy, N new tokens, stop at the chat end token) for:

- naive:   `model.generate` on one prompt at a time;
- batched: one plain left-padded `model.generate` call per batch of all prompts (the obvious baseline);
- engine:  caiforge.engines.hf.TransformersGenerator (length grouping, own decoding loop, prefix reuse);
- openai:  caiforge.engines.openai.OpenAIGenerator against llama-cpp-python's server on 127.0.0.1 serving the
           embedded SmolLM2 GGUF (needs the `server` dependency group; skipped with a note otherwise);
- llama_server: the same against llama.cpp's C++ `llama-server` (built by `.ci/build-llama-server`; skipped with a
           note otherwise).

Stage-shaped: the calls real `critique_revise` and `label` make on the profile in params.yaml (cpu_demo by default),
rebuilt with the stages' own prompt builders from data/curate/prompts.parquet: mixed lengths, sampled, their batch
sizes and token caps; the answers of one call feed the next (answer -> critique -> revision). They run under both
`batching` settings, and the naive loop (one prompt at a time, `model.generate`, same sampling settings) runs the
answer call among them (short prompts, its best case).

And choice scoring shaped like `label`'s (few-shot comparison demos in front of every question, both orders), with
and without prefix reuse.

Prints tokens/s of each and, last, the ratios measured side by side in this run:
`speedup: <engine/naive>`, `prefix_reuse: <scoring without reuse / with>`, `openai: <openai/naive>`,
`llama_server: <llama-server/naive>`, and for the
stage-shaped calls `stage_naive:` (tokens/s), `stage_shaped: <stage-shaped engine tokens/s / uniform engine tokens/s>`
per batching setting, and `wasted_slots:` (the share of decoded row positions that were filler rows or rows that had
already finished).
Timed runs alternate `--repeats` times and the fastest of each counts, so a busy machine disturbs the ratios as
little as possible.

    uv run --group server python bench/generation.py          # CPU, SmolLM2-135M from data/models/policy
    uv run python bench/generation.py --prompts 512 --new-tokens 128 --batch-size 512 --no-openai   # CUDA-sized
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from caiforge import constitution, engines, labeling, models, preflight, prompts  # noqa: E402
from caiforge.engines import hf  # noqa: E402


def load_prompts(n: int) -> list[list[dict[str, str]]]:
    lines = (ROOT / "data/seed/helpful_prompts.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines if line.strip()]
    return [[{"role": "user", "content": texts[i % len(texts)]}] for i in range(n)]


def label_questions(n: int, few_shot: int) -> list[list[dict[str, str]]]:
    """`n` comparison questions as `label` asks them: demos first, then a pair of answers under a principle."""
    parts = constitution.load(ROOT / "constitutions" / "default.yaml")
    by_id = {p.id: p for p in parts.comparison}
    demos = parts.comparison_examples[:few_shot]
    prompts = [c[0]["content"] for c in load_prompts(n)]
    out = []
    for i, prompt in enumerate(prompts):
        principle = parts.comparison[i % len(parts.comparison)]
        a, b = f"A short answer to: {prompt}", f"A longer, more careful answer to: {prompt} with details."
        out.append(labeling.comparison_turns(prompt, *((a, b) if i % 2 else (b, a)), principle, demos, by_id))
    return out


def _gen_cfg(section: dict, batching: str) -> engines.GenerationConfig:
    keys = ("batch_size", "max_new_tokens", "temperature", "top_p", "top_k", "prefix_reuse")
    return engines.GenerationConfig(**{k: section[k] for k in keys}, batching=batching, progress=False)


def stage_run(chat, params: dict, batching: str, rounds: int, label: bool = True) -> list[engines.Completion]:
    """The generation calls of `critique_revise` (its first `rounds` rounds) and `label`'s sampling, in the stages'
    order, through `chat(cfg, conversations, seed)`; returns every completion."""
    cr, lb = params["critique_revise"], params["label"]
    table = pl.read_parquet(ROOT / cr["prompts"]).filter(pl.col("split") == "train").sort("id")
    red = table.filter(pl.col("kind") == "red_team")
    picked = preflight.stage_module(ROOT, "critique_revise").subset(red, cr["max_prompts"], random.Random(cr["seed"]))
    ids, texts = picked["id"].to_list(), picked["text"].to_list()
    parts = constitution.load(ROOT / "constitutions" / f"{params['constitution']}.yaml")
    examples = parts.critique_revision_examples[: cr["few_shot"]]
    cfg = _gen_cfg(cr["generation"], batching)
    seed = cr["seed"]
    out = chat(cfg, [prompts.answer(t) for t in texts], seed)
    current = [c.text for c in out]
    drawn = [constitution.draw(parts.critique_revision, random.Random(f"{seed}/{i}"), cr["rounds"]) for i in ids]
    for rnd in range(1, min(rounds, cr["rounds"]) + 1):
        picked = [d[rnd - 1] for d in drawn]
        convs = [prompts.critique(t, a, p, examples) for t, a, p in zip(texts, current, picked, strict=True)]
        crits = chat(cfg, convs, seed + 100 * rnd)
        convs = [
            prompts.revision(t, a, p, c.text, examples)
            for t, a, p, c in zip(texts, current, picked, crits, strict=True)
        ]
        revs = chat(cfg, convs, seed + 100 * rnd + 1)
        out += crits + revs
        current = [r.text for r in revs]
    if not label:
        return out
    lab = table.filter(pl.col("kind") == "red_team")
    keep = random.Random(lb["seed"]).sample(lab["id"].to_list(), min(lb["max_prompts"], lab.height))
    convs = [prompts.answer(t) for t in lab.filter(pl.col("id").is_in(keep))["text"]]
    lcfg = _gen_cfg(lb["generation"], batching)
    for k in range(lb["samples_per_prompt"]):
        out += chat(lcfg, convs, lb["seed"] + 1000 * k)
    return out


@torch.inference_mode()
def naive_chat(engine: hf.TransformersGenerator, cfg: engines.GenerationConfig, convs, seed: int):
    """One prompt at a time through `model.generate`, sampling with the call's settings."""
    outs = []
    gen = torch.Generator().manual_seed(seed)
    for conv in convs:
        ids = torch.tensor([engine.render(conv)], device=engine.device)
        sampled = cfg.temperature > 0
        kw = {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k} if sampled else {}
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        out = engine.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=cfg.max_new_tokens,
            do_sample=sampled,
            eos_token_id=engine.stop_ids,
            pad_token_id=engine.runner.pad_id,
            **kw,
        )
        new = out[0, ids.shape[1] :].tolist()
        n = count_useful(new, engine.stop_ids)
        text = engine.tokenizer.decode(new[:n], skip_special_tokens=True).strip()
        outs.append(engines.Completion(text, ids.shape[1], n, n < len(new) or new[-1] in engine.stop_ids))
    return outs


def bench_stage_shaped(model: str, device: str, repeats: int, rounds: int) -> dict[str, tuple[int, float, float]]:
    """{setting: (completion tokens, seconds, wasted slot share)} for `exact`, `dynamic` and `naive`."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    base = hf.TransformersGenerator.from_dir(model, engines.GenerationConfig(device=device, progress=False))
    results: dict[str, tuple[int, float, float]] = {}
    for _ in range(repeats):
        for batching in ("exact", "dynamic"):
            made: list[hf.TransformersGenerator] = []

            def chat(cfg, convs, seed, made=made):
                made.append(hf.TransformersGenerator(base.model, base.tokenizer, cfg, base.device))
                return made[-1].chat(convs, seed=seed)

            outs, seconds = timed(stage_run, chat, params, batching, rounds)
            slots = sum(g.stats.decode_slots for g in made)
            tokens = sum(o.completion_tokens for o in outs)
            run = (tokens, seconds, 1 - tokens / slots)
            print(f"  stage-shaped {batching}: {tokens} tokens in {seconds:.1f} s", flush=True)
            if batching not in results or seconds < results[batching][1]:
                results[batching] = run
    # The naive loop on the answer call only (short prompts: its best case), to keep the run short.
    naive = lambda cfg, convs, seed: naive_chat(base, cfg, convs, seed)  # noqa: E731
    outs, seconds = timed(stage_run, naive, params, "exact", 0, False)
    results["naive"] = (sum(o.completion_tokens for o in outs), seconds, 0.0)
    return results


def count_useful(new_tokens: list[int], stop_ids: list[int]) -> int:
    for pos, tok in enumerate(new_tokens):
        if tok in stop_ids:
            return pos + 1
    return len(new_tokens)


@torch.inference_mode()
def run_naive(engine: hf.TransformersGenerator, convs, new_tokens: int) -> tuple[int, float]:
    tokens, t0 = 0, time.perf_counter()
    for conv in convs:
        ids = torch.tensor([engine.render(conv)], device=engine.device)
        out = engine.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=engine.stop_ids,
            pad_token_id=engine.runner.pad_id,
        )
        tokens += count_useful(out[0, ids.shape[1] :].tolist(), engine.stop_ids)
    return tokens, time.perf_counter() - t0


@torch.inference_mode()
def run_batched(engine: hf.TransformersGenerator, convs, new_tokens: int, batch_size: int) -> tuple[int, float]:
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
            pad_token_id=engine.runner.pad_id,
        )
        width = enc["input_ids"].shape[1]
        tokens += sum(count_useful(row[width:].tolist(), engine.stop_ids) for row in out)
    return tokens, time.perf_counter() - t0


def timed(fn, *args, **kw) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def bench_openai(args, convs, cpp: bool = False) -> tuple[int, float] | str:
    """(tokens, seconds) of the openai engine on a local llama-cpp-python server (`cpp`: llama.cpp's C++
    `llama-server`), or why it was skipped."""
    try:
        from tests import servers
    except ImportError as exc:
        return f"skipped ({exc})"
    try:
        servers.llama_server_binary() if cpp else servers.require_llama_cpp()
    except BaseException as exc:  # pytest's skip outcome
        return f"skipped ({exc})"
    os.environ[servers.API_KEY_ENV] = servers.API_KEY
    threads = torch.get_num_threads()
    with (
        tempfile.TemporaryDirectory() as logs,
        servers.running(models.smollm2_gguf_path(), Path(logs), threads=threads, cpp=cpp) as server,
    ):
        cfg = engines.GenerationConfig(
            backend="openai",
            max_new_tokens=args.new_tokens,
            progress=False,
            server=engines.ServerConfig(urls=(server.url,), api_key_env=servers.API_KEY_ENV, max_in_flight=2),
        )
        gen = engines.make_generator(args.model, cfg)
        gen.chat(convs[:2], seed=0)  # warm-up
        runs = []
        for _ in range(args.repeats):
            outs, seconds = timed(gen.chat, convs, seed=0)
            runs.append((sum(o.completion_tokens for o in outs), seconds))
        return min(runs, key=lambda r: r[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "data/models/policy"), help="a caiforge model directory")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--naive-prompts", type=int, default=None, help="time the naive loop on fewer prompts")
    parser.add_argument("--questions", type=int, default=32, help="label-like scoring questions")
    parser.add_argument("--few-shot", type=int, default=2, help="comparison demos in front of each question")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed runs; the best of each counts")
    parser.add_argument("--no-openai", action="store_true", help="skip the local llama.cpp server run")
    parser.add_argument("--no-stage", action="store_true", help="skip the stage-shaped calls")
    parser.add_argument("--stage-rounds", type=int, default=1, help="critique_revise rounds in the stage calls")
    parser.add_argument("--stage-repeats", type=int, default=1, help="timed runs of the stage calls per setting")
    parser.add_argument("--stage-only", action="store_true", help="only the uniform engine run and the stage calls")
    args = parser.parse_args()

    cfg = engines.GenerationConfig(
        batch_size=args.batch_size, max_new_tokens=args.new_tokens, device=args.device, progress=False
    )
    engine = hf.TransformersGenerator.from_dir(args.model, cfg)
    convs = load_prompts(args.prompts)
    print(
        f"device={engine.device} dtype={engine.model.dtype} prompts={len(convs)} new_tokens={args.new_tokens} "
        f"batch_size={args.batch_size} threads={torch.get_num_threads()} params={models.parameter_count(engine.model)}"
    )
    engine.chat(convs[:2], seed=0)  # warm-up (allocator, kernels)
    if args.stage_only:
        return print_stage_shaped(args, engine, convs)

    naive_convs = convs[: args.naive_prompts or len(convs)]
    n_tok, n_s = run_naive(engine, naive_convs, args.new_tokens)
    b_runs, e_runs = [], []
    for _ in range(args.repeats):
        b_runs.append(run_batched(engine, convs, args.new_tokens, args.batch_size))
        outs, seconds = timed(engine.chat, convs, seed=0)
        e_runs.append((sum(o.completion_tokens for o in outs), seconds))
    b_tok, b_s = min(b_runs, key=lambda r: r[1])
    e_tok, e_s = min(e_runs, key=lambda r: r[1])

    questions = label_questions(args.questions, args.few_shot)
    prefills = [labeling.answer_prefill()] * len(questions)
    scorers = {
        reuse: hf.TransformersChoiceScorer(
            engine.model,
            engine.tokenizer,
            engines.ScoringConfig(batch_size=16, prefix_reuse=reuse, progress=False),
            engine.device,
        )
        for reuse in (True, False)
    }
    s_runs: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for reuse, scorer in scorers.items():
            s_runs[reuse].append(timed(scorer.choice_logprobs, questions, prefills)[1])
    prompt_tokens = scorers[False].stats.prompt_tokens // args.repeats
    shared = scorers[True].stats.prefix_tokens_reused // args.repeats

    naive, batched, eng = n_tok / n_s, b_tok / b_s, e_tok / e_s
    print(f"naive:   {n_tok:6d} tokens in {n_s:7.2f} s = {naive:8.1f} tokens/s ({len(naive_convs)} prompts)")
    print(f"batched: {b_tok:6d} tokens in {b_s:7.2f} s = {batched:8.1f} tokens/s ({batched / naive:.1f}x naive)")
    print(f"engine:  {e_tok:6d} tokens in {e_s:7.2f} s = {eng:8.1f} tokens/s ({eng / batched:.2f}x batched)")
    print(
        f"scoring: {len(questions)} label-like questions, {prompt_tokens} prompt tokens ({shared} shared): "
        f"{min(s_runs[False]):.2f} s without prefix reuse, {min(s_runs[True]):.2f} s with"
    )
    served = {}
    for name, cpp in (("openai", False), ("llama_server", True)):
        served[name] = "skipped (--no-openai)" if args.no_openai else bench_openai(args, convs, cpp)
        if isinstance(served[name], tuple):
            o_tok, o_s = served[name]
            what = "llama.cpp's llama-server" if cpp else "llama-cpp-python"
            rate = f"{o_tok:6d} tokens in {o_s:7.2f} s = {o_tok / o_s:8.1f} tokens/s"
            print(f"{name + ':':13s} {rate} ({what}, 1 server)")
    print(f"speedup: {eng / naive:.2f}")
    print(f"prefix_reuse: {min(s_runs[False]) / min(s_runs[True]):.2f}")
    for name, result in served.items():
        print(f"{name}: {result[0] / result[1] / naive:.2f}" if isinstance(result, tuple) else f"{name}: {result}")
    if not args.no_stage:
        print_stage_shaped(args, engine, convs)


def print_stage_shaped(args, engine: hf.TransformersGenerator, convs) -> None:
    """The uniform engine run under each batching setting, then the stage-shaped calls, and their ratios."""
    uniform = {}
    for batching in ("exact", "dynamic"):
        cfg = engines.GenerationConfig(
            batch_size=args.batch_size, max_new_tokens=args.new_tokens, batching=batching, progress=False
        )
        gen = hf.TransformersGenerator(engine.model, engine.tokenizer, cfg, engine.device)
        runs = [timed(gen.chat, convs, seed=0) for _ in range(args.repeats)]
        outs, seconds = min(runs, key=lambda r: r[1])
        uniform[batching] = sum(o.completion_tokens for o in outs) / seconds
        print(f"uniform_{batching}: {uniform[batching]:8.1f} tokens/s ({len(convs)} prompts, greedy)")
    staged = bench_stage_shaped(args.model, args.device, args.stage_repeats, args.stage_rounds)
    for name, (tokens, seconds, wasted) in staged.items():
        print(
            f"stage_{name}: {tokens:6d} tokens in {seconds:7.2f} s = {tokens / seconds:8.1f} tokens/s "
            f"(wasted slots {wasted:.3f})"
        )
    rate = {k: t / s for k, (t, s, _) in staged.items()}
    print(f"stage_naive: {rate['naive']:.1f}")
    for batching in ("exact", "dynamic"):
        print(
            f"stage_shaped_{batching}: {rate[batching] / uniform[batching]:.2f} "
            f"(vs naive {rate[batching] / rate['naive']:.2f}x; wasted_slots {staged[batching][2]:.3f})"
        )
    default = engines.GenerationConfig().batching
    print(f"stage_shaped: {rate[default] / uniform['exact']:.2f} ({default} over the uniform exact figure)")
    print(f"wasted_slots: exact {staged['exact'][2]:.3f} dynamic {staged['dynamic'][2]:.3f}")
    print(f"dynamic_over_exact: {rate['dynamic'] / rate['exact']:.2f}")
    questions = label_questions(args.questions, 0)
    prefills = [labeling.answer_prefill()] * len(questions)
    seconds = {}
    for batching in ("exact", "dynamic"):
        scfg = engines.ScoringConfig(batch_size=8, batching=batching, progress=False)
        scorer = hf.TransformersChoiceScorer(engine.model, engine.tokenizer, scfg, engine.device)
        seconds[batching] = min(timed(scorer.choice_logprobs, questions, prefills)[1] for _ in range(args.repeats))
    print(
        f"scoring_dynamic_over_exact: {seconds['exact'] / seconds['dynamic']:.2f} "
        f"({len(questions)} label-shaped questions without demos, batch 8: exact {seconds['exact']:.2f} s, "
        f"dynamic {seconds['dynamic']:.2f} s)"
    )


if __name__ == "__main__":
    main()
