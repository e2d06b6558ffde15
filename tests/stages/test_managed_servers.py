"""Managed servers on real llama.cpp: a stage starts `llama-server` on the model directory its role declares
(converted to GGUF by llama.cpp's own converter, cached by fingerprint), generates through it, and no server process
outlives the stage, whether it ends, is stopped with SIGTERM, or is SIGKILLed (the watchdog reaps the servers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import polars as pl
import psutil
import pytest

from caiforge import config
from caiforge.engines import conversion, identity, serving
from tests import servers
from tests.conftest import ROOT, load_stage, smoke_section, write_prompts
from tests.stages.test_server_backend import PARTS

pytestmark = pytest.mark.slow


Q4 = "revision:smollm2-135m-instruct-q4_1"
"""What the tests' command templates serve (the embedded GGUF, not the role's directory), stated."""


def managed_cfg(tmp_path: Path, policy: Path, managed: dict, weights: str | None = None, in_flight: int = 2):
    """critique_revise on smoke (6 prompts, 1 round), its policy served by managed servers (`in_flight` requests
    at once)."""
    stage = load_stage("critique_revise")
    section = smoke_section("critique_revise", ["critique_revise.max_prompts=6", "critique_revise.rounds=1"])
    section.update(prompts=str(write_prompts(tmp_path / "prompts.parquet")), policy=str(policy))
    section.update(out_dir=str(tmp_path / "out"))
    server = {"max_in_flight": in_flight, "managed": managed, "weights": weights}
    section["generation"] = {**section["generation"], "backend": "openai", "server": server}
    parts = {k: ("constitutions/default.yaml", PARTS[k]) for k in ("critique_revision", "critique_revision_examples")}
    declared = {"critique_revise": ("params.yaml", section), **parts}
    return stage, config.from_declared("critique_revise", stage.CritiqueReviseConfig, declared)


def test_critique_revise_serves_its_declared_safetensors_on_llama_server(
    tmp_path, smollm2_dir, llama_binary, converter, monkeypatch
):
    """The policy directory (safetensors) is converted once, served by a managed llama-server, its rows keyed by the
    directory's fingerprint; the replicas stop with the stage."""
    monkeypatch.setenv("CAIFORGE_GGUF_CACHE", str(tmp_path / "gguf"))
    managed = {"launch": "llama_server", "args": ["--threads", "1", "--ctx-size", "4096"]}
    stage, cfg = managed_cfg(tmp_path, smollm2_dir, managed)
    try:
        metrics = stage.run(cfg)
        fleets = serving.running()
        assert len(fleets) == 1 and len(fleets[0].replicas) == 1
        replica = fleets[0].replicas[0].process
        assert replica.poll() is None, "the replica serves until the stage's end"
    finally:
        serving.stop_all()
    assert replica.poll() is not None and not serving.running()
    converted = list((tmp_path / "gguf").glob("*.gguf"))
    assert [p.name[:24] for p in converted] == [identity.fingerprint(smollm2_dir)[:24]]
    made = converted[0].stat().st_mtime_ns
    assert conversion.gguf_for(smollm2_dir, "f16", tmp_path / "gguf").stat().st_mtime_ns == made, "converted once"
    assert metrics["generation"]["backend"] == "openai"
    rows = pl.read_parquet(tmp_path / "out" / "revisions.parquet")
    fingerprint = identity.fingerprint(smollm2_dir)
    label = identity.managed_label(serving.ManagedConfig(launch="llama_server", args=tuple(managed["args"])))
    assert (rows["model_fingerprint"] == f"openai:{label}@{fingerprint}").all()
    assert rows["revision"].str.len_chars().min() > 0, "the served model wrote the revisions"


DRIVER = r"""
import sys
from pathlib import Path
from caiforge import config
from tests.stages.test_managed_servers import Q4, managed_cfg
tmp, policy, command = sys.argv[1:]
sys.argv[1:] = []  # no command-line overrides of params.yaml
stage, cfg = managed_cfg(Path(tmp), Path(policy), {"launch": "command", "command": command}, Q4)
config.stage_main("critique_revise", type(cfg), lambda _: stage.run(cfg))
"""
"""A stage process as `stages/critique_revise.py` runs (its `main` is `config.stage_main`), on the test's config
(params.yaml cannot name a server block on the command line)."""


def stage_process(tmp_path: Path, tokenizer_dir: Path, command: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "DVC_STAGE"}
    cmd = [sys.executable, "-c", DRIVER, str(tmp_path), str(tokenizer_dir), command]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def serving_child(stage: subprocess.Popen, matches, host: str = "127.0.0.1") -> tuple[psutil.Process, list[str]]:
    """The stage's descendant whose command line `matches` (and names a --port), with that command line, once
    /v1/models answers on `host` at that port."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert stage.poll() is None, stage.communicate()[0][-3000:]
        for child in psutil.Process(stage.pid).children(recursive=True):
            try:
                cmdline = child.cmdline()
            except psutil.Error:
                continue
            if matches(cmdline) and "--port" in cmdline:
                url = f"http://{host}:{cmdline[cmdline.index('--port') + 1]}/v1/models"
                try:
                    with urllib.request.urlopen(url, timeout=1):
                        return child, cmdline
                except OSError:
                    pass
        time.sleep(0.3)
    raise AssertionError("the stage's managed server never came up")


def wait_for_replica(stage: subprocess.Popen, gguf: Path) -> psutil.Process:
    """The stage's llama-server once it answers /v1/models."""
    return serving_child(stage, lambda cmdline: str(gguf) in cmdline)[0]


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["ctrl-c", "sigterm", "sigkill"])
def test_no_managed_server_outlives_its_stage(tmp_path, smollm2_gguf, smollm2_tokenizer_dir, llama_binary, how):
    command = f"{llama_binary} --model {smollm2_gguf} --host {{host}} --port {{port}} --alias {{name}} --threads 1"
    stage = stage_process(tmp_path, smollm2_tokenizer_dir, command)
    try:
        replica = wait_for_replica(stage, smollm2_gguf)
        os.kill(stage.pid, how)
        output = stage.communicate(timeout=60)[0]
        # SIGTERM: the stage stops its servers itself; SIGKILL: its watchdog does, within its 10 s grace.
        deadline = time.monotonic() + 30
        while replica.is_running() and replica.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not replica.is_running() or replica.status() == psutil.STATUS_ZOMBIE, output[-2000:]
        # Ctrl-C and SIGTERM ran the stage's own shutdown (KeyboardInterrupt re-raised as SIGINT; exit status 128 +
        # 15); SIGKILL left it to the watchdog.
        expected = {signal.SIGINT: -2, signal.SIGTERM: 143, signal.SIGKILL: -9}[how]
        assert stage.returncode == expected, output[-2000:]
    finally:
        if stage.poll() is None:
            stage.kill()


def test_released_servers_stop_and_free_their_directory_only(
    tmp_path, smollm2_gguf, smollm2_tokenizer_dir, llama_binary
):
    """`evaluate` serves its models in turn: releasing one directory stops its replicas and leaves the others."""
    import shutil

    from caiforge import engines

    dirs = [tmp_path / "base", tmp_path / "sft"]
    for d in dirs:
        shutil.copytree(smollm2_tokenizer_dir, d)
    command = f"{llama_binary} --model {smollm2_gguf} --host {{host}} --port {{port}} --alias {{name}} --threads 1"
    server = engines.ServerConfig(managed=serving.ManagedConfig(launch="command", command=command), weights=Q4)
    try:
        urls = [serving.serve(server, d).urls for d in dirs]
        assert urls[0] != urls[1] and len(serving.running()) == 2
        base, tuned = (f.replicas[0].process for f in serving.running())
        serving.release(dirs[0])
        assert base.poll() is not None and tuned.poll() is None
        assert [f.model_dir for f in serving.running()] == [dirs[1]]
        assert serving.serve(server, dirs[1]).urls == urls[1], "a directory still served is not started twice"
    finally:
        serving.stop_all()
    assert tuned.poll() is not None


def test_managed_servers_start_only_for_rows_the_row_cache_lacks(
    tmp_path, smollm2_gguf, smollm2_tokenizer_dir, llama_binary
):
    """An engine on managed servers starts them at its first request, not when it is made: a rerun whose rows are
    all cached (a crash after the answers were in, an edit that left this role's rows alone) starts nothing."""
    from caiforge import engines, rowcache

    command = f"{llama_binary} --model {smollm2_gguf} --host {{host}} --port {{port}} --alias {{name}} --threads 1"
    server = engines.ServerConfig(managed=serving.ManagedConfig(launch="command", command=command), weights=Q4)
    cfg = engines.GenerationConfig(backend="openai", server=server, max_new_tokens=6, progress=False)
    convs = [[{"role": "user", "content": f"Name a colour, number {i}."}] for i in range(3)]
    try:
        first = engines.make_generator(smollm2_tokenizer_dir, cfg, rowcache.RowCache(tmp_path / "rows"))
        assert serving.running() == [], "made, not started"
        answers = first.chat(convs[:2], seed=0)
        assert len(serving.running()) == 1 and first.stats.engine["servers"] == 1
        first.cache.close()
        serving.stop_all()

        again = engines.make_generator(smollm2_tokenizer_dir, cfg, rowcache.RowCache(tmp_path / "rows"))
        assert again.identity == first.identity, "the rows' key does not wait for the servers"
        assert again.chat(convs[:2], seed=0) == answers
        assert serving.running() == [] and again.stats.engine["servers"] == 0, "every row cached: nothing started"
        assert again.chat(convs, seed=0)[:2] == answers
        assert len(serving.running()) == 1 and again.fleet.requests_sent == 1, "the one new row started them"
    finally:
        serving.stop_all()


# A worker in the replica's process group that needs time to shut down (vLLM's GPU workers free their memory on
# SIGTERM): it writes `done` once it has finished cleaning up.
SLOW_WORKER = (
    "import signal, sys, time; "
    "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(1.5), open(sys.argv[1], 'w').write('done'), sys.exit(0))); "
    "time.sleep(600)"
)


def test_a_replica_sees_no_gpu_logs_alone_and_stops_only_when_its_workers_have(
    tmp_path, smollm2_gguf, smollm2_tokenizer_dir, llama_binary, monkeypatch
):
    import shlex
    import shutil

    from caiforge import engines

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # what a training rank on a GPU node would see
    dirs = [tmp_path / "base", tmp_path / "sft"]
    for d in dirs:
        shutil.copytree(smollm2_tokenizer_dir, d)
    marker = tmp_path / "worker-finished"
    worker = shlex.join([sys.executable, "-c", SLOW_WORKER, str(marker)])
    script = (
        f'echo "replica sees CUDA_VISIBLE_DEVICES=[$CUDA_VISIBLE_DEVICES]"; {worker} & '
        f"exec {llama_binary} --model {smollm2_gguf} --host $0 --port $1 --alias $2 --threads 1"
    )
    command = f"sh -c {shlex.quote(script)} {{host}} {{port}} {{name}}"
    server = engines.ServerConfig(managed=serving.ManagedConfig(launch="command", command=command), weights=Q4)
    try:
        first = serving.serve(server, dirs[0])
        fleet = serving.running()[0]
        replica = fleet.replicas[0]
        serving.release(dirs[0])
        assert marker.read_text() == "done", "stop waited for the worker's own shutdown instead of killing it"
        assert not serving._group_alive(replica.process.pid), "no process of the replica's group is left"
        serving.serve(server, dirs[1])
        serving.serve(server, dirs[0])  # served again: a new replica, a new log
        logs = [r.log_path for f in [fleet, *serving.running()] for r in f.replicas]
        assert len(set(logs)) == 3 and all(p.is_file() for p in logs), "each role and replica logs to its own file"
        first_log = logs[0].read_text()
        assert "replica sees CUDA_VISIBLE_DEVICES=[]" in first_log, "a replica given no GPUs sees none"
        assert first_log.count("replica sees") == 1, "no other replica wrote to (or truncated) its log"
        assert first.urls
    finally:
        serving.stop_all()


def test_a_replica_started_with_an_api_key_is_probed_with_it_and_its_death_fails_the_call_at_once(
    tmp_path, smollm2_gguf, smollm2_tokenizer_dir, monkeypatch
):
    """llama-cpp-python's server (like vLLM with --api-key) answers /v1/models with 401 to a probe without the key;
    a replica that dies mid-stage fails the next request with its exit code and log, not after retry_window."""
    from caiforge import engines
    from caiforge.engines import openai

    monkeypatch.setenv(servers.API_KEY_ENV, servers.API_KEY)
    command = (
        f"{sys.executable} -m llama_cpp.server --model {smollm2_gguf} --host {{host}} --port {{port}} "
        f"--model_alias {{name}} --n_threads 1 --api_key {servers.API_KEY}"
    )
    managed = serving.ManagedConfig(launch="command", command=command, startup_timeout=120)
    server = engines.ServerConfig(managed=managed, api_key_env=servers.API_KEY_ENV, max_retries=3, weights=Q4)
    try:
        served = serving.serve(server, smollm2_tokenizer_dir)
        fleet = openai.Fleet(served)
        assert fleet.complete([{"prompt": "Hello", "max_tokens": 2}])[0]["choices"], "ready, and it answers"
        replica = serving.running()[0].replicas[0]
        assert replica.name.startswith(f"{serving.SERVED_NAME}-") and fleet.served_as(replica.url) == replica.name
        replica.process.kill()
        replica.process.wait()
        began = time.monotonic()
        with pytest.raises(openai.ServerError, match=r"exited with -9 .*its log .* ends:") as err:
            fleet.complete([{"prompt": "Hello", "max_tokens": 2}])
        assert time.monotonic() - began < 30, (
            f"failed at once, not after server.retry_window ({server.retry_window} s)"
        )
        assert servers.API_KEY not in str(err.value)
    finally:
        serving.stop_all()


def test_another_server_on_the_replicas_port_is_never_taken_for_it(
    tmp_path, smollm2_gguf, smollm2_tokenizer_dir, llama_binary, monkeypatch
):
    """The port is free when chosen and bound by the server later; something else serving "caiforge" on it (a
    leftover replica) must not make the stage talk to the wrong weights: a replica is ready only under its own name."""
    from caiforge import engines

    with servers.running(smollm2_gguf, tmp_path, cpp=True, alias=serving.SERVED_NAME) as squatter:
        port = int(squatter.url.rsplit(":", 1)[1].split("/")[0])
        monkeypatch.setattr(serving, "free_port", lambda: port)
        command = f"{llama_binary} --model {smollm2_gguf} --host {{host}} --port {{port}} --alias {{name}} --threads 1"
        managed = serving.ManagedConfig(launch="command", command=command, startup_timeout=60)
        monkeypatch.setenv(servers.API_KEY_ENV, servers.API_KEY)  # the squatter would answer the probe
        server = engines.ServerConfig(managed=managed, api_key_env=servers.API_KEY_ENV, weights=Q4)
        try:
            with pytest.raises(RuntimeError, match=r"exited with \d+ before it was ready"):
                serving.serve(server, smollm2_tokenizer_dir)
        finally:
            serving.stop_all()


def test_a_model_llama_cpp_cannot_convert_is_a_one_line_error_naming_it(tiny_model_dir, converter, tmp_path):
    """smoke's tiny random tokenizer is not one llama.cpp knows: the converter's traceback becomes one line."""
    with pytest.raises(RuntimeError) as err:
        conversion.gguf_for(tiny_model_dir, "f16", tmp_path / "gguf")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{tiny_model_dir}: llama.cpp's converter cannot make a f16")
    assert "NotImplementedError: BPE pre-tokenizer was not recognized" in message and "Traceback" not in message
    assert not list((tmp_path / "gguf").iterdir()), "nothing half-made is left in the cache"


def test_the_converter_needs_no_cpp_build_it_comes_from_the_sdist_uv_already_has(tmp_path, smollm2_dir, monkeypatch):
    """A user with only `uv sync --group server` (no .ci/build-llama-server, no variable): the converter is unpacked
    from uv's copy of the pinned llama-cpp-python sdist, and converts the role's directory for real."""
    if conversion.vendored_tree() is None:
        message = "uv's cache holds no llama-cpp-python sdist tree (uv sync --group server builds one)"
        if os.environ.get("CAIFORGE_REQUIRE_SERVER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    monkeypatch.delenv("CAIFORGE_LLAMA_CONVERTER", raising=False)
    monkeypatch.setattr(conversion, "default_llama_dir", lambda: tmp_path / "no-build")
    monkeypatch.setattr(conversion, "unpacked_dir", lambda: tmp_path / "converter")
    made = conversion.gguf_for(smollm2_dir, "q8_0", tmp_path / "gguf")
    assert conversion.converter() == tmp_path / "converter" / "convert_hf_to_gguf.py"
    assert made.stat().st_size > 1_000_000 and made.read_bytes()[:4] == b"GGUF"


DISTILL_DRIVER = r"""
import json, sys
from caiforge import config
from tests.conftest import load_stage, smoke_section
stage = load_stage("distill")
settings = json.loads(sys.argv[1])
sys.argv[1:] = []  # no command-line overrides of params.yaml
section = smoke_section("distill", settings["overrides"])
section.update(settings["section"])
section["generation"] = {**section["generation"], **settings["generation"]}
cfg = config.build(stage.DistillConfig, section, "params.yaml", "distill")
config.stage_main("distill", type(cfg), lambda _: stage.run(cfg))
"""
"""distill as `stages/distill.py` runs it, on the test's config (no server block on the command line)."""


def test_distill_on_two_processes_serves_its_teacher_once_and_a_rerun_serves_it_not_at_all(
    tmp_path, smollm2_dir, smollm2_gguf, llama_binary
):
    """distill under `accelerate launch` with 2 processes and a managed teacher: one fleet for the run, started by
    rank 0 alone (each rank starting its own put every replica on rank 0's GPU), stopped before training loads, its
    answers in the row cache; a rerun (after a failed training) takes them all from there and starts no server."""
    import json
    import shutil

    from safetensors.torch import load_file

    teacher = tmp_path / "teacher"
    shutil.copytree(smollm2_dir, teacher)
    (teacher / "served.gguf").symlink_to(smollm2_gguf)
    command = f"{llama_binary} --model {{model}}/served.gguf --host {{host}} --port {{port}} --alias {{name}}"
    driver = tmp_path / "distill_driver.py"
    driver.write_text(DISTILL_DRIVER)
    config_file = str(ROOT / "conf" / "accelerate" / "ddp.yaml")
    env = {k: v for k, v in os.environ.items() if k != "DVC_STAGE"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))

    def run(out: Path) -> tuple[dict, str]:
        settings = {
            "overrides": [
                "distill.prune_keep=[0,29]",
                "distill.heldout_fraction=0.3",
                "distill.max_prompts=4",
                "distill.max_heldout_prompts=2",
                "distill.epochs=1",
                "distill.batch_size=1",
                "distill.gradient_accumulation_steps=1",
                "distill.max_length=64",
                "distill.checkpoint_every=0",
            ],
            "section": {
                "prompts": str(write_prompts(tmp_path / "prompts.parquet")),
                "teacher": str(teacher),
                "student": str(teacher),
                "out_dir": str(out),
                "row_cache": {"dir": str(tmp_path / "rows")},
            },
            "generation": {
                "backend": "openai",
                "max_new_tokens": 8,
                "progress": False,
                "server": {"max_in_flight": 2, "managed": {"launch": "command", "command": command}},
            },
        }
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file]
        launcher += ["--num_processes", "2", "--main_process_port", str(serving.free_port())]
        cmd = [*launcher, str(driver), json.dumps(settings)]
        done = subprocess.run(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900
        )
        output = done.stdout  # both streams, in the order they were written
        assert done.returncode == 0, output[-4000:]
        return json.loads((out / "metrics.json").read_text()), output

    metrics, output = run(tmp_path / "first")
    rows = metrics["train_rows"] + metrics["heldout_prompts"]
    assert metrics["processes"] == 2 and rows > 0
    assert output.count("started command replica") == 1, "one fleet for the run, not one per process"
    stopped, trained = output.find("stopped the 1 command replica(s)"), output.find("'train_runtime'")
    assert 0 <= stopped < trained, "the teacher's servers were stopped before training"
    assert metrics["teacher_generation"]["servers"] == 1 and metrics["teacher_generation"]["rows"] == rows
    assert metrics["row_cache"]["misses"] == rows
    assert not [p for p in psutil.process_iter(["cmdline"]) if "served.gguf" in " ".join(p.info["cmdline"] or [])]

    again, output = run(tmp_path / "again")
    assert "started command replica" not in output, "every answer came from the row cache"
    assert again["row_cache"] == {"hits": rows, "misses": 0, "entries": rows}
    first, second = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("first", "again"))
    assert max(float((first[k] - second[k]).abs().max()) for k in first) <= 1e-6, "the same answers, the same student"
