"""Run a training stage the way params.yaml's `launch:` section says: one plain process, or `accelerate launch`.

    python -m caiforge.launch STAGE [launch.KEY=VALUE ...] [STAGE.KEY=VALUE ...]

dvc.yaml runs the training stages through this. With `launch=single` (the default) it runs
`python stages/<stage>.py`; otherwise `accelerate launch --config_file <launch.config_file> --num_processes ...`
(DDP, FSDP, DeepSpeed ZeRO files under conf/accelerate/, in the form TRL ships them), and accelerate (torchrun
underneath) starts, watches and stops the processes: caiforge only builds its command line. `launch.*` overrides
on the command line are for the machine at hand (a node's `launch.machine_rank`, the main node's address); every
other argument goes to the stage.

Inside a Slurm allocation (`SLURM_JOB_ID` set, `launch.slurm: auto`) a launch on `num_machines > 1` needs no command
per node: it runs as one `srun` job step with one task per machine on the allocation's first `num_machines` nodes
(several per node only when the allocation has fewer nodes than machines). Each task runs this module again, which
takes its `machine_rank` from Slurm (`SLURM_PROCID`) and the step's first node as the main process, and starts
accelerate there. A task that fails ends the whole step (`--kill-on-bad-exit`), the stage fails and writes nothing,
and the next `dvc repro` runs it again.

What a launcher change reruns: the training stages declare `launch.num_processes` and `launch.num_machines`,
because the global batch (per-device batch x processes x accumulation steps) changes the result. The accelerate
config file, ports and addresses do not: DDP, FSDP and ZeRO compute the same update up to floating point, so
switching among them at the same process count reruns nothing (`dvc repro -f <stage>` rebuilds by hand).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from caiforge import config, slurm

SECTION = "launch"
MULTI_PROCESS_STAGES = ("sft", "pm", "rlaif", "distill")
"""The training stages: they run under several processes. Generation inside them is either rank 0's alone (the
held-out answers before and after, on a capped set) or sharded and gathered in row order (distill's teacher
answers, `caiforge.distributed`)."""


@dataclass(frozen=True)
class LaunchConfig:
    config_file: str | None
    """accelerate config file (conf/accelerate/ddp.yaml, fsdp.yaml, zero2.yaml, zero3.yaml); null: plain python."""
    num_processes: int
    """Processes on all machines together (GPUs per node x nodes)."""
    num_machines: int
    """Nodes; each runs this command with its own `launch.machine_rank`."""
    machine_rank: int
    """This node's rank, 0 on the main node (the only one that writes outputs)."""
    main_process_ip: str | None
    """The main node's address (multi-node only)."""
    main_process_port: int
    """The main node's rendezvous port."""
    slurm: Literal["auto", "off"] = "auto"
    """auto: with num_machines > 1 inside a Slurm allocation, start every machine's launcher as one `srun` step
    (ranks and the main node from Slurm); off: each node runs this command itself."""

    def __post_init__(self) -> None:
        if self.num_processes < 1 or self.num_machines < 1:
            raise ValueError(
                f"num_processes and num_machines must be >= 1, got {self.num_processes}, {self.num_machines}"
            )
        if self.num_processes % self.num_machines:
            raise ValueError(
                f"num_processes ({self.num_processes}) must be a multiple of num_machines ({self.num_machines}): "
                "it counts the processes of every machine"
            )
        if not 0 <= self.machine_rank < self.num_machines:
            raise ValueError(f"machine_rank must be in [0, {self.num_machines}), got {self.machine_rank}")
        if self.num_machines > 1 and not self.main_process_ip and not (self.slurm == "auto" and slurm.job()):
            raise ValueError(
                "main_process_ip: needed with num_machines > 1 (the address of machine_rank 0), except inside a "
                "Slurm allocation, where the first node is the main one"
            )
        if self.config_file is None and self.num_processes > 1:
            raise ValueError(
                f"num_processes={self.num_processes} needs config_file: (e.g. conf/accelerate/ddp.yaml, or launch=ddp)"
            )

    @property
    def multi_process(self) -> bool:
        return self.num_processes > 1


def read(root: Path, argv: list[str] | tuple[str, ...] = ()) -> LaunchConfig:
    """The `launch:` section of root/params.yaml with `launch.KEY=VALUE` overrides applied; its accelerate config
    file must exist."""
    params = root / "params.yaml"
    data = (yaml.safe_load(params.read_text(encoding="utf-8")) or {}) if params.is_file() else {}
    if SECTION not in data:
        raise config.ConfigError(f"{params}: {SECTION}: missing (recompose it: uv run caiforge params)")
    values = config.apply_overrides({SECTION: (str(params), data[SECTION])}, list(argv))
    cfg = config.build(LaunchConfig, dict(values[SECTION][1]), values[SECTION][0], SECTION)
    if cfg.config_file is not None and not (root / cfg.config_file).is_file():
        raise config.ConfigError(f"params.yaml: launch.config_file: {cfg.config_file} does not exist")
    return cfg


SHARDED = {"FSDP": "FSDP", "DEEPSPEED": "DeepSpeed ZeRO"}
"""accelerate distributed types that need CUDA: without a GPU accelerate would quietly run plain DDP instead."""


def check_runnable(config_file: Path, cuda: bool | None = None) -> None:
    """A ConfigError, before any process starts, when this machine cannot run the accelerate config as written:
    FSDP or ZeRO without CUDA (accelerate falls back to DDP without a word), ZeRO without the deepspeed package."""
    import importlib.util

    try:
        kind = (yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}).get("distributed_type")
    except (OSError, yaml.YAMLError) as exc:
        raise config.ConfigError(
            f"launch.config_file: {config_file}: not a readable accelerate config: {exc}"
        ) from None
    if kind not in SHARDED:
        return
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        raise config.ConfigError(
            f"launch.config_file: {config_file.name} asks for {SHARDED[kind]}, which needs CUDA GPUs; on this machine "
            "accelerate would silently train plain DDP instead (use launch=ddp)"
        )
    if kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise config.ConfigError(
            f"launch.config_file: {config_file.name} needs DeepSpeed: uv pip install deepspeed (or use launch=fsdp)"
        )


def command(stage: str, cfg: LaunchConfig, stage_args: list[str], root: Path) -> list[str]:
    """The command line that runs `stage` under `cfg`."""
    script = str(root / "stages" / f"{stage}.py")
    if cfg.config_file is None:
        return [sys.executable, script, *stage_args]
    if cfg.multi_process and stage not in MULTI_PROCESS_STAGES:
        raise config.ConfigError(
            f"launch.num_processes={cfg.num_processes}: stage {stage!r} runs in one process only so far "
            f"(multi-process: {', '.join(MULTI_PROCESS_STAGES)})"
        )
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(root / cfg.config_file),
        "--num_processes",
        str(cfg.num_processes),
        "--num_machines",
        str(cfg.num_machines),
        "--machine_rank",
        str(cfg.machine_rank),
        "--main_process_port",
        str(cfg.main_process_port),
    ]
    if cfg.main_process_ip:
        cmd += ["--main_process_ip", cfg.main_process_ip]
    return [*cmd, script, *stage_args]


TASK = "CAIFORGE_SLURM_TASK"
"""Set in the environment of the tasks `srun_command` starts: they launch accelerate, not another step."""


def through_srun(cfg: LaunchConfig) -> bool:
    """Whether this launch is one `srun` step: several machines inside an allocation, from outside its tasks."""
    return (
        cfg.config_file is not None
        and cfg.num_machines > 1
        and cfg.slurm == "auto"
        and slurm.job() is not None
        and not os.environ.get(TASK)
    )


def srun_command(stage: str, cfg: LaunchConfig, args: list[str], nodes: list[str]) -> list[str]:
    """One `srun` step with a task per machine on the first `num_machines` of `nodes`, each running this module
    again with `args` (launch overrides and stage arguments) and the step's first node as the main process."""
    used = nodes[: cfg.num_machines]
    per_node = -(-cfg.num_machines // len(used))
    step = ["srun", f"--jobid={slurm.job()}", f"--nodes={len(used)}", f"--ntasks={cfg.num_machines}"]
    step += [f"--ntasks-per-node={per_node}", f"--nodelist={','.join(used)}", "--kill-on-bad-exit=1"]
    step += ["--quit-on-interrupt", f"--job-name={slurm.STEP_PREFIX}{stage}"]
    return [*step, sys.executable, "-m", "caiforge.launch", stage, *args, f"{SECTION}.main_process_ip={used[0]}"]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    stage, rest = args[0], args[1:]
    root = config.project_root()
    ours = [a for a in rest if a.startswith(f"{SECTION}.")]
    env = os.environ.copy()
    if os.environ.get(TASK):  # one task of srun_command's step: its machine rank is Slurm's
        ours.append(f"{SECTION}.machine_rank={os.environ.get('SLURM_PROCID', '0')}")
    try:
        cfg = read(root, ours)
        if cfg.config_file is not None:
            check_runnable(root / cfg.config_file)
        if through_srun(cfg):
            cmd, env[TASK] = srun_command(stage, cfg, rest, slurm.nodes()), "1"
            print(f"{stage}: one Slurm step for {cfg.num_machines} machines: {shlex.join(cmd)}", file=sys.stderr)
        else:
            cmd = command(stage, cfg, [a for a in rest if a not in ours], root)
    except (config.ConfigError, ValueError, slurm.SlurmError) as exc:
        print(f"{stage}: error: {exc}", file=sys.stderr)
        return 1
    done = subprocess.run(cmd, cwd=root, env=env, check=False)
    if done.returncode and cfg.config_file is not None:
        stopped = "Slurm ended the step" if TASK in env else "accelerate stopped the others"
        print(
            f"{stage}: error: a training process failed (exit {done.returncode}); {stopped} and the stage wrote no "
            "output: see the first traceback above",
            file=sys.stderr,
        )
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
