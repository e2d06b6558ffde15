"""A real one-node Slurm (Debian's slurm-wlm and munge, started by `.ci/start-slurm`) for the stages that run inside
an allocation (#41): the cluster runs several steps at once in one allocation, each cancelled on its own; inside an
allocation a stage's managed llama-server is a job step that writes the rows a local one does, a cancelled step
fails the stage cleanly, and a SIGKILLed stage leaves no step behind.

Without a cluster these tests skip, except under CAIFORGE_REQUIRE_SLURM=1 (CI), where they fail."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import polars as pl
import psutil
import pytest

from caiforge.engines import serving
from caiforge.engines.serving import free_port
from tests.stages.test_launch import ROOT, long_training, max_difference, small_sft, stage_command, stage_env
from tests.stages.test_managed_servers import managed_cfg, serving_child, stage_process

pytestmark = pytest.mark.slow


def slurm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def cluster() -> None:
    """A Slurm controller that answers, with a node that takes jobs (`.ci/start-slurm` starts one as root)."""
    problem = None
    if shutil.which("srun") is None:
        problem = "no Slurm here (srun is not on PATH): run .ci/start-slurm as root"
    elif (done := slurm("sinfo", "-h", "-o", "%T", timeout=20)).returncode != 0 or not done.stdout.strip():
        problem = f"Slurm does not answer (sinfo: {done.stderr.strip() or 'no node'}): run .ci/start-slurm"
    if problem:
        if os.environ.get("CAIFORGE_REQUIRE_SLURM") == "1":
            pytest.fail(problem)
        pytest.skip(problem)


@pytest.fixture
def allocation(cluster) -> Iterator[str]:
    """A job allocation of the whole node (`salloc --no-shell`), cancelled afterwards; its job id."""
    done = slurm("salloc", "--no-shell", "--nodes=1", "--ntasks=2", "--time=10", "--job-name=caiforge-test")
    found = re.search(r"Granted job allocation (\d+)", done.stderr)
    assert found, done.stderr
    job = found.group(1)
    try:
        yield job
    finally:
        slurm("scancel", job)
        wait_until(lambda: not steps(job) and job not in slurm("squeue", "-h", "-o", "%i").stdout.split())


def steps(job: str) -> list[str]:
    """The names of `job`'s running steps (`squeue -s`)."""
    return slurm("squeue", "-h", "-s", "-j", job, "-o", "%j").stdout.split()


def wait_until(check, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "Slurm did not get there in time"
        time.sleep(0.3)


def step(job: str, name: str) -> subprocess.Popen:
    """`sleep` as a job step of `job` beside the others (`--overlap`: managed replicas share the allocation)."""
    cmd = ["srun", f"--jobid={job}", "--overlap", "--ntasks=1", f"--job-name={name}", "sleep", "300"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_an_allocation_runs_steps_side_by_side_cancels_each_alone_and_ends_with_none(allocation):
    replicas = {name: step(allocation, name) for name in ("replica-0", "replica-1")}
    try:
        wait_until(lambda: sorted(steps(allocation)) == ["replica-0", "replica-1"])
        ids = dict(
            line.split()[::-1]
            for line in slurm("squeue", "-h", "-s", "-j", allocation, "-o", "%i %j").stdout.splitlines()
        )
        assert slurm("scancel", ids["replica-0"]).returncode == 0
        wait_until(lambda: steps(allocation) == ["replica-1"])
        assert replicas["replica-0"].wait(timeout=60) != 0, "a cancelled step's srun fails"
        assert replicas["replica-1"].poll() is None, "the other step runs on"
        assert slurm("scancel", allocation).returncode == 0
        wait_until(lambda: not steps(allocation))
        # The allocation's end ends the other step's srun too. Its exit status is not asserted: srun exits 143 when
        # its task's SIGTERM reaches it first, 0 when the job's end does (CI, under load, saw 0).
        replicas["replica-1"].wait(timeout=60)
    finally:
        for process in replicas.values():
            if process.poll() is None:
                process.kill()


@pytest.fixture
def inside(allocation, monkeypatch) -> str:
    """This test process (and the stages it starts) inside the allocation, as under `sbatch`: its job id."""
    nodelist = slurm("squeue", "-h", "-j", allocation, "-o", "%N").stdout.strip()
    monkeypatch.setenv("SLURM_JOB_ID", allocation)
    monkeypatch.setenv("SLURM_JOB_NODELIST", nodelist)
    return allocation


def test_a_managed_llama_server_runs_as_a_job_step_and_writes_the_rows_a_local_one_does(
    allocation, tmp_path, smollm2_dir, llama_binary, converter, monkeypatch
):
    monkeypatch.setenv("CAIFORGE_GGUF_CACHE", str(tmp_path / "gguf"))
    managed = {"launch": "llama_server", "args": ["--threads", "1", "--ctx-size", "4096"]}
    rows = {}  # one request at a time: llama.cpp's sampled text changes with what else is in its batch
    for where in ("local", "step"):
        if where == "step":
            monkeypatch.setenv("SLURM_JOB_ID", allocation)
            monkeypatch.setenv("SLURM_JOB_NODELIST", slurm("squeue", "-h", "-j", allocation, "-o", "%N").stdout)
        (tmp_path / where).mkdir()
        stage, cfg = managed_cfg(tmp_path / where, smollm2_dir, managed, in_flight=1)
        try:
            stage.run(cfg)
            [fleet] = serving.running()
            [replica] = fleet.replicas
            if where == "step":
                assert replica.command[0] == "srun" and replica.job == allocation
                assert replica.url.startswith(f"http://{socket.gethostname()}:"), replica.url
                assert steps(allocation) == [replica.name], "the replica is a step of the allocation"
            else:
                assert replica.job is None and replica.url.startswith("http://127.0.0.1:")
        finally:
            serving.stop_all()
        assert not steps(allocation), "the stage's end cancelled its step"
        rows[where] = pl.read_parquet(tmp_path / where / "out" / "revisions.parquet")
    assert rows["step"].height == 6
    assert rows["step"].equals(rows["local"])


def srun_of(stage: subprocess.Popen) -> tuple[psutil.Process, str]:
    """The stage's `srun` of its replica's step once the replica answers /v1/models, and its step's name."""
    child, cmdline = serving_child(stage, lambda cmdline: cmdline[:1] == ["srun"], socket.gethostname())
    return child, next(a.removeprefix("--job-name=") for a in cmdline if a.startswith("--job-name="))


def step_stage(tmp_path, smollm2_tokenizer_dir, smollm2_gguf, llama_binary) -> subprocess.Popen:
    command = f"{llama_binary} --model {smollm2_gguf} --host {{host}} --port {{port}} --alias {{name}} --threads 1"
    return stage_process(tmp_path, smollm2_tokenizer_dir, command)


def test_a_cancelled_serving_step_fails_the_stage_with_its_status_and_leaves_no_step(
    inside, tmp_path, smollm2_gguf, smollm2_tokenizer_dir, llama_binary
):
    stage = step_stage(tmp_path, smollm2_tokenizer_dir, smollm2_gguf, llama_binary)
    try:
        _, name = srun_of(stage)
        ids = dict(
            line.split()[::-1] for line in slurm("squeue", "-h", "-s", "-j", inside, "-o", "%i %j").stdout.splitlines()
        )
        assert slurm("scancel", ids[name]).returncode == 0
        output = stage.communicate(timeout=120)[0]
    finally:
        if stage.poll() is None:
            stage.kill()
    assert stage.returncode == 1, output[-3000:]
    assert "exited with" in output and "srun" in output, output[-3000:]
    assert not (tmp_path / "out" / "revisions.parquet").exists(), "no half-written output"
    assert not steps(inside)


def test_a_sigkilled_stage_leaves_no_step_running_within_15_s(
    inside, tmp_path, smollm2_gguf, smollm2_tokenizer_dir, llama_binary
):
    stage = step_stage(tmp_path, smollm2_tokenizer_dir, smollm2_gguf, llama_binary)
    try:
        _, name = srun_of(stage)
        assert steps(inside) == [name]
        os.kill(stage.pid, signal.SIGKILL)
        stage.communicate(timeout=60)
        wait_until(lambda: not steps(inside), within=15)
    finally:
        if stage.poll() is None:
            stage.kill()
    # The step's server and the stage's srun are gone too.
    wait_until(lambda: not [c for c in map(cmdline, processes_of(inside)) if str(smollm2_gguf) in c], within=15)


def cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []  # gone since it was listed


def processes_of(job: str) -> list[psutil.Process]:
    """The processes Slurm started for `job` (another test's server on the same GGUF is not one of them)."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.environ().get("SLURM_JOB_ID") == job and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
    return found


def test_a_two_machine_sft_runs_as_one_srun_step_and_trains_the_plain_two_process_weights(
    inside, tmp_path, tiny_model_dir
):
    """`num_machines: 2` inside an allocation: one `python -m caiforge.launch sft` starts both machines' launchers as
    one srun step (two tasks on the one node), ranks from Slurm; the model equals a plain 2-process run's."""
    common = [*small_sft(tmp_path, tiny_model_dir, 18), "launch.config_file=conf/accelerate/ddp.yaml"]
    common += ["launch.num_processes=2", f"launch.main_process_port={free_port()}"]
    slurm_out, plain_out = tmp_path / "slurm", tmp_path / "plain"
    done = subprocess.run(
        stage_command("sft", *common, "launch.num_machines=2", f"sft.out_dir={slurm_out}"),
        cwd=ROOT, env=stage_env(), capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"sft: one Slurm step for 2 machines: srun --jobid={inside} " in done.stderr
    assert "--ntasks=2" in done.stderr and "launch.main_process_ip=" in done.stderr
    metrics = json.loads((slurm_out / "metrics.json").read_text())
    assert (metrics["processes"], metrics["global_batch_size"]) == (2, 4)
    assert not steps(inside)
    plain = subprocess.run(
        stage_command("sft", *common, f"sft.out_dir={plain_out}"),
        cwd=ROOT, env={**stage_env(), "SLURM_JOB_ID": ""}, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr[-4000:]
    assert "Slurm step" not in plain.stderr
    assert max_difference(slurm_out / "model", plain_out / "model") <= 1e-6


def machine_processes(job: str, machine: str) -> list[psutil.Process]:
    """The processes of `job`'s training step that belong to machine `machine` (its task, accelerate, the worker)."""
    found = []
    for process in processes_of(job):
        with contextlib.suppress(psutil.Error):
            env = process.environ()
            if env.get("SLURM_PROCID") == machine and "CAIFORGE_SLURM_TASK" in env:
                found.append(process)
    return found


def running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_a_lost_machine_fails_the_srun_stage_with_nothing_written_and_a_rerun_builds_it(
    inside, tmp_path, tiny_model_dir
):
    """SIGKILL every process of machine 1 mid-training (a node lost): Slurm ends the step, so machine 0's worker
    stops too, the stage exits non-zero and writes nothing, and the same command then builds it."""
    out = tmp_path / "out"
    args = [*small_sft(tmp_path, tiny_model_dir, 64), "launch.config_file=conf/accelerate/ddp.yaml"]
    args += ["launch.num_processes=2", "launch.num_machines=2", f"launch.main_process_port={free_port()}"]
    args.append(f"sft.out_dir={out}")
    proc = long_training(stage_command("sft", *args), out)
    try:
        lost, kept = machine_processes(inside, "1"), machine_processes(inside, "0")
        assert len(lost) >= 3 and len(kept) >= 3, "task, accelerate and a worker per machine"
        for process in lost:
            with contextlib.suppress(psutil.Error):
                process.kill()
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "sft: error: a training process failed" in stderr and "Slurm ended the step" in stderr
    assert not (out / "model").exists() and not (out / "metrics.json").exists()
    wait_until(lambda: not any(running(p) for p in kept), within=30)
    assert not steps(inside)
    rerun = subprocess.run(
        stage_command("sft", *args, "sft.epochs=1"),
        cwd=ROOT, env=stage_env(), capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["dvclive", "metrics.json", "model"]
