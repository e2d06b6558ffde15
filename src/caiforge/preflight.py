"""Check every stage's configuration before anything runs (`caiforge check`, and the pipeline's `check` stage).

Each stage's config is built exactly as the stage will build it: its declared params read through DVC, its
constitution parts parsed, its dataclass's own validation (`__post_init__`) run. So a value that would stop
`evaluate` after an hour of upstream work stops the build before its first stage instead. The stage scripts
are imported for their config classes (`stages/<name>.py` defines `<Name>Config`); nothing else of them runs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from caiforge import config, constitution

CHECK_STAGE = "check"
"""The stage in dvc.yaml that runs this check first; it checks every other stage."""


class PreflightError(config.ConfigError):
    """One or more stages would fail on their configuration; the message lists each."""


def _stages(root: Path) -> dict[str, Any]:
    return yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def stage_names(root: Path) -> list[str]:
    """dvc.yaml's stages in file order, without the check stage itself."""
    return [name for name in _stages(root) if name != CHECK_STAGE]


def constitution_stages(root: Path) -> list[str]:
    """The stages that declare constitution parts in dvc.yaml (`constitutions/${constitution}.yaml: [...]`)."""
    return [
        name
        for name, body in _stages(root).items()
        for entry in body.get("params", ())
        if isinstance(entry, dict) and any(Path(f).parent == Path(config.CONSTITUTIONS) for f in entry)
    ]


def stage_module(root: Path, stage: str) -> ModuleType:
    """`stages/<name>.py` imported as module `caiforge_stage_<name>` (stage scripts are not a package; `main` is
    not run), once per process."""
    path = root / "stages" / f"{stage}.py"
    module_name = f"caiforge_stage_{stage}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None or not path.is_file():
        raise config.ConfigError(f"dvc.yaml: stage {stage!r}: no script {path.relative_to(root)}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def config_class(root: Path, stage: str) -> type:
    """`<Name>Config` from `stages/<name>.py`."""
    name = "".join(part.capitalize() for part in stage.split("_")) + "Config"
    cls = getattr(stage_module(root, stage), name, None)
    if not isinstance(cls, type):
        raise config.ConfigError(f"stages/{stage}.py: defines no {name} (each stage's config class)")
    return cls


def check(root: Path, constitution_file: Path | None = None, stages: list[str] | None = None) -> dict[str, Any]:
    """Build every stage's config (or those in `stages`); returns {stage: config}. Raises PreflightError listing
    each stage that fails, with the file and key its message names. `constitution_file` replaces the configured
    constitution (for checking a file before using it)."""
    from dvc.repo import Repo

    built: dict[str, Any] = {}
    errors: list[str] = []
    with Repo(str(root)) as repo:
        for stage in stages if stages is not None else stage_names(root):
            try:
                values = config.declared_params(stage, root, constitution_file, repo)
                built[stage] = config.from_declared(stage, config_class(root, stage), values)
            except (config.ConfigError, constitution.ConstitutionError, ValueError, FileNotFoundError) as exc:
                errors.append(f"{stage}: {exc}")
    if stages is None and (root / "params.yaml").is_file():
        from caiforge import launch

        try:  # how the training stages will be launched (process counts, the accelerate config file)
            launch.read(root)
        except (config.ConfigError, ValueError) as exc:
            errors.append(f"{launch.SECTION}: {exc}")
    if errors:
        raise PreflightError("\n".join(errors))
    return built
