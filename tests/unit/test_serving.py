"""Managed servers' pure parts: the command lines each launcher gets, GPU placement, and config errors. vLLM and
SGLang cannot run here (no GPU, no CPU wheels); their command lines are checked against the flags those projects
document (`vllm serve --help`, `python -m sglang.launch_server --help`). The real start/serve/stop path runs against
llama.cpp's servers in tests/stages/test_managed_servers.py."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from caiforge import config, engines
from caiforge.engines import conversion, serving


def managed(**kw) -> serving.ManagedConfig:
    return serving.ManagedConfig(**kw)


def test_vllm_and_sglang_replicas_get_their_own_gpus_and_flags():
    gpus = serving.placement(2, 2, ["0", "1", "2", "3"])
    assert gpus == ["0,1", "2,3"]
    vllm = serving.command_line(managed(launch="vllm", gpus_per_replica=2, args=("--max-model-len", "4096")),
                                Path("/m"), None, 8001, gpus[1])  # fmt: skip
    assert vllm[:3] == ["vllm", "serve", "/m"]
    flags = dict(zip(vllm[3::2], vllm[4::2], strict=True))
    assert flags == {
        "--host": "127.0.0.1",
        "--port": "8001",
        "--served-model-name": serving.SERVED_NAME,
        "--tensor-parallel-size": "2",
        "--seed": "0",
        "--max-model-len": "4096",
    }
    sglang = serving.command_line(managed(launch="sglang", gpus_per_replica=4), Path("/m"), None, 8002, "0,1,2,3")
    assert sglang[1:3] == ["-m", "sglang.launch_server"]
    flags = dict(zip(sglang[3::2], sglang[4::2], strict=True))
    assert flags["--model-path"] == "/m" and flags["--tp-size"] == "4" and flags["--port"] == "8002"
    assert flags["--served-model-name"] == serving.SERVED_NAME
    with pytest.raises(ValueError, match="3 replicas x 2 GPUs need 6 GPUs, but 4 are visible"):
        serving.placement(3, 2, ["0", "1", "2", "3"])
    assert serving.placement(2, 0, []) == [None, None], "llama.cpp on CPU: no GPU"
    # A second role's servers in the same stage (label: policy samples, feedback scores) take the GPUs left.
    assert serving.placement(1, 2, ["0", "1", "2", "3"], busy={"0", "1"}) == ["2,3"]
    with pytest.raises(ValueError, match="this stage's other servers hold 0,1"):
        serving.placement(2, 2, ["0", "1", "2", "3"], busy={"0", "1"})


def test_llama_launchers_serve_the_converted_gguf(monkeypatch):
    monkeypatch.setenv("CAIFORGE_LLAMA_SERVER", "/opt/llama-server")
    cpp = serving.command_line(managed(launch="llama_server", args=("--threads", "2")), Path("/m"), Path("/g.gguf"),
                               9000, None)  # fmt: skip
    assert cpp == ["/opt/llama-server", "--model", "/g.gguf", "--host", "127.0.0.1", "--port", "9000", "--alias",
                   serving.SERVED_NAME, "--threads", "2"]  # fmt: skip
    py = serving.command_line(managed(launch="llama_cpp_python"), Path("/m"), Path("/g.gguf"), 9001, None)
    assert py[1:3] == ["-m", "llama_cpp.server"] and py[py.index("--model_alias") + 1] == serving.SERVED_NAME
    assert serving.needs_gguf(managed(launch="llama_server")) and not serving.needs_gguf(
        managed(launch="vllm", gpus_per_replica=1)
    )


def test_a_command_template_fills_in_the_replica():
    cfg = managed(launch="command", command="my-server --weights {model} --listen {host}:{port} --as {name}")
    cmd = serving.command_line(cfg, Path("/m"), None, 7000, None)
    assert cmd == ["my-server", "--weights", "/m", "--listen", "127.0.0.1:7000", "--as", serving.SERVED_NAME]
    assert serving.needs_gguf(managed(launch="command", command="x {gguf} {port}"))
    with pytest.raises(ValueError, match=r"server.managed.command: .*'nope'"):
        serving.command_line(managed(launch="command", command="x {nope}"), Path("/m"), None, 1, None)


def test_bad_managed_settings_name_the_key():
    with pytest.raises(config.ConfigError, match=r"generation.server.managed: .*launch is 'command'"):
        config.build(
            engines.GenerationConfig, {"server": {"managed": {"launch": "command"}}}, "params.yaml", "generation"
        )
    with pytest.raises(config.ConfigError, match=r"generation.server.managed.launch: must be one of"):
        config.build(engines.GenerationConfig, {"server": {"managed": {"launch": "tgi"}}}, "params.yaml", "generation")
    with pytest.raises(ValueError, match="vllm needs gpus_per_replica >= 1"):
        managed(launch="vllm")
    with pytest.raises(ValueError, match="both server.urls and server.managed"):
        engines.ServerConfig(urls=("http://x:1/v1",), managed=managed(launch="llama_server"))


def test_plan_mode_starts_no_server_and_keys_rows_by_the_directory_and_the_launch_settings(
    tiny_model_dir, tmp_path, monkeypatch
):
    """`caiforge plan` counts a managed role's requests under the identity the real run will use (the served
    name and the directory's fingerprint), without starting anything."""
    import json

    from caiforge import planmode
    from caiforge.engines import identity as identities

    ctx = tmp_path / "plan.json"
    ctx.write_text(json.dumps({"report": str(tmp_path / "report.json"), "pending": []}))
    monkeypatch.setenv(planmode.ENV, str(ctx))
    script = tmp_path / "convert_hf_to_gguf.py"
    script.write_text(CONVERTER.format(version="v1"))
    monkeypatch.setenv("CAIFORGE_LLAMA_CONVERTER", str(script))

    def identity(weights=None, **settings) -> str:
        server = engines.ServerConfig(managed=managed(**settings), weights=weights)
        cfg = engines.GenerationConfig(backend="openai", server=server, progress=False)
        engine = engines.make_generator(tiny_model_dir, cfg)
        assert serving.running() == [] and engine.fleet.requests_sent == 0
        return engine.identity

    fingerprint = identities.fingerprint(tiny_model_dir)
    f16 = identity(launch="llama_server")
    assert f16 == f"openai:{identities.managed_label(managed(launch='llama_server'))}@{fingerprint}"
    assert f16.startswith(f"openai:{serving.SERVED_NAME}[llama_server,f16-conv")
    # Every launch setting that can change an answer changes the rows' identity; the weights stay the directory's.
    others = [
        identity(launch="llama_server", gguf_type="q8_0"),
        identity(launch="llama_cpp_python"),
        identity(launch="llama_server", args=("--ctx-size", "4096")),
        identity(launch="vllm", gpus_per_replica=1),
        identity(launch="vllm", gpus_per_replica=2),
        identity(launch="vllm", gpus_per_replica=1, args=("--quantization", "fp8")),
        identity(launch="command", command="my-server {model} --port {port}"),
    ]
    assert len({f16, *others}) == 8 and all(i.endswith(f"@{fingerprint}") for i in others)
    assert identity(launch="llama_server", replicas=4) == f16, "more replicas of the same server: the same rows"
    script.write_text(CONVERTER.format(version="v2"))
    assert identity(launch="llama_server") != f16, "a new converter writes a new GGUF"
    # A command that serves something other than the role's directory is identified by the revision it states.
    with pytest.raises(ValueError, match=r"serves neither \{model\} nor \{gguf\}: state what it serves with server"):
        identity(launch="command", command="my-server /models/llama --port {port}")
    stated = identity("revision:llama-3-8b-2024", launch="command", command="my-server /models/llama --port {port}")
    assert stated.endswith("@revision:llama-3-8b-2024")


def test_a_replica_given_no_gpus_sees_none(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert serving.replica_env(None)["CUDA_VISIBLE_DEVICES"] == ""
    assert serving.replica_env("1")["CUDA_VISIBLE_DEVICES"] == "1"
    assert serving.replica_env(None)["PATH"] == os.environ["PATH"], "the rest of the environment is kept"


# Stands in for llama.cpp's convert_hf_to_gguf.py (its real run is tests/stages/test_managed_servers.py): writes
# its version into the output and counts its runs.
CONVERTER = """import sys
args = sys.argv[1:]
open(args[args.index("--outfile") + 1], "w").write("{version}")
open(__file__ + ".runs", "a").write("x")
"""


def test_the_gguf_cache_is_keyed_by_the_converter_and_cleans_up_after_killed_conversions(
    tiny_model_dir, tmp_path, monkeypatch
):
    script, cache = tmp_path / "convert_hf_to_gguf.py", tmp_path / "gguf"
    monkeypatch.setenv("CAIFORGE_LLAMA_CONVERTER", str(script))
    script.write_text(CONVERTER.format(version="v1"))
    first = conversion.gguf_for(tiny_model_dir, "f16", cache)
    assert conversion.gguf_for(tiny_model_dir, "f16", cache) == first and first.read_text() == "v1"
    assert (tmp_path / "convert_hf_to_gguf.py.runs").read_text() == "x", "the same converter converts once"
    assert conversion.gguf_for(tiny_model_dir, "q8_0", cache) != first, "the type is part of the key"

    dead, live = cache / ".converting-999999999-abc", cache / f".converting-{os.getpid()}-def"
    dead.mkdir()
    live.mkdir()
    script.write_text(CONVERTER.format(version="v2"))  # a newer llama.cpp
    second = conversion.gguf_for(tiny_model_dir, "f16", cache)
    assert second != first and second.read_text() == "v2", "a new converter's output is not the old file"
    assert not dead.exists() and live.exists(), "a killed conversion's folder goes; a running one's stays"


def fake_tree(root: Path, script: str = CONVERTER.format(version="v1")) -> Path:
    """The three parts of a llama.cpp tree the converter needs, as the sdist vendors them."""
    root.mkdir(parents=True)
    (root / "convert_hf_to_gguf.py").write_text(script)
    for folder in ("conversion", "gguf-py/gguf"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "CMakeLists.txt").write_text("not needed")
    return root


def test_the_converter_comes_from_uvs_copy_of_the_locked_sdist_or_the_sdist_itself(tmp_path, monkeypatch):
    version = conversion.LLAMA_CPP_VERSION
    uv_cache = tmp_path / "uv"
    tree = fake_tree(uv_cache / f"sdists-v11/pypi/llama-cpp-python/{version}/AbC/src/vendor/llama.cpp")
    assert conversion.vendored_tree(uv_cache) == tree
    assert conversion.vendored_tree(tmp_path / "empty") is None
    script = conversion.unpack(tmp_path / "out", tree)
    assert sorted(p.name for p in script.parent.iterdir()) == ["conversion", "convert_hf_to_gguf.py", "gguf-py"]

    # From the sdist file: only the converter's parts of it, under its vendor/llama.cpp/ prefix.
    import tarfile

    sdist = tmp_path / f"llama_cpp_python-{version}.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(tree, arcname=f"llama_cpp_python-{version}/vendor/llama.cpp")
        tar.add(tree / "CMakeLists.txt", arcname=f"llama_cpp_python-{version}/setup.py")
    script = conversion.unpack(tmp_path / "from-sdist", sdist)
    assert sorted(p.name for p in script.parent.iterdir()) == ["conversion", "convert_hf_to_gguf.py", "gguf-py"]
    assert (script.parent / "gguf-py" / "gguf" / "__init__.py").is_file()
    with pytest.raises(FileNotFoundError, match="holds no llama.cpp convert_hf_to_gguf.py"):
        conversion.unpack(tmp_path / "nothing", tree.parent)
    assert not (tmp_path / "nothing").exists(), "nothing half-made is left"

    # The sdist it would download is the one uv.lock pins, with its hash.
    url, sha256 = conversion.locked_sdist(config.ROOT / "uv.lock")
    assert url.endswith(f"llama_cpp_python-{version}.tar.gz") and len(sha256) == 64

    # converter(): the build script's copy, else the unpacked one, else unpacked now from uv's cache.
    monkeypatch.delenv("CAIFORGE_LLAMA_CONVERTER", raising=False)
    monkeypatch.setenv("UV_CACHE_DIR", str(uv_cache))
    monkeypatch.setattr(conversion, "default_llama_dir", lambda: tmp_path / "no-build")
    monkeypatch.setattr(conversion, "unpacked_dir", lambda: tmp_path / "caiforge-cache" / "converter")
    found = conversion.converter()
    assert found == tmp_path / "caiforge-cache" / "converter" / "convert_hf_to_gguf.py" and found.is_file()
    monkeypatch.setenv("CAIFORGE_LLAMA_CONVERTER", str(tmp_path / "missing.py"))
    with pytest.raises(FileNotFoundError, match=r"CAIFORGE_LLAMA_CONVERTER names no file"):
        conversion.converter()


def test_inside_a_slurm_allocation_each_replica_is_a_step_on_the_nodes_in_turn(monkeypatch):
    """The pure part of job-step replicas (the real steps run in tests/stages/test_slurm.py): which srun flags,
    which node, which address the fleet is given, and who sets CUDA_VISIBLE_DEVICES."""
    from caiforge import slurm

    monkeypatch.setattr(slurm, "job", lambda: "42")
    monkeypatch.setattr(slurm, "nodes", lambda: ["gpu-a", "gpu-b"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    cfg = managed(launch="vllm", replicas=3, gpus_per_replica=2, srun_args=("--cpus-per-task=8",))
    planned = serving.plan(cfg, Path("/m"), None)
    for p, node in zip(planned, ["gpu-a", "gpu-b", "gpu-a"], strict=True):
        step, server = p.command[: p.command.index("--")], p.command[p.command.index("--") + 1 :]
        assert step[:2] == ["srun", "--jobid=42"] and f"--nodelist={node}" in step
        assert {"--exact", "--gpus-per-task=2", "--cpus-per-task=8", f"--job-name={p.name}"} <= set(step)
        assert "--overlap" not in step, "overlapping steps would share GPUs"
        port = server[server.index("--port") + 1]
        assert server[server.index("--host") + 1] == "0.0.0.0" and p.url == f"http://{node}:{port}/v1"
        assert "CUDA_VISIBLE_DEVICES" not in p.env, "Slurm sets the step's GPUs"
        assert p.job == "42" and p.name.startswith(slurm.STEP_PREFIX)
    cpu = serving.plan(managed(launch="llama_server", binary="/bin/llama-server"), Path("/m"), Path("/m.gguf"))
    assert "--overlap" in cpu[0].command and cpu[0].env["CUDA_VISIBLE_DEVICES"] == ""
    local = serving.plan(dataclasses.replace(cfg, replicas=2, slurm="off"), Path("/m"), None)
    assert [(p.job, p.gpus, p.command[0]) for p in local] == [(None, "0,1", "vllm"), (None, "2,3", "vllm")]
    assert all(p.url.startswith("http://127.0.0.1:") for p in local)
    monkeypatch.setenv("SLURM_STEP_ID", "3")  # a training task of a multi-node launch: its step holds the GPUs
    in_step = serving.plan(dataclasses.replace(cfg, replicas=2), Path("/m"), None)
    assert [(p.job, p.gpus, p.command[0]) for p in in_step] == [(None, "0,1", "vllm"), (None, "2,3", "vllm")]
