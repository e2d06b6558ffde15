"""dvc.yaml consistency: a stage's name, script, params section, outputs, tests and code deps all line up.

Promise 1 (nothing is read that is not declared) fails silently when a stage imports a caiforge module that its
`deps` do not list: editing that module would not rebuild the stage. This walks the imports to catch it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from caiforge import config, launch

ROOT = config.ROOT
PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGES = PIPELINE["stages"]
PARAMS = OmegaConf.to_container(OmegaConf.load(ROOT / "params.yaml"))


def caiforge_imports(path: Path) -> set[str]:
    """caiforge modules a file imports directly (`from caiforge import x`, `from caiforge.x import y`, ...)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == "caiforge":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("caiforge."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("caiforge.")}
    return {m for m in found if dep_path(m).exists()}


def dep_path(module: str) -> Path:
    """A top-level caiforge module's file, or a subpackage's folder (declared whole, e.g. src/caiforge/engines)."""
    package = ROOT / "src" / "caiforge" / module
    return package if package.is_dir() else package.with_suffix(".py")


def module_files(module: str) -> list[Path]:
    path = dep_path(module)
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


def transitive_imports(script: Path) -> set[str]:
    seen: set[str] = set()
    todo = list(caiforge_imports(script))
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            for path in module_files(module):
                todo += caiforge_imports(path)
    return seen


def test_transitive_import_walk_follows_modules():
    # models.py imports config/io (via the stage) and nothing else caiforge; critique_revise reaches models via
    # generation, so the walk must find it even though the script imports it directly too.
    assert {"config", "io", "models"} <= transitive_imports(ROOT / "stages" / "models.py")
    assert "schemas" in transitive_imports(ROOT / "stages" / "models.py"), "io imports schemas"
    # A subpackage counts as one dep, and the walk goes through every module inside it.
    assert {"engines", "models"} <= transitive_imports(ROOT / "stages" / "critique_revise.py")
    assert dep_path("engines") == ROOT / "src" / "caiforge" / "engines"


def test_check_stage_reads_everything_and_runs_first():
    """The check stage builds every stage's config, so it depends on all params, constitutions and code, and the
    pipeline's first stages depend on its output (which orders it first)."""
    check = STAGES["check"]
    assert check["params"] == [{"params.yaml": None}], "all of params.yaml"
    assert {"stages", "src/caiforge", "constitutions"} <= set(check["deps"])
    assert check["outs"] == ["data/check/stages.json"]
    built = [o for n, s in STAGES.items() if n != "check" for o in s.get("outs", [])]
    built = [next(iter(o)) if isinstance(o, dict) else o for o in built]
    for name, stage in STAGES.items():
        upstream = [d for d in stage["deps"] if any(d == o or d.startswith(o + "/") for o in built)]
        assert name == "check" or upstream or "data/check/stages.json" in stage["deps"], f"{name} skips the check"
    assert all("data/check/stages.json" in STAGES[n]["deps"] for n in ("models", "curate"))


@pytest.mark.parametrize("name", sorted(set(STAGES) - {"check"}))
def test_stage_is_consistent(name):
    stage = STAGES[name]
    script = ROOT / "stages" / f"{name}.py"
    launched = name in launch.MULTI_PROCESS_STAGES  # run through caiforge.launch (one process or accelerate)
    assert stage["cmd"] == (f"python -m caiforge.launch {name}" if launched else f"python stages/{name}.py")
    if launched:
        assert "src/caiforge/launch.py" in stage["deps"]
        assert {"launch.num_processes", "launch.num_machines"} <= set(stage["params"]), "the global batch's factors"
    assert script.is_file()
    assert (ROOT / "tests" / "stages" / f"test_{name}.py").is_file(), "every stage has a stage test"
    assert name in PARAMS and name in stage["params"], "the stage declares its own params section"
    deps = set(stage["deps"])
    assert f"stages/{name}.py" in deps
    missing = {dep_path(m).relative_to(ROOT).as_posix() for m in transitive_imports(script)} - deps
    assert not missing, f"{name}: imports modules its deps do not list: {sorted(missing)}"
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", []) + stage.get("metrics", [])]
    assert outs and all(o.startswith(f"data/{name}/") for o in outs), outs


def test_declared_plots_live_in_stage_outputs():
    outs = {next(iter(o)) if isinstance(o, dict) else o for s in STAGES.values() for o in s.get("outs", [])}
    for plot in PIPELINE.get("plots", []):
        path = next(iter(plot)) if isinstance(plot, dict) else plot
        assert any(path.startswith(o + "/") for o in outs), f"plot {path} is not inside any stage output"


def test_every_input_file_a_param_names_is_a_dep():
    """A file a stage reads by a param (human labels, known answers, the harm judge) is declared, so editing it
    can never leave the stage silently stale."""
    checked = 0
    for name, stage in STAGES.items():
        section = PARAMS.get(name, {})
        for key, value in section.items():
            if isinstance(value, str) and value.startswith("data/seed/"):
                assert value in stage["deps"], f"{name}.{key}: {value} is read but not a dep in dvc.yaml"
                checked += 1
    assert checked >= 2
