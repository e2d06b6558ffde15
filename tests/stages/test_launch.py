"""Training stages under `accelerate launch`: 2 real processes (DDP over gloo on loopback) against 1 process.
sft, pm and distill (whose teacher answers are sharded and gathered) must match one process; rlaif runs a GRPO step.
sft and pm also run under FSDP2 (PyTorch's `fully_shard` over gloo, the shipped conf/accelerate/fsdp.yaml on CPU):
every process gathers the sharded weights, rank 0 saves them, and they must equal the DDP run's.

What must hold: one copy of each output (written by rank 0), the global batch recorded, and the same weights as
one process with the same global batch. Tolerance: 1e-5 max absolute difference. The two runs take the same
optimizer steps on the same examples (accelerate shards the seeded order batch by batch, and token-level losses
average over every process's tokens), so what remains is float32 summation order: the all-reduce adds two
half-batch gradients where one process sums the whole batch. Measured: 6e-8 (sft) and 9e-8 (pm) on weights that
training moved by 4e-3 and 1.

The training rows here divide by the global batch. When they do not, accelerate completes each epoch's last step
with rows from the epoch's start (`even_batches`), so that one step differs from one process's shorter last step:
2e-3 on 17 rows. The held-out losses are computed on rank 0 alone (a Trainer.evaluate() before training moved
the 2-process data order).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from caiforge import launch
from caiforge.engines.serving import free_port
from tests.conftest import write_prompts
from tests.stages.test_pm import write_preferences
from tests.stages.test_rlaif import pm_dir  # noqa: F401 (the fixture: a PM trained on synthetic preferences)
from tests.stages.test_sft import write_sft

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-5
pytestmark = pytest.mark.slow


def launch_overrides(processes: int) -> list[str]:
    """One plain process, or DDP with `processes` processes on a free loopback port."""
    if processes == 1:
        return ["launch.config_file=null", "launch.num_processes=1"]
    return [
        "launch.config_file=conf/accelerate/ddp.yaml",
        f"launch.num_processes={processes}",
        f"launch.main_process_port={free_port()}",
    ]


def stage_command(stage: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "caiforge.launch", stage, *args]


def stage_env(threads: int = 1) -> dict[str, str]:
    """The environment of a stage run by hand (not by DVC), with `threads` torch threads per process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("DVC_STAGE", None)
    return env


def small_sft(tmp_path: Path, model: Path, rows: int) -> list[str]:
    """sft overrides for a few quick steps on `rows` synthetic rows (written to tmp_path/data.parquet)."""
    write_sft(tmp_path / "data.parquet", n=rows)
    return [
        f"sft.data={tmp_path / 'data.parquet'}",
        f"sft.policy={model}",
        "sft.batch_size=2",
        "sft.gradient_accumulation_steps=1",
        "sft.max_length=64",
        "sft.checkpoint_every=0",
    ]


def run_stage(stage: str, processes: int, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        stage_command(stage, *launch_overrides(processes), *args),
        cwd=ROOT,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def max_difference(a: Path, b: Path, shared_only: bool = False) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    keys = wa.keys() & wb.keys() if shared_only else wa.keys()
    assert keys and (shared_only or wa.keys() == wb.keys())
    return max(float((wa[k] - wb[k]).abs().max()) for k in keys)


def fsdp2_on_cpu(tmp_path: Path, stage: str, args: list[str]) -> subprocess.CompletedProcess:
    """`stage` on 2 processes under the shipped FSDP2 config with `use_cpu: true`, through tests/assets/fsdp_on_cpu.py
    (which lets accelerate pick FSDP without a GPU; see its docstring)."""
    config = yaml.safe_load((ROOT / "conf" / "accelerate" / "fsdp.yaml").read_text())
    config_file = tmp_path / "fsdp_cpu.yaml"
    config_file.write_text(yaml.safe_dump({**config, "use_cpu": True}))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    launcher += ["--num_processes", "2", "--main_process_port", str(free_port())]
    script = [str(ROOT / "tests" / "assets" / "fsdp_on_cpu.py"), str(ROOT / "stages" / f"{stage}.py")]
    cmd = [*launcher, *script, *args]
    return subprocess.run(cmd, cwd=ROOT, env=stage_env(), capture_output=True, text=True, timeout=600, check=False)


def trained(
    tmp_path: Path, stage: str, processes: int, batch: int, common: list[str], fsdp2: bool = False
) -> tuple[Path, dict]:
    out = tmp_path / f"{stage}-{processes}{'-fsdp2' if fsdp2 else ''}"
    args = [*common, f"{stage}.out_dir={out}", f"{stage}.batch_size={batch}"]
    done = fsdp2_on_cpu(tmp_path, stage, args) if fsdp2 else run_stage(stage, processes, args)
    assert done.returncode == 0, done.stderr[-4000:]
    # One copy of every output: rank 1 wrote nothing, not even a second dvclive run.
    extra = ["signal.json"] if stage == "pm" else []  # the gate's evidence, for rlaif
    assert sorted(p.name for p in out.iterdir()) == sorted(["dvclive", "metrics.json", "model", *extra])
    metrics = json.loads((out / "metrics.json").read_text())
    ddp = "MULTI_GPU" if torch.cuda.is_available() else "MULTI_CPU"
    expected = "FSDP2" if fsdp2 else "NO" if processes == 1 else ddp
    assert metrics["parallelism"] == expected, f"the Trainer really ran {expected}"
    return out, metrics


def approx_metrics(a, b) -> bool:
    """Held-out metrics equal up to float summation order (rel 1e-4); intervals and counts exactly."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(approx_metrics(a[k], b[k]) for k in a)
    if isinstance(a, float):
        return a == pytest.approx(b, rel=1e-4)
    return a == b


@pytest.mark.parametrize("stage", ["sft", "pm"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir, stage):
    if stage == "sft":
        write_sft(tmp_path / "data.parquet", n=18)  # 16 training rows and 2 held out
    else:
        write_preferences(tmp_path / "data.parquet")
    common = [
        f"{stage}.data={tmp_path / 'data.parquet'}",
        *(["pm.source=ai"] if stage == "pm" else []),  # the synthetic pairs are AI labels, whatever the default
        f"{stage}.policy={tiny_model_dir}",
        f"{stage}.epochs=2",
        f"{stage}.gradient_accumulation_steps=1",
        f"{stage}.learning_rate=0.001",
        f"{stage}.max_length=64",
        f"{stage}.checkpoint_every=0",
        f"{stage}.lora.enabled=false",
    ]
    one, m1 = trained(tmp_path, stage, 1, 4, common)
    two, m2 = trained(tmp_path, stage, 2, 2, common)
    sharded, m3 = trained(tmp_path, stage, 2, 2, common, fsdp2=True)
    assert (m1["processes"], m1["per_device_batch_size"], m1["global_batch_size"]) == (1, 4, 4)
    assert (m2["processes"], m2["per_device_batch_size"], m2["global_batch_size"]) == (2, 2, 4)
    assert m1["steps"] == m2["steps"] > 0
    assert m1.get("train_rows", m1.get("train_pairs")) % 4 == 0, "rows that divide by the global batch (see above)"
    before, after = (
        ("heldout_loss_before", "heldout_loss_after") if stage == "sft" else ("heldout_before", "heldout_after")
    )
    assert m1[before] == m2[before] and approx_metrics(m1[after], m2[after])
    moved = max_difference(tiny_model_dir, one / "model", shared_only=True)  # the pm adds a head: compare the rest
    diff = max_difference(one / "model", two / "model")
    print(f"{stage}: max |w_1proc - w_2proc| = {diff:.3g} (training moved weights by up to {moved:.3g})")
    assert diff <= TOLERANCE
    assert moved > 100 * TOLERANCE, "the comparison means something only if training moved the weights"
    # FSDP2: the same steps on the same rows as DDP, with sharded parameters gathered whole for the save.
    assert (m3["processes"], m3["global_batch_size"], m3["steps"]) == (2, 4, m2["steps"])
    assert m3[before] == m2[before] and approx_metrics(m3[after], m2[after])
    sharded_diff = max_difference(two / "model", sharded / "model")
    print(f"{stage}: max |w_ddp - w_fsdp2| = {sharded_diff:.3g}")
    assert sharded_diff <= TOLERANCE


def test_fsdp2_lora_sft_saves_the_merged_weights_ddp_saves(tmp_path, tiny_model_dir):
    """LoRA under FSDP2: the adapters are sharded with the rest, gathered, rebuilt around the whole weights and
    merged on rank 0: an ordinary checkpoint (the base model's keys), equal to the DDP run's."""
    common = [
        *small_sft(tmp_path, tiny_model_dir, 18),
        "sft.epochs=2",
        "sft.learning_rate=0.001",
        "sft.lora.enabled=true",
    ]
    ddp, _ = trained(tmp_path, "sft", 2, 2, common)
    sharded, _ = trained(tmp_path, "sft", 2, 2, common, fsdp2=True)
    assert (
        load_file(str(sharded / "model" / "model.safetensors")).keys()
        == load_file(str(tiny_model_dir / "model.safetensors")).keys()
    ), "merged: no adapter keys left"
    assert max_difference(tiny_model_dir, sharded / "model") > 100 * TOLERANCE, "the adapters moved the weights"
    assert max_difference(ddp / "model", sharded / "model") <= TOLERANCE


def sampled_generation(stage: str) -> list[str]:
    """A few sampled tokens per answer: a random tiny model decodes greedily into special tokens (empty answers)."""
    return [
        f"{stage}.generation.batch_size=8",
        f"{stage}.generation.max_new_tokens=8",
        f"{stage}.generation.temperature=1.0",
        f"{stage}.generation.progress=false",
    ]


def test_distill_shards_the_teacher_answers_and_matches_one_process(tmp_path, tiny_model_dir):
    """distill under 2 processes: each answers half of the teacher's prompts, the halves are gathered in row order,
    and the student ends where one process with the same global batch leaves it (the tolerance above). Answers
    gathered out of order would pair prompts with other prompts' answers: other data, other weights."""
    common = [
        f"distill.prompts={write_prompts(tmp_path / 'prompts.parquet')}",
        f"distill.teacher={tiny_model_dir}",
        f"distill.student={tiny_model_dir}",
        "distill.prune_every=2",
        "distill.prune_keep=null",  # cpu_demo's list names SmolLM2's 30 layers; the tiny teacher has 2
        "distill.heldout_fraction=0.3",
        "distill.max_prompts=8",
        "distill.max_heldout_prompts=4",
        "distill.epochs=2",
        "distill.learning_rate=0.001",
        "distill.gradient_accumulation_steps=1",
        "distill.max_length=128",
        "distill.checkpoint_every=0",
        *sampled_generation("distill"),
    ]
    one, m1 = trained(tmp_path, "distill", 1, 4, [*common, f"distill.row_cache.dir={tmp_path / 'rows-1'}"])
    two, m2 = trained(tmp_path, "distill", 2, 2, [*common, f"distill.row_cache.dir={tmp_path / 'rows-2'}"])
    assert (m1["global_batch_size"], m2["processes"], m2["global_batch_size"]) == (4, 2, 4)
    assert m1["steps"] == m2["steps"] > 0 and m1["train_rows"] % 4 == 0
    assert m1["heldout_before"] == m2["heldout_before"]
    assert m1["heldout_after"]["top1_agreement"] == pytest.approx(m2["heldout_after"]["top1_agreement"], abs=1e-6)
    moved = max_difference(one / "model", tiny_model_dir, shared_only=True)
    diff = max_difference(one / "model", two / "model")
    print(f"distill: max |w_1proc - w_2proc| = {diff:.3g} (training moved weights by up to {moved:.3g})")
    assert diff <= TOLERANCE
    assert moved > 100 * TOLERANCE


def test_rlaif_grpo_step_under_two_processes(tmp_path, tiny_model_dir, pm_dir):  # noqa: F811
    """One GRPO step on 2 processes: each samples and rewards its own prompts (2 answers each), rank 0 alone
    answers the held-out prompts before and after and writes the one copy of every output."""
    common = [
        f"rlaif.prompts={write_prompts(tmp_path / 'prompts.parquet')}",
        f"rlaif.policy={tiny_model_dir}",
        f"rlaif.reward_model={pm_dir / 'pm' / 'model'}",
        f"rlaif.preferences={pm_dir / 'preferences.parquet'}",
        f"rlaif.pm_signal={pm_dir / 'pm' / 'signal.json'}",
        "rlaif.gate.on_noise=warn",  # the tiny PM's held-out interval may reach 0.5: train anyway, marked
        "rlaif.algorithm=grpo",
        "rlaif.max_steps=1",
        "rlaif.gradient_accumulation_steps=1",
        "rlaif.num_generations=2",
        "rlaif.max_completion_length=8",
        "rlaif.mask_truncated_completions=false",
        "rlaif.heldout_fraction=0.3",
        "rlaif.max_prompts=8",
        "rlaif.max_heldout_prompts=2",
        "rlaif.kl_max_new_tokens=8",
        "rlaif.reward_max_length=128",
        "rlaif.checkpoint_every=0",
        "rlaif.lora.enabled=false",
        *sampled_generation("rlaif"),
    ]
    out, metrics = trained(tmp_path, "rlaif", 2, 2, common)
    assert (metrics["processes"], metrics["per_device_batch_size"], metrics["global_batch_size"]) == (2, 2, 4)
    assert metrics["steps"] == 1 and metrics["heldout_prompts"] == 2
    assert isinstance(metrics["reward_before"], float) and isinstance(metrics["reward_after"], float)
    assert metrics["train_reward_mean"] is not None, "every process rewarded its samples with the PM"
    assert max_difference(out / "model", tiny_model_dir) > 0, "the step moved the policy"


def rank_pids(parent: int, rank: str) -> list[int]:
    """Descendants of `parent` whose environment says RANK=`rank` (torchrun's workers)."""
    found = []
    for child in psutil.Process(parent).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.environ().get("RANK") == rank:
                found.append(child.pid)
    return found


def long_training(cmd: list[str], out: Path) -> subprocess.Popen:
    """`cmd` (an sft run) with minutes of training, once rank 0 has built its Trainer and trained a few seconds:
    a run to kill mid-training."""
    proc = subprocess.Popen(
        [*cmd, "sft.epochs=200"], cwd=ROOT, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    while not (out / "dvclive").exists():  # rank 0 has built its Trainer: training is about to start
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the run never started training: {proc.communicate()[1][-3000:]}")
        time.sleep(0.2)
    time.sleep(3)
    return proc


def test_a_killed_rank_fails_the_stage_and_a_rerun_succeeds(tmp_path, tiny_model_dir):
    """SIGKILL rank 1 mid-training: accelerate (torchrun) stops rank 0, the stage exits non-zero saying so, and
    no model is written; the same command afterwards builds the stage cleanly."""
    out = tmp_path / "out"
    args = [*small_sft(tmp_path, tiny_model_dir, 64), f"sft.out_dir={out}"]
    proc = long_training(stage_command("sft", *launch_overrides(2), *args), out)
    try:
        victims, survivors = rank_pids(proc.pid, "1"), rank_pids(proc.pid, "0")
        assert len(victims) == len(survivors) == 1, f"expected one worker per rank, found {victims}, {survivors}"
        os.kill(victims[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "sft: error: a training process failed" in stderr
    assert not (out / "model").exists() and not (out / "metrics.json").exists()
    assert not psutil.pid_exists(survivors[0]), "rank 0 must not outlive the stage"
    rerun = run_stage("sft", 2, [*args, "sft.epochs=1"])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["dvclive", "metrics.json", "model"]


def test_launch_config_errors_name_the_key(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="needs config_file"):
        launch.LaunchConfig(None, 2, 1, 0, None, 29500)
    with pytest.raises(ValueError, match="multiple of num_machines"):
        launch.LaunchConfig("conf/accelerate/ddp.yaml", 3, 2, 0, "10.0.0.1", 29500)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(ValueError, match="main_process_ip"):
        launch.LaunchConfig("conf/accelerate/ddp.yaml", 16, 2, 1, None, 29500)
    monkeypatch.setenv("SLURM_JOB_ID", "7")  # inside an allocation Slurm's first node is the main one
    assert launch.LaunchConfig("conf/accelerate/ddp.yaml", 16, 2, 0, None, 29500).main_process_ip is None
    with pytest.raises(ValueError, match="main_process_ip"):
        launch.LaunchConfig("conf/accelerate/ddp.yaml", 16, 2, 1, None, 29500, slurm="off")
    monkeypatch.delenv("SLURM_JOB_ID")
    cfg = launch.LaunchConfig("conf/accelerate/ddp.yaml", 2, 1, 0, None, 29500)
    with pytest.raises(launch.config.ConfigError, match="'label' runs in one process only"):
        launch.command("label", cfg, [], ROOT)
    multi = launch.LaunchConfig("conf/accelerate/zero3.yaml", 16, 2, 1, "10.0.0.1", 29501)
    cmd = launch.command("sft", multi, ["sft.epochs=1"], ROOT)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and cmd[-2:] == [
        str(ROOT / "stages/sft.py"),
        "sft.epochs=1",
    ]
    flags = dict(zip(cmd[3:-2:2], cmd[4:-2:2], strict=True))
    assert flags == {
        "--config_file": str(ROOT / "conf/accelerate/zero3.yaml"),
        "--num_processes": "16",
        "--num_machines": "2",
        "--machine_rank": "1",
        "--main_process_port": "29501",
        "--main_process_ip": "10.0.0.1",
    }
    # FSDP and ZeRO need CUDA: without it accelerate would quietly train DDP (measured: metrics said MULTI_CPU).
    for name, cuda in (("fsdp", False), ("zero3", False)):
        with pytest.raises(launch.config.ConfigError, match=r"needs CUDA GPUs.*launch=ddp"):
            launch.check_runnable(ROOT / "conf" / "accelerate" / f"{name}.yaml", cuda=cuda)
    launch.check_runnable(ROOT / "conf" / "accelerate" / "fsdp.yaml", cuda=True)
    launch.check_runnable(ROOT / "conf" / "accelerate" / "ddp.yaml", cuda=False)
    if not torch.cuda.is_available():
        done = run_stage("sft", 1, ["launch.config_file=conf/accelerate/fsdp.yaml", "launch.num_processes=2"])
        assert done.returncode == 1 and "fsdp.yaml asks for FSDP, which needs CUDA GPUs" in done.stderr
    single = launch.read(ROOT)
    assert launch.command("sft", single, [], ROOT) == [sys.executable, str(ROOT / "stages/sft.py")]
    done = run_stage("sft", 1, ["launch.num_processes=0"])
    assert done.returncode == 1 and "num_processes" in done.stderr and "params.yaml" in done.stderr


def test_two_machines_on_loopback_run_one_stage_with_the_readme_commands(tmp_path, tiny_model_dir):
    """The multi-node recipe, with two "machines" on 127.0.0.1: each runs `python -m caiforge.launch sft` with its
    own machine_rank; they train as one 2-process job and only machine 0 writes (to the out_dir both name)."""
    common = [
        "launch.config_file=conf/accelerate/ddp.yaml",
        "launch.num_processes=2",
        "launch.num_machines=2",
        "launch.main_process_ip=127.0.0.1",
        f"launch.main_process_port={free_port()}",
        *small_sft(tmp_path, tiny_model_dir, 18),
    ]
    nodes = {
        rank: subprocess.Popen(
            stage_command("sft", f"launch.machine_rank={rank}", *common, f"sft.out_dir={tmp_path / f'node{rank}'}"),
            cwd=ROOT,
            env=stage_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    }
    results = {rank: proc.communicate(timeout=300) for rank, proc in nodes.items()}
    for rank, proc in nodes.items():
        assert proc.returncode == 0, results[rank][1][-3000:]
    assert sorted(p.name for p in (tmp_path / "node0").iterdir()) == ["dvclive", "metrics.json", "model"]
    assert not (tmp_path / "node1").exists(), "machine 1 writes nothing"
    metrics = json.loads((tmp_path / "node0" / "metrics.json").read_text())
    assert (metrics["processes"], metrics["global_batch_size"]) == (2, 4)
