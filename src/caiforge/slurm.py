"""Slurm as the stages use it from inside an allocation: the job and nodes this process runs in, and the job steps
caiforge starts there, found and cancelled by their names. Everything goes through Slurm's own commands (`srun`,
`squeue`, `scancel`, `scontrol`); caiforge schedules nothing itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

STEP_PREFIX = "caiforge-"
"""What every job step caiforge starts is named with (then the replica's served name: unique in the job)."""


class SlurmError(RuntimeError):
    """A Slurm command failed or the allocation is not what the stage needs."""


def job() -> str | None:
    """The id of the Slurm job this process runs in (`SLURM_JOB_ID`), or None outside an allocation."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID") or None


def in_step() -> bool:
    """Whether this process runs inside a job step (`SLURM_STEP_ID` set: a task of `srun`), not in the batch script
    or an `salloc` shell: a step's processes share the resources Slurm gave it and start no step of their own."""
    return bool(os.environ.get("SLURM_STEP_ID"))


def _run(*cmd: str, timeout: float = 60) -> str:
    if shutil.which(cmd[0]) is None:
        raise SlurmError(f"inside Slurm job {job()}, but {cmd[0]} is not on PATH")
    done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise SlurmError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def nodes() -> list[str]:
    """The hostnames of this allocation's nodes, in Slurm's order (`scontrol show hostnames $SLURM_JOB_NODELIST`)."""
    listed = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not listed:
        raise SlurmError(f"inside Slurm job {job()}, but SLURM_JOB_NODELIST is not set")
    hosts = _run("scontrol", "show", "hostnames", listed).split()
    if not hosts:
        raise SlurmError(f"scontrol show hostnames {listed} named no node")
    return hosts


def steps(job_id: str) -> dict[str, str]:
    """The running steps of `job_id` that caiforge started: name -> step id (`<job>.<step>`)."""
    found = {}
    for line in _run("squeue", "-h", "-s", "-j", job_id, "-o", "%i %j").splitlines():
        step, _, name = line.strip().partition(" ")
        if name.startswith(STEP_PREFIX):
            found[name] = step
    return found


def cancel(job_id: str, names: list[str], within: float = 30.0) -> list[str]:
    """Cancel the steps of `job_id` named `names` and wait up to `within` seconds for them to end; the names
    still running after that."""
    wanted = set(names)
    running = {n: s for n, s in steps(job_id).items() if n in wanted}
    if running:
        subprocess.run(["scancel", *running.values()], capture_output=True, timeout=60, check=False)
    deadline = time.monotonic() + within
    while (left := sorted(wanted & steps(job_id).keys())) and time.monotonic() < deadline:
        time.sleep(0.3)
    return left


def step_command(job_id: str, node: str, name: str, gpus: int, extra: tuple[str, ...] = ()) -> list[str]:
    """`srun` arguments that start one task as a step of `job_id` on `node`, named `name`. A step with no GPU
    shares the allocation's CPUs with every other step (`--overlap`); one with GPUs takes `gpus` GPUs of its own,
    which Slurm picks and sets CUDA_VISIBLE_DEVICES to (`--exact --gpus-per-task`; steps with `--overlap` would
    share GPUs too). `--kill-on-bad-exit` ends the step when its task fails, and srun exits with the task's status."""
    cmd = ["srun", f"--jobid={job_id}", "--nodes=1", "--ntasks=1", f"--nodelist={node}", f"--job-name={name}"]
    cmd += ["--exact", f"--gpus-per-task={gpus}"] if gpus else ["--overlap"]
    return [*cmd, "--kill-on-bad-exit=1", *extra, "--"]
