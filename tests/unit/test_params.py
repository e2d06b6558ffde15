"""params.yaml is what DVC fingerprints: it must equal a fresh composition of conf/."""

from __future__ import annotations

from omegaconf import OmegaConf

from caiforge import config


def test_params_yaml_is_fresh():
    # OmegaConf writes 2e-05 for floats; PyYAML (YAML 1.1) would read that as a string, DVC and OmegaConf do not.
    committed = OmegaConf.to_container(OmegaConf.load(config.ROOT / "params.yaml"))
    assert committed == config.compose(), "params.yaml is stale: run `uv run caiforge params`"


def test_profiles_compose():
    smoke = config.compose(["profile=smoke"])
    assert smoke["models"]["roles"]["policy"]["source"] == "tiny"
    assert config.compose(["profile=gpu"])["models"]["dtype"] == "bfloat16"


def test_command_line_model_group_beats_profile():
    assert config.compose(["profile=smoke", "models=hub"])["models"]["roles"]["policy"]["source"].startswith("hf:")


def engine_roles(params: dict) -> dict[str, dict]:
    """Every engine role of the chain (`<stage>.<role>`, a section with a `backend`)."""
    roles = {}
    for stage, section in params.items():
        if isinstance(section, dict):
            roles |= {f"{stage}.{k}": v for k, v in section.items() if isinstance(v, dict) and "backend" in v}
    return roles


def test_a_serving_group_puts_every_generation_and_scoring_role_but_rlaifs_on_managed_servers():
    """`-S serving=llama_cpp` (or vllm) moves the whole chain onto servers its stages start; rlaif's sampling must
    come from the model it trains. Each role composes into a valid engine config."""
    from pathlib import Path

    from caiforge import engines
    from caiforge.engines import serving

    assert {r for r, v in engine_roles(config.compose()).items() if v["backend"] != "transformers"} == set()
    for group, profile, launch in [("llama_cpp", "cpu_demo", "llama_server"), ("vllm", "gpu", "vllm")]:
        roles = engine_roles(config.compose([f"profile={profile}", f"serving={group}"]))
        assert len(roles) == 7 and {r for r, v in roles.items() if v["backend"] == "transformers"} == {
            "rlaif.generation"
        }
        for role, body in roles.items():
            if role == "rlaif.generation":
                continue
            kind = engines.ScoringConfig if role.endswith("scoring") else engines.GenerationConfig
            built = config.build(kind, body, "params.yaml", role)
            assert built.server.managed.launch == launch, role
    # One 8-GPU node: label's policy and feedback replicas (served at once) take disjoint halves of it.
    vllm = config.build(
        engines.GenerationConfig, engine_roles(config.compose(["serving=vllm"]))["label.generation"], "p", "r"
    ).server.managed
    policy = serving.placement(vllm.replicas, vllm.gpus_per_replica, [str(g) for g in range(8)])
    feedback = serving.placement(vllm.replicas, vllm.gpus_per_replica, [str(g) for g in range(8)], set(policy))
    assert policy == ["0", "1", "2", "3"] and feedback == ["4", "5", "6", "7"]
    cmd = serving.command_line(vllm, Path("/data/sft/model"), None, 8001, "0", "caiforge-1")
    assert cmd[:3] == ["vllm", "serve", "/data/sft/model"] and cmd[cmd.index("--dtype") + 1] == "bfloat16"
