"""Training on CUDA GPUs: sharded training saves what one process saves, and the fast kernels train on the loss SDPA
gives. Every test here needs CUDA (marker `gpu`) and skips with the reason without it; bench/gpu_check.sh runs them
on a lent GPU machine. The CPU counterparts are tests/stages/test_launch.py (DDP and FSDP2 over gloo).

Tolerances:
- Sharded against one process, fp32 and SDPA: 1e-4 max absolute weight difference. The runs take the same steps on
  the same rows (see test_launch.py); on a GPU the embedding backward adds rows with atomics in no fixed order and
  cuBLAS may pick other kernels for other per-device batch shapes, so a few float32 ulps of every update differ,
  against a training move of about 1e-2 here.
- A fast kernel against SDPA, bf16: the mean training loss at learning rate 0 (every step sees the initial weights,
  so only the kernel differs) within 2% relative. bf16 keeps 8 significant bits (0.4% per rounding); the kernels
  round and accumulate in other orders (FlashAttention's tiled softmax, Liger's chunked cross-entropy with float32
  accumulation, padding-free's one flattened sequence), which moves a loss averaged over a few hundred tokens by a
  few such roundings.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.stages.test_launch import free_port, max_difference, run_stage, small_sft, stage_command, stage_env

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]
SHARDED_TOLERANCE = 1e-4
KERNEL_RELATIVE_TOLERANCE = 2e-2
ROOT = Path(__file__).resolve().parents[2]


def sft_on_gpu(tmp_path: Path, name: str, launch: list[str], extra: list[str]) -> tuple[Path, dict]:
    out = tmp_path / name
    done = run_stage("sft", 1, [*extra, f"sft.out_dir={out}"]) if not launch else _launched(launch, extra, out)
    assert done.returncode == 0, done.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["dvclive", "metrics.json", "model"]
    return out, json.loads((out / "metrics.json").read_text())


def _launched(launch: list[str], extra: list[str], out: Path) -> subprocess.CompletedProcess:
    cmd = stage_command("sft", *launch, *extra, f"sft.out_dir={out}")
    return subprocess.run(cmd, cwd=ROOT, env=stage_env(), capture_output=True, text=True, timeout=600, check=False)


def fp32_sft(tmp_path: Path, model: Path) -> list[str]:
    return [
        *small_sft(tmp_path, model, 18),
        "sft.epochs=2",
        "sft.learning_rate=0.001",
        "sft.precision=fp32",
        "sft.attention=sdpa",
        "sft.fused_loss=none",
        "sft.batching=padded",
        "sft.lora.enabled=false",
    ]


def processes() -> int:
    """2 when the machine has 2 GPUs or more (real sharding), else 1 (wrapping, gathering and saving still run)."""
    return min(torch.cuda.device_count(), 2)


def sharded_run(tmp_path: Path, model: Path, config_file: str, parallelism: str) -> None:
    n = processes()
    common = fp32_sft(tmp_path, model)
    one, m1 = sft_on_gpu(tmp_path, "one", [], [*common, "sft.batch_size=2"])
    launch = [f"launch.config_file={config_file}", f"launch.num_processes={n}"]
    launch.append(f"launch.main_process_port={free_port()}")
    sharded, m2 = sft_on_gpu(tmp_path, "sharded", launch, [*common, f"sft.batch_size={2 // n}"])
    assert m2["parallelism"] == parallelism and m2["processes"] == n
    assert m1["global_batch_size"] == m2["global_batch_size"] == 2 and m1["steps"] == m2["steps"]
    moved = max_difference(model, one / "model")
    diff = max_difference(one / "model", sharded / "model")
    print(f"{parallelism} on {n} GPU(s): max |w_1proc - w_sharded| = {diff:.3g} (training moved weights {moved:.3g})")
    assert moved > 10 * SHARDED_TOLERANCE
    assert diff <= SHARDED_TOLERANCE
    assert m2["heldout_loss_after"] == pytest.approx(m1["heldout_loss_after"], rel=1e-3)


def test_fsdp2_on_the_gpus_present_saves_what_one_process_saves(tmp_path, tiny_model_dir):
    sharded_run(tmp_path, tiny_model_dir, "conf/accelerate/fsdp.yaml", "FSDP2")


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_saves_what_one_process_saves(tmp_path, tiny_model_dir, stage):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs the deepspeed package (uv pip install deepspeed)")
    sharded_run(tmp_path, tiny_model_dir, f"conf/accelerate/zero{stage}.yaml", f"DEEPSPEED_ZERO{stage}")


KERNELS = {
    "flash_attention_2": ("flash_attn", ["sft.attention=flash_attention_2", "sft.batching=padded"]),
    "liger": ("liger_kernel", ["sft.fused_loss=liger"]),
    "padding_free": ("flash_attn", ["sft.attention=flash_attention_2", "sft.batching=padding_free"]),
}


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_fast_kernels_train_on_the_loss_sdpa_gives(tmp_path, tiny_model_dir, kernel):
    package, overrides = KERNELS[kernel]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"needs the {package} package")
    at_rest = [
        *small_sft(tmp_path, tiny_model_dir, 34),
        "sft.epochs=1",
        "sft.batch_size=4",
        "sft.learning_rate=0.0",  # every step sees the initial weights: only the kernel differs
        "sft.precision=bf16",
        "sft.logging_steps=1",
        "sft.lora.enabled=false",
    ]
    base = ["sft.attention=sdpa", "sft.fused_loss=none", "sft.batching=padded"]
    _, sdpa = sft_on_gpu(tmp_path, "sdpa", [], [*at_rest, *base])
    _, fast = sft_on_gpu(tmp_path, kernel, [], [*at_rest, *base, *overrides])
    print(f"{kernel}: mean train loss {fast['mean_train_loss']:.6f} against SDPA's {sdpa['mean_train_loss']:.6f}")
    assert fast["steps"] == sdpa["steps"] > 1
    assert fast["mean_train_loss"] == pytest.approx(sdpa["mean_train_loss"], rel=KERNEL_RELATIVE_TOLERANCE)
