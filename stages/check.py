"""check: every stage's config and the constitution, checked before any other stage runs.

Reads  params.yaml (all of it), constitutions/, dvc.yaml's params declarations, each stage's config class.
Writes data/check/stages.json: the stages checked. Its bytes change only when dvc.yaml's stage list does, so a
       passing check never invalidates the stages that depend on it (models and curate, hence all of them).
Run    uv run dvc repro (first, whenever a param, a constitution or the code changed); `uv run caiforge check`.
"""

from __future__ import annotations

import logging
import sys

from caiforge import config, constitution, io, preflight


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    root = config.project_root()
    try:
        built = preflight.check(root)
    except (config.ConfigError, constitution.ConstitutionError) as exc:
        sys.exit(f"check: error: the build would fail, so no stage runs:\n{exc}")
    io.write_json({"stages": list(built)}, root / "data" / "check" / "stages.json")
    logging.getLogger("caiforge.stages.check").info("check: %d stages ok", len(built))


if __name__ == "__main__":
    main()
