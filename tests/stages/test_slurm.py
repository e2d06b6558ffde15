"""A real one-node Slurm (Debian's slurm-wlm and munge, started by `.ci/start-slurm`) for the stages that run inside
an allocation (#41): the cluster runs several steps at once in one allocation, each cancelled on its own; inside an
allocation a stage's managed llama-server is a job step that writes the rows a local one does, a cancelled step
fails the stage cleanly, and a SIGKILLed stage leaves no step behind.

Without a cluster these tests skip, except under CAIFORGE_REQUIRE_SLURM=1 (CI), where they fail."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import polars as pl
import psutil
import pytest

from caiforge.engines import serving
from tests.stages.test_managed_servers import managed_cfg, stage_process

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
        assert replicas["replica-1"].wait(timeout=60) != 0
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
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert stage.poll() is None, stage.communicate()[0][-3000:]
        for child in psutil.Process(stage.pid).children(recursive=True):
            try:
                cmdline = child.cmdline()
            except psutil.Error:
                continue
            if cmdline[:1] == ["srun"] and "--port" in cmdline:
                url = f"http://{socket.gethostname()}:{cmdline[cmdline.index('--port') + 1]}/v1/models"
                name = next(a.removeprefix("--job-name=") for a in cmdline if a.startswith("--job-name="))
                try:
                    with urllib.request.urlopen(url, timeout=1):
                        return child, name
                except OSError:
                    pass
        time.sleep(0.3)
    raise AssertionError("the stage's job step never served")


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
    left = [p for p in psutil.process_iter(["cmdline"]) if str(smollm2_gguf) in (p.info["cmdline"] or [])]
    assert not left, "the step's llama-server is gone with it"
