"""Managed servers: a stage starts the OpenAI-compatible servers a role needs, on the model directory the role
declares, and stops them when the stage ends.

The servers are the engines people run (vLLM, SGLang, llama.cpp's `llama-server`, llama-cpp-python's server, or a
command template); caiforge only places, starts, waits for and stops them:

- each replica gets a free port on 127.0.0.1 and its own GPUs (`CUDA_VISIBLE_DEVICES`: replicas x
  `gpus_per_replica` of the visible ones; empty for a replica given none) and its own log file;
- a replica is ready when /v1/models lists its own served name (`caiforge-<token>`, so another server holding the
  port is never taken for it); one that exits or is not ready within
  `startup_timeout` fails the stage with the tail of its log;
- every replica runs in its own process group, and a watchdog process (one per stage process) kills those groups
  when the stage process dies, however it dies (SIGKILL included): no server outlives its stage. A normal end,
  an error, Ctrl-C or SIGTERM stop them at once (`stop_all`, called by every stage's main); stopping returns only
  once no process of the replica's group is left, its workers included;
- llama.cpp serves GGUF files: the role's safetensors directory is converted by llama.cpp's own converter, found or
  unpacked from the pinned llama-cpp-python sdist without a C++ build (`caiforge.engines.conversion`);
- inside a Slurm allocation (`SLURM_JOB_ID` set, `slurm: auto`) and not within a job step of its own, each replica
  is an `srun` job step instead, on the allocation's nodes in turn (`plan`, `caiforge.slurm.step_command`: its own
  GPUs, which Slurm picks, or none), listening on every interface and reached by its node's hostname. The step's
  exit fails the stage like a process's, with its log (srun carries the task's output), and the step is cancelled
  (`scancel`) when the fleet stops, also by the watchdog after a SIGKILL. Ports are picked free on this host; one
  taken on another node fails that replica at start. The model directory, the GGUF cache and the project must be
  on a filesystem every node sees.

Rows from managed servers are keyed by the fingerprint of the directory they serve (`server.weights` is
`model_dir` whatever it says) and by every launch setting that can change an answer (`identity.managed_label`:
launcher, tensor-parallel size, GGUF type and converter, extra arguments, command template), so retrained weights
or a new quantization never get the old rows back. A command template that serves neither {model} nor {gguf} must state
`server.weights: revision:<text>`, which then identifies its rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from caiforge import slurm
from caiforge.engines import conversion

log = logging.getLogger(__name__)

Launcher = Literal["none", "vllm", "sglang", "llama_server", "llama_cpp_python", "command"]
SERVED_NAME = "caiforge"
"""What identifies a managed role's model in its row keys (`openai:caiforge@<fingerprint>`); each replica serves
under this name plus a token of its own (`served_name`)."""


@dataclass(frozen=True)
class ManagedConfig:
    """Servers the stage starts itself (`launch`), instead of `server.urls` someone else runs."""

    launch: Launcher = "none"
    """none: use server.urls; vllm (`vllm serve`), sglang (`python -m sglang.launch_server`), llama_server
    (llama.cpp's C++ server), llama_cpp_python (`python -m llama_cpp.server`), or command (`command`)."""
    replicas: int = 1
    """Servers to start; requests are spread over all of them."""
    gpus_per_replica: int = 0
    """GPUs each replica gets (vLLM/SGLang tensor-parallel size; 0: none, e.g. llama.cpp on CPU: the replica then
    runs with CUDA_VISIBLE_DEVICES empty, so it cannot take a GPU training uses)."""
    args: tuple[str, ...] = ()
    """Extra command-line arguments for every replica (e.g. ["--max-model-len", "4096"])."""
    command: str | None = None
    """launch: command: the command line, with {model} (the role's directory), {gguf}, {host}, {port}, {name} (the
    served name) and {gpus} filled in."""
    startup_timeout: float = 900.0
    """Seconds a replica may take to list its model at /v1/models before the stage fails."""
    binary: str | None = None
    """llama_server: the binary (default: $CAIFORGE_LLAMA_SERVER, then `llama-server` on PATH, then the path
    `.ci/build-llama-server` installs)."""
    gguf_type: Literal["f32", "f16", "bf16", "q8_0"] = "f16"
    """llama_server / llama_cpp_python: the GGUF the safetensors directory is converted to."""
    slurm: Literal["auto", "off"] = "auto"
    """auto: inside a Slurm allocation (`SLURM_JOB_ID` set), start each replica as an `srun` job step; off: always
    as local processes."""
    srun_args: tuple[str, ...] = ()
    """Extra `srun` arguments for every replica's job step (e.g. ["--cpus-per-task=8", "--mem=64G"]: a GPU step
    gets one CPU and Slurm's default memory unless they say more)."""

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.gpus_per_replica < 0 or self.startup_timeout <= 0:
            raise ValueError("server.managed: replicas >= 1, gpus_per_replica >= 0 and startup_timeout > 0")
        if self.launch == "command" and not self.command:
            raise ValueError("server.managed.launch is 'command' but server.managed.command is empty")
        if self.launch in ("vllm", "sglang") and self.gpus_per_replica < 1:
            raise ValueError(f"server.managed.launch {self.launch} needs gpus_per_replica >= 1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def placement(
    replicas: int, gpus_per_replica: int, visible: list[str], busy: set[str] | frozenset[str] = frozenset()
) -> list[str | None]:
    """Each replica's CUDA_VISIBLE_DEVICES (None: the replica sees no GPU): consecutive groups of the visible GPUs
    that no other managed replica of this stage holds (`busy`)."""
    if gpus_per_replica == 0:
        return [None] * replicas
    taken = sorted(busy & set(visible))
    visible = [g for g in visible if g not in busy]
    wanted = replicas * gpus_per_replica
    if wanted > len(visible):
        raise ValueError(
            f"server.managed: {replicas} replicas x {gpus_per_replica} GPUs need {wanted} GPUs, but "
            f"{len(visible)} are visible and free ({','.join(visible) or 'none'}"
            + (f"; this stage's other servers hold {','.join(taken)})" if taken else ")")
        )
    return [",".join(visible[i * gpus_per_replica : (i + 1) * gpus_per_replica]) for i in range(replicas)]


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES, else every one torch counts."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def llama_server_binary(cfg: ManagedConfig) -> str:
    import shutil

    for candidate in (cfg.binary, os.environ.get("CAIFORGE_LLAMA_SERVER"), shutil.which("llama-server")):
        if candidate:
            return candidate
    built = conversion.default_llama_dir() / "llama-server"
    if built.is_file():
        return str(built)
    raise FileNotFoundError(
        "server.managed.launch llama_server: no llama-server binary (set server.managed.binary or "
        "$CAIFORGE_LLAMA_SERVER, put it on PATH, or build it with .ci/build-llama-server)"
    )


def command_line(
    cfg: ManagedConfig,
    model_dir: Path,
    gguf: Path | None,
    port: int,
    gpus: str | None,
    name: str = SERVED_NAME,
    host: str = "127.0.0.1",
) -> list[str]:
    """The command that starts one replica serving `model_dir` (or its `gguf`) as `name` on `host`:`port`."""
    extra = list(cfg.args)
    tp = str(cfg.gpus_per_replica)
    if cfg.launch == "vllm":
        cmd = ["vllm", "serve", str(model_dir), "--host", host, "--port", str(port), "--served-model-name", name]
        return [*cmd, "--tensor-parallel-size", tp, "--seed", "0", *extra]
    if cfg.launch == "sglang":
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_dir), "--host", host]
        return [*cmd, "--port", str(port), "--served-model-name", name, "--tp-size", tp, "--random-seed", "0", *extra]
    if cfg.launch == "llama_server":
        cmd = [llama_server_binary(cfg), "--model", str(gguf), "--host", host, "--port", str(port), "--alias", name]
        return [*cmd, *extra]
    if cfg.launch == "llama_cpp_python":
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", host, "--port", str(port)]
        return [*cmd, "--model_alias", name, *extra]
    if cfg.launch == "command":
        assert cfg.command is not None
        fields = {"model": model_dir, "gguf": gguf or "", "host": host, "port": port, "name": name, "gpus": gpus or ""}
        try:
            return [*shlex.split(cfg.command.format(**{k: str(v) for k, v in fields.items()})), *extra]
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"server.managed.command: {cfg.command!r}: {exc}") from None
    raise ValueError(f"server.managed.launch: {cfg.launch!r} starts nothing")


def needs_gguf(cfg: ManagedConfig) -> bool:
    return cfg.launch in ("llama_server", "llama_cpp_python") or (
        cfg.launch == "command" and "{gguf}" in (cfg.command or "")
    )


def serves_model_dir(cfg: ManagedConfig) -> bool:
    """Whether the managed servers serve the role's model directory (a command template that names neither {model}
    nor {gguf} serves something else, which only a stated `server.weights: revision:<text>` identifies)."""
    return cfg.launch != "command" or any(f in (cfg.command or "") for f in ("{model}", "{gguf}"))


WATCHDOG = r"""
import contextlib, os, signal, subprocess, sys, time
parent, groups_file = int(sys.argv[1]), sys.argv[2]

def alive(group):
    try:
        os.killpg(group, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False

def cancel_steps(listed):  # "slurm:<job>:<step name>": cancel what is still running of them
    steps = [entry.split(":", 2)[1:] for entry in listed]
    if steps:
        from caiforge import slurm
        for job in {job for job, _ in steps}:
            with contextlib.suppress(OSError, subprocess.SubprocessError, slurm.SlurmError):
                slurm.cancel(job, [name for j, name in steps if j == job], within=0)

while os.getppid() == parent:  # reparented once the stage process is gone
    time.sleep(0.5)
try:
    listed = open(groups_file).read().split()
except OSError:
    listed = []
cancel_steps([e for e in listed if e.startswith("slurm:")])
left = [int(g) for g in listed if g.isdigit() and alive(int(g))]
for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
    for g in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(g, sig)
    deadline = time.monotonic() + grace
    while any(alive(g) for g in left) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [g for g in left if alive(g)]
with contextlib.suppress(OSError):
    os.unlink(groups_file)
"""
"""Once its parent (the stage process) is gone, cancels the Slurm job steps and kills the process groups listed in a
file."""


@dataclass
class Replica:
    url: str
    process: subprocess.Popen
    log_path: Path
    command: list[str]
    gpus: str | None
    name: str = SERVED_NAME
    """The name this replica serves its model under (its own: readiness is then never fooled by another server
    that holds the port)."""
    shown: str = ""
    """The command line as logs and errors show it: the API key, if it is on it, replaced by ***."""
    job: str | None = None
    """The Slurm job this replica is a step of (the step is named `name`); None: a local process."""


class Fleet:
    """The replicas of one role's managed servers."""

    def __init__(self, cfg: ManagedConfig, model_dir: Path, replicas: list[Replica]) -> None:
        self.cfg, self.model_dir, self.replicas = cfg, model_dir, replicas

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(r.url for r in self.replicas)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every replica's process group, SIGKILL what is left of them after `grace` seconds, and return
        once no process of any group is left (workers included: the GPU memory they hold is free again)."""
        groups = [r.process.pid for r in self.replicas]
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
            for r in self.replicas:
                _signal_group(r.process, sig)
            deadline = time.monotonic() + wait
            while (left := [g for g in groups if _group_alive(g)]) and time.monotonic() < deadline:
                for r in self.replicas:
                    r.process.poll()  # reap a leader that has exited: a zombie leader is not a live group
                time.sleep(0.1)
            if not left:
                break
        else:
            log.warning("server.managed: process groups %s still have processes after SIGKILL", left)
        for r in self.replicas:
            with contextlib.suppress(subprocess.TimeoutExpired):
                r.process.wait(timeout=10)
        steps = [r for r in self.replicas if r.job]
        for job in {r.job for r in steps if r.job}:  # a step whose srun was killed would run on: cancel it
            if left := slurm.cancel(job, [r.name for r in steps if r.job == job]):
                log.warning("server.managed: Slurm job %s steps %s still run after scancel", job, ", ".join(left))
        _forget([*map(str, groups), *(f"slurm:{r.job}:{r.name}" for r in steps)])
        log.info("stopped the %d %s replica(s) serving %s", len(self.replicas), self.cfg.launch, self.model_dir)


def _group_alive(group: int) -> bool:
    """Whether any process of process group `group` is running (zombies waiting for their reaper do not count:
    they hold no memory). Reads /proc where there is one, else asks the kernel (kill 0)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(group, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[2]) == group and fields[0] != "Z":  # fields after the name: state, ppid, pgrp, ...
            return True
    return False


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


_running: dict[tuple[str, str], Fleet] = {}
_watchdog: dict[str, Any] = {}


def _groups_file() -> Path:
    """The file the watchdog reads: the process groups of this process's replicas, one per line."""
    if "file" not in _watchdog or _watchdog.get("pid") != os.getpid():
        fd, path = tempfile.mkstemp(prefix="caiforge-servers-", suffix=".pgids")
        os.close(fd)
        watchdog = subprocess.Popen(
            [sys.executable, "-c", WATCHDOG, str(os.getpid()), path],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # not in our group: a Ctrl-C to the stage leaves it to do its job
        )
        _watchdog.update(file=Path(path), pid=os.getpid(), process=watchdog)
    return _watchdog["file"]


def _remember(entries: list[str]) -> None:
    """Tell the watchdog about process groups (their ids) and Slurm job steps (`slurm:<job>:<step name>`)."""
    path = _groups_file()
    listed = path.read_text().split()
    path.write_text("\n".join([*listed, *entries]) + "\n")


def _forget(entries: list[str]) -> None:
    if "file" in _watchdog:
        path = _watchdog["file"]
        gone = set(entries)
        path.write_text("\n".join(p for p in path.read_text().split() if p not in gone) + "\n")


def _log_tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def _listed(url: str, name: str, headers: dict[str, str]) -> bool:
    try:
        request = urllib.request.Request(f"{url}/models", headers=headers)
        with urllib.request.urlopen(request, timeout=2) as resp:
            body = json.loads(resp.read())
    except (OSError, ValueError, urllib.error.URLError):
        return False
    return any(m.get("id") == name for m in body.get("data", []) if isinstance(m, dict))


def replica_env(devices: str | None) -> dict[str, str]:
    """A replica's environment: this process's, with CUDA_VISIBLE_DEVICES set to the replica's GPUs, or to "" for
    a replica given none (so a llama.cpp or command replica does not take GPU 0 from training)."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": devices or ""}


_fleet_numbers = itertools.count()
"""Numbers each replica log of this process uniquely: two roles, or a model served again, never share a file."""


@dataclass(frozen=True)
class Planned:
    """One replica before it starts: where it will answer, its command, environment and GPUs, and the Slurm job it
    is a step of (None: a local process)."""

    url: str
    command: list[str]
    env: dict[str, str]
    gpus: str | None
    name: str
    job: str | None


def plan(cfg: ManagedConfig, model_dir: Path, gguf: Path | None, busy: set[str] | frozenset[str] = frozenset()):
    """Each replica as it will start. Local: on 127.0.0.1 with its own CUDA_VISIBLE_DEVICES (`placement`, leaving
    the `busy` GPUs of this stage's other replicas). Inside a Slurm allocation (`cfg.slurm` auto): an `srun` step
    per replica on the allocation's nodes in turn, listening on every interface, reached by the node's hostname,
    with GPUs Slurm picks; but local processes, on the GPUs Slurm gave it, for a stage that is itself a step's task
    (a training process of a multi-node launch: its step holds the nodes' GPUs, which a new step would wait for)."""
    job = slurm.job() if cfg.slurm == "auto" and not slurm.in_step() else None
    if job is None:
        devices = placement(cfg.replicas, cfg.gpus_per_replica, visible_gpus() if cfg.gpus_per_replica else [], busy)
    else:
        hosts, devices = slurm.nodes(), [None] * cfg.replicas
    planned = []
    for i, gpus in enumerate(devices):
        port, name = free_port(), f"{SERVED_NAME}-{secrets.token_hex(4)}"
        if job is None:
            cmd = command_line(cfg, model_dir, gguf, port, gpus, name)
            planned.append(Planned(f"http://127.0.0.1:{port}/v1", cmd, replica_env(gpus), gpus, name, None))
            continue
        node, env = hosts[i % len(hosts)], replica_env(None)
        if cfg.gpus_per_replica:
            env.pop("CUDA_VISIBLE_DEVICES")  # Slurm sets the step's own
        step = slurm.step_command(job, node, name, cfg.gpus_per_replica, cfg.srun_args)
        cmd = [*step, *command_line(cfg, model_dir, gguf, port, None, name, host="0.0.0.0")]
        planned.append(Planned(f"http://{node}:{port}/v1", cmd, env, None, name, job))
    return planned


def start(cfg: ManagedConfig, model_dir: Path, log_dir: Path, headers: dict[str, str] | None = None) -> Fleet:
    """Start `cfg.replicas` servers on `model_dir` (`plan`), each under a served name of its own, and wait until
    every one lists its name (asking with `headers`: the role's API key, for a server started with one)."""
    gguf_file = conversion.gguf_for(model_dir, cfg.gguf_type) if needs_gguf(cfg) else None
    busy = {g for f in _running.values() for r in f.replicas for g in (r.gpus or "").split(",") if g}
    planned = plan(cfg, model_dir, gguf_file, busy)
    log_dir.mkdir(parents=True, exist_ok=True)
    replicas: list[Replica] = []
    try:
        for i, todo in enumerate(planned):
            path = log_dir / f"{model_dir.name}-{cfg.launch}-{next(_fleet_numbers)}-{i}.log"
            with path.open("wb") as fh:
                process = subprocess.Popen(
                    todo.command,
                    stdin=subprocess.DEVNULL,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    env=todo.env,
                    start_new_session=True,
                )
            _remember([str(process.pid), *([f"slurm:{todo.job}:{todo.name}"] if todo.job else [])])
            shown = shlex.join(todo.command)
            for secret in {v.removeprefix("Bearer ") for v in (headers or {}).values()}:
                shown = shown.replace(secret, "***")
            replicas.append(Replica(todo.url, process, path, todo.command, todo.gpus, todo.name, shown, todo.job))
            log.info("started %s replica %d on %s: %s", cfg.launch, i, todo.url, shown)
        deadline = time.monotonic() + cfg.startup_timeout
        waiting = list(replicas)
        while waiting:
            for r in list(waiting):
                if r.process.poll() is not None:
                    raise RuntimeError(
                        f"server.managed: {cfg.launch} on {model_dir} exited with {r.process.returncode} before it "
                        f"was ready ({r.shown}); its log ({r.log_path}) ends:\n{_log_tail(r.log_path)}"
                    )
                if _listed(r.url, r.name, headers or {}):
                    waiting.remove(r)
            if waiting and time.monotonic() > deadline:
                r = waiting[0]
                raise RuntimeError(
                    f"server.managed: {cfg.launch} on {model_dir} was not ready within {cfg.startup_timeout:g} s "
                    f"(server.managed.startup_timeout); its log ({r.log_path}) ends:\n{_log_tail(r.log_path)}"
                )
            time.sleep(0.3)
    except BaseException:
        Fleet(cfg, model_dir, replicas).stop()
        raise
    return Fleet(cfg, model_dir, replicas)


def auth_headers(cfg: Any) -> dict[str, str]:
    """The Authorization header for `cfg` (a ServerConfig): the key in the variable `api_key_env` names, if any."""
    if not cfg.api_key_env:
        return {}
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise ValueError(f"server.api_key_env: environment variable {cfg.api_key_env} is not set")
    return {"Authorization": f"Bearer {key}"}


def serve(cfg: Any, model_dir: str | Path) -> Any:
    """`cfg` (a ServerConfig) as the engine should use it: unchanged without `managed.launch`; else pointing at
    this stage's replicas serving `model_dir` (started on first use, shared by every engine of the stage on the
    same directory and launch settings), with the weights identified by the directory's fingerprint."""
    managed: ManagedConfig = cfg.managed
    if managed.launch == "none":
        return cfg
    model_dir = Path(model_dir)
    key = (str(model_dir.resolve()), json.dumps(dataclasses.asdict(managed), sort_keys=True, default=str))
    if key not in _running:
        _install_sigterm()
        log_dir = Path(tempfile.gettempdir()) / f"caiforge-servers-{os.getpid()}"
        _running[key] = start(managed, model_dir, log_dir, auth_headers(cfg))
    fleet = _running[key]
    from caiforge.engines import identity

    # The engine sees plain servers at these URLs, serving exactly the directory it fingerprints.
    weights = "model_dir" if serves_model_dir(managed) else cfg.weights
    label = identity.managed_label(managed)
    return dataclasses.replace(
        cfg, urls=fleet.urls, model=label, weights=weights, tokenizer=None, managed=ManagedConfig()
    )


def _replica(url: str) -> tuple[Fleet, Replica] | None:
    """The managed replica of this process at `url`, with its fleet (None: not one of ours)."""
    for fleet in _running.values():
        for r in fleet.replicas:
            if r.url.rstrip("/") == url.rstrip("/"):
                return fleet, r
    return None


def replica_death(url: str, within: float = 0.0) -> str | None:
    """If `url` is a managed replica of this process whose server has exited, or exits within `within` seconds,
    what to tell the user: its exit code, command and log tail (None: not a managed replica, or still running).
    A cancelled job step's server stops answering a moment before its srun exits: `within` covers that."""
    found = _replica(url)
    deadline = time.monotonic() + within
    while found is not None and found[1].process.poll() is None:
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)
    if found is None:
        return None
    fleet, r = found
    return (
        f"the managed {fleet.cfg.launch} replica serving {fleet.model_dir} at {r.url} exited with "
        f"{r.process.returncode} ({r.shown}); its log ({r.log_path}) ends:\n{_log_tail(r.log_path)}"
    )


def served_name(url: str) -> str | None:
    """The name the managed replica at `url` serves under (None: not a managed replica of this process)."""
    found = _replica(url)
    return found[1].name if found else None


def running() -> list[Fleet]:
    return list(_running.values())


def release(model_dir: str | Path) -> None:
    """Stop this stage's managed servers of `model_dir` (it has no more requests for them), freeing their GPUs for
    the next model; a later request for it starts them again. Nothing to do without managed servers."""
    here = str(Path(model_dir).resolve())
    for key in [k for k in _running if k[0] == here]:
        _running.pop(key).stop()


def stop_all() -> None:
    """Stop every managed server this process started (a stage's end: success, error, Ctrl-C or SIGTERM)."""
    while _running:
        _, fleet = _running.popitem()
        fleet.stop()


def _install_sigterm() -> None:
    """SIGTERM (what DVC, Slurm and `kill` send) raises SystemExit in the main thread, so `finally` blocks and
    `stop_all` run instead of the process vanishing with its servers up (the watchdog would still reap them)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:

        def on_sigterm(signum: int, frame: Any) -> None:
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, on_sigterm)
