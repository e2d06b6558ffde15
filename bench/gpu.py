"""Benchmark on one CUDA GPU: SFT model-FLOPs utilisation and the transformers engine's generation throughput.

- `mfu:` SFT as the `gpu` profile trains (`sft` section of `profile=gpu`: bf16, gradient checkpointing, attention
  auto, fused loss auto, padding-free auto), on rows of exactly `--seq-len` tokens (half prompt, half completion),
  `--batch-size` rows per step. Steps after `--warmup` are timed (CUDA synchronised); MFU = model FLOPs per second
  over the GPU's dense bf16 peak, with model FLOPs per token = 6 x (parameters outside the input embedding, the
  output layer counted even when tied) + 12 x layers x hidden x seq-len (attention, PaLM's accounting). Recomputed
  activations (gradient checkpointing) are not counted: this is MFU, not hardware utilisation.
- the `gpu` profile's `sft` and `pm` stages themselves, on synthetic rows: their metrics, printed as they come.
- `gen_gpu:` tokens/s of caiforge's transformers engine (`engines.make_generator`, backend transformers, bf16) on
  `--gen-prompts` distinct chat prompts in batches of `--gen-batch`, `--gen-tokens` new tokens each, greedy, after a
  warm-up call. Random weights seldom emit the end token, so nearly every row decodes all its tokens.

The model is `--model` (a saved causal LM with tokenizer), or, by default, SmolLM2-135M's architecture with random
weights (`--shape-of`: a directory holding its config.json and tokenizer, e.g. the one bench/gpu_prepare.sh
writes): throughput does not depend on the weights' values.

    python bench/gpu.py --shape-of .gpu/smollm2        # prints mfu: and gen_gpu:
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "stages"))

from caiforge import config, engines, models, training  # noqa: E402

PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "H800": 989.4e12, "A100": 312e12, "L40S": 362e12}
"""Dense bf16 tensor-core peaks (FLOP/s) of the SXM parts, from NVIDIA's data sheets."""


def peak_flops(override: float | None) -> tuple[float, str]:
    name = torch.cuda.get_device_name()
    if override:
        return override * 1e12, name
    for key, value in PEAK_BF16.items():
        if key in name:
            return value, name
    raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops (its dense bf16 peak)")


def random_model(shape_of: Path, out: Path) -> Path:
    """`shape_of`'s architecture and tokenizer with seeded random weights, saved like a models role."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(shape_of)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    models.save(model, AutoTokenizer.from_pretrained(shape_of), out)
    return out


def model_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    c = model.config
    params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    if c.tie_word_embeddings:
        params += model.get_output_embeddings().weight.numel()
    return 6.0 * params + 12.0 * c.num_hidden_layers * c.hidden_size * seq_len


def profile_stages(model_dir: Path, tmp: Path) -> dict[str, dict]:
    """The `gpu` profile's `sft` and `pm` stages (`run(cfg)`, one process) on synthetic rows, trained from
    `model_dir`: their metrics.json (parallelism, kernels' effect on held-out loss, train seconds)."""
    import pm
    import sft

    from tests.stages.test_pm import write_preferences
    from tests.stages.test_sft import write_sft

    params = config.compose(["profile=gpu"])
    write_sft(tmp / "sft.parquet", n=256)
    write_preferences(tmp / "preferences.parquet")
    out = {}
    for name, module, cls, data in (
        ("sft", sft, sft.SftConfig, tmp / "sft.parquet"),
        ("pm", pm, pm.PmConfig, tmp / "preferences.parquet"),
    ):
        section = {**params[name], "data": str(data), "policy": str(model_dir), "out_dir": str(tmp / name)}
        t0 = time.perf_counter()
        metrics = module.run(config.build(cls, section, "params.yaml", name))
        out[name] = {**metrics, "stage_seconds": round(time.perf_counter() - t0, 2)}
    return out


def sft_mfu(model_dir: Path, seq_len: int, batch: int, steps: int, warmup: int, peak: float) -> dict:
    import sft
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    section = config.compose(["profile=gpu"])["sft"]
    section.update(data="unused", policy=str(model_dir), out_dir="unused", max_length=seq_len, batch_size=batch)
    cfg = config.build(sft.SftConfig, section, "params.yaml", "sft")
    kernel = training.attention(cfg.attention)
    model, tokenizer = models.load_pretrained(model_dir, attention=kernel)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    rows = batch * (steps + warmup)
    ids = torch.randint(0, vocab, (rows, seq_len), generator=g).tolist()
    half = seq_len // 2
    data = Dataset.from_dict({"input_ids": ids, "completion_mask": [[0] * half + [1] * (seq_len - half)] * rows})
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(
            **training.trainer_args(cfg, Path(scratch)),
            **training.prompt_completion_args(seq_len, training.padding_free(cfg.batching, kernel)),
        )
        args.num_train_epochs, args.max_steps, args.shuffle_dataset = 1, steps + warmup, False
        clock = [Clock()]
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=clock)
        trainer.train()
    timed = times[warmup:]
    tokens_per_second = batch * seq_len * len(timed) / sum(timed)
    flops = model_flops_per_token(trainer.model, seq_len) * tokens_per_second
    return {
        "mfu": flops / peak,
        "tokens_per_second": tokens_per_second,
        "step_seconds": sum(timed) / len(timed),
        "attention": kernel,
        "fused_loss": args.use_liger_kernel,
        "padding_free": args.padding_free,
        "gradient_checkpointing": args.gradient_checkpointing,
    }


def generation(model_dir: Path, prompts: int, batch: int, new_tokens: int) -> dict:
    lines = (ROOT / "data/seed/helpful_prompts.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines if line.strip()]
    convs = [[{"role": "user", "content": f"{texts[i % len(texts)]} ({i})"}] for i in range(prompts)]
    cfg = engines.GenerationConfig(
        backend="transformers",
        device="cuda",
        dtype="bfloat16",
        batch_size=batch,
        max_new_tokens=new_tokens,
        temperature=0.0,
        progress=False,
    )
    gen = engines.make_generator(model_dir, cfg)
    gen.chat(convs[:batch], seed=1)  # warm-up: CUDA context, kernels, allocator
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = gen.chat(convs, seed=0)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = sum(c.completion_tokens for c in out)
    return {"tokens_per_second": tokens / seconds, "tokens": tokens, "seconds": seconds, "rows": len(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a saved causal LM (default: random weights, --shape-of)")
    parser.add_argument("--shape-of", type=Path, default=ROOT / ".gpu" / "smollm2")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gen-prompts", type=int, default=1024)
    parser.add_argument("--gen-batch", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in PEAK_BF16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU")
    peak, name = peak_flops(args.peak_tflops)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or random_model(args.shape_of, Path(tmp) / "model")
        for name, metrics in profile_stages(model_dir, Path(tmp)).items():
            print(f"{name} (profile gpu): {json.dumps(metrics, default=str)}", flush=True)
        train = sft_mfu(model_dir, args.seq_len, args.batch_size, args.steps, args.warmup, peak)
        print(f"sft: {json.dumps(train)}", flush=True)
        gen = generation(model_dir, args.gen_prompts, args.gen_batch, args.gen_tokens)
        print(f"generation: {json.dumps(gen)}", flush=True)
    print(f"gpu={name} peak_bf16={peak / 1e12:.1f} TFLOP/s seq_len={args.seq_len} batch={args.batch_size}")
    print(f"mfu: {100 * train['mfu']:.1f}% ({train['tokens_per_second']:.0f} tokens/s)")
    print(f"gen_gpu: {gen['tokens_per_second']:.0f} tok/s (batch {args.gen_batch} x {args.gen_tokens} new tokens)")


if __name__ == "__main__":
    main()
