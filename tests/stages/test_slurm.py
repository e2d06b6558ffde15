"""A real one-node Slurm (Debian's slurm-wlm and munge, started by `.ci/start-slurm`) for the stages that run inside
an allocation (#41). First: the cluster runs what job-step replicas need: several steps at once in one
allocation, each cancelled on its own, and none left once the allocation ends.

Without a cluster these tests skip, except under CAIFORGE_REQUIRE_SLURM=1 (CI), where they fail."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

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
