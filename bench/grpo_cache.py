"""Benchmark: rlaif's GRPO sampling from an SFT model saved with and without its KV cache switched on.

The Trainers turn `use_cache` off while training, and `training.save_model` used to save it that way
(config.json and generation_config.json); TRL's GRPO/RLOO then sample from the policy with transformers' `generate`,
which on such a model recomputes every earlier token at each new one. This runs `stages/rlaif.py` (GRPO, the signal
gate set to warn so that it trains) twice on the same built project, from two copies of its SFT model that differ
only in `use_cache`, and prints each run's training seconds (`train_seconds`, TRL's steps: sampling, reward, loss),
its truncated-sample share, and `no_cache: <ratio>` (no cache over cache).

Run it in a project where `uv run dvc repro pm` has built the SFT model, the PM and the prompts:

    uv run python bench/grpo_cache.py [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def policy_copy(source: Path, dest: Path, use_cache: bool) -> Path:
    shutil.copytree(source, dest)
    for name in ("config.json", "generation_config.json"):
        path = dest / name
        if path.is_file():
            data = json.loads(path.read_text())
            data["use_cache"] = use_cache
            path.write_text(json.dumps(data, indent=2))
    return dest


def run(policy: Path, out: Path, steps: int) -> tuple[float, dict]:
    cmd = [sys.executable, str(ROOT / "stages" / "rlaif.py"), f"rlaif.policy={policy}", f"rlaif.out_dir={out}"]
    cmd += ["rlaif.gate.on_noise=warn", "rlaif.algorithm=grpo", f"rlaif.max_steps={steps}"]
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"rlaif failed:\n{done.stderr[-3000:]}")
    return time.monotonic() - start, json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="GRPO steps per run")
    parser.add_argument("--sft", type=Path, default=ROOT / "data" / "sft" / "model")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="caiforge-grpo-cache-") as tmp:
        seconds = {}
        for use_cache in (False, True):
            name = "cache" if use_cache else "no_cache"
            policy = policy_copy(args.sft, Path(tmp) / f"policy-{name}", use_cache)
            wall, metrics = run(policy, Path(tmp) / f"out-{name}", args.steps)
            seconds[name] = metrics["train_seconds"]
            monitors = metrics.get("monitors", {})
            train, steps = metrics["train_seconds"], metrics["steps"]
            truncated = monitors.get("truncated_completion_fraction")
            print(f"{name:9s} stage {wall:6.1f} s  train {train:6.1f} s for {steps} steps  truncated {truncated}")
        ratio = seconds["no_cache"] / seconds["cache"]
        print(f"no_cache: {seconds['no_cache']:.1f} s / {seconds['cache']:.1f} s = {ratio:.2f}")


if __name__ == "__main__":
    main()
