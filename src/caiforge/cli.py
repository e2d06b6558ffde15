"""The `caiforge` command line.

    caiforge check                                       check every stage's config before anything runs
    caiforge constitution check [FILE]                   validate a constitution as the stages will, print counts
    caiforge constitution import FORMAT SRC DEST [--force] [--fill-from FILE]   convert another format into our YAML
    caiforge params [OVERRIDE ...]                       compose conf/ into params.yaml (as `dvc exp run` does)
    caiforge harm-judge fit [--harmless FILE] [-o FILE]  refit the evaluation's harm judge (data/seed/harm_judge.json)
    caiforge plan [STAGE ...] [--json]                   what the next `dvc repro` runs and sends, from the row caches
    caiforge review [--port N] [--reviewer NAME]          decide the review queue's pairs in a local page (HRLAIF)

Each command is one function `(args) -> exit code`; `GROUPS` maps a top-level command to the function that adds its
subcommands, so a new command (e.g. `params`) is one more entry there.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from caiforge import config, constitution

log = logging.getLogger(__name__)

Command = Callable[[argparse.Namespace], int]


def _counts(c: constitution.Constitution) -> str:
    """`critique_revision 16 (harmlessness 9, ...), critique_revision_examples 5, ...` for one-line summaries."""
    out = []
    for part in constitution.PARTS:
        entries = getattr(c, part)
        text = f"{part} {len(entries)}"
        if part in ("critique_revision", "comparison") and entries:
            per = Counter(p.category for p in entries)
            text += " (" + ", ".join(f"{cat} {per[cat]}" for cat in constitution.CATEGORIES if per[cat]) + ")"
        out.append(text)
    return ", ".join(out)


def configured_constitution(root: Path) -> Path:
    """constitutions/<name>.yaml for the `constitution:` key of the project's params.yaml."""
    import yaml

    params = root / "params.yaml"
    name = (yaml.safe_load(params.read_text(encoding="utf-8")) or {}).get("constitution") if params.is_file() else None
    if not isinstance(name, str) or not name:
        raise config.ConfigError(f"{params}: constitution: not set (name a file in {config.CONSTITUTIONS}/)")
    return root / config.CONSTITUTIONS / f"{name}.yaml"


def _stage_check(root: Path, file: Path) -> list[str]:
    """Check `file` as every stage that reads constitution parts would (parts declared in dvc.yaml, categories each
    stage's config requires); returns those stages' names."""
    from caiforge import preflight

    using = preflight.constitution_stages(root)
    preflight.check(root, file.resolve(), using)
    return using


def constitution_check(args: argparse.Namespace) -> int:
    """Validate a constitution file (default: the configured one), then check it as the stages will."""
    root = config.project_root()
    file = Path(args.file) if args.file else Path(os.path.relpath(configured_constitution(root)))
    c = constitution.check(file)
    stages = _stage_check(root, file)
    print(f"{file}: ok: {c.name or '<unnamed>'}: {_counts(c)}; accepted by {', '.join(stages)}")
    return 0


def constitution_import(args: argparse.Namespace) -> int:
    """Convert SRC (in FORMAT) into a constitution YAML at DEST that the pipeline accepts (else nothing is written);
    --fill-from completes what the format lacks from another constitution. An existing DEST needs --force."""
    from caiforge import preflight

    dest = Path(args.dest)
    if dest.exists() and not args.force:
        print(f"error: {dest} exists (use --force to overwrite it)", file=sys.stderr)
        return 1
    c = constitution.IMPORTERS[args.format](Path(args.src))
    if args.fill_from:
        c, added = constitution.fill_from(c, constitution.load(args.fill_from))
        for line in added:
            print(f"{dest}: from {args.fill_from}: {line}")
    root = config.project_root()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".import-") as scratch:
        trial = Path(scratch) / dest.name
        constitution.dump(c, trial)
        try:
            constitution.check(trial)
            stages = _stage_check(root, trial)
        except (constitution.ConstitutionError, preflight.PreflightError) as exc:
            hint = f"; add what is missing from another constitution: --fill-from {_default(root)}"
            message = str(exc).replace(str(trial.resolve()), str(dest)).replace(str(trial), str(dest))
            print(
                f"error: {args.format} import of {args.src} would not run in this pipeline, so {dest} was not "
                f"written:\n{message}{'' if args.fill_from else hint}",
                file=sys.stderr,
            )
            return 1
        os.replace(trial, dest)
    print(f"{dest}: wrote {c.name}: {_counts(c)}; accepted by {', '.join(stages)}")
    return 0


def _default(root: Path) -> str:
    default = root / config.CONSTITUTIONS / "default.yaml"
    return os.path.relpath(default) if default.is_file() else "constitutions/default.yaml"


def check_all(args: argparse.Namespace) -> int:
    """Build every stage's config as the stage will (params, constitution parts, each config's own checks)."""
    from caiforge import preflight

    root = config.project_root()
    built = preflight.check(root)
    file = os.path.relpath(configured_constitution(root))
    print(f"ok: {len(built)} stages ({', '.join(built)}), constitution {file}")
    return 0


def _add_check(sub: argparse._SubParsersAction) -> None:
    cmd = sub.add_parser("check", help="check every stage's config and the constitution before running anything")
    cmd.set_defaults(func=check_all)


def _add_constitution(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("constitution", help="check or import constitution files")
    commands = group.add_subparsers(dest="subcommand", required=True, metavar="{check,import}")

    check = commands.add_parser("check", help="validate a constitution file as the stages will, print counts")
    check.add_argument("file", nargs="?", help="constitution YAML (default: the one params.yaml configures)")
    check.set_defaults(func=constitution_check)

    imp = commands.add_parser("import", help="convert another project's constitution format into caiforge YAML")
    imp.add_argument("format", choices=sorted(constitution.IMPORTERS), help="source format")
    imp.add_argument("src", help="source file or folder (anthropic: the paper's prompts/ folder)")
    imp.add_argument("dest", help="YAML file to write, e.g. constitutions/anthropic.yaml")
    imp.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
    imp.add_argument(
        "--fill-from",
        metavar="FILE",
        help="take the parts and principle categories the source lacks from this constitution (e.g. the default)",
    )
    imp.set_defaults(func=constitution_import)


def params_write(args: argparse.Namespace) -> int:
    """Compose conf/ with Hydra overrides into params.yaml, exactly as DVC's Hydra integration writes it."""
    root = config.project_root()
    out = Path(args.output) if args.output else root / "params.yaml"
    config.write_params(out, args.overrides, root / "conf")
    print(f"{out}: composed from {root / 'conf'}" + (f" with {' '.join(args.overrides)}" if args.overrides else ""))
    return 0


def _add_params(sub: argparse._SubParsersAction) -> None:
    cmd = sub.add_parser("params", help="compose conf/ into params.yaml (Hydra overrides allowed)")
    cmd.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. profile=smoke models=hub sft.epochs=1")
    cmd.add_argument("-o", "--output", help="file to write (default: params.yaml at the project root)")
    cmd.set_defaults(func=params_write)


def harm_judge_fit(args: argparse.Namespace) -> int:
    """Refit the independent harm judge on PyRIT's labelled responses + the harmless seed file, and save it."""
    from caiforge import harm_judge

    root = config.project_root()
    out = Path(args.output) if args.output else root / harm_judge.SHIPPED_FILE
    judge = harm_judge.fit_default(args.harmless)
    judge.save(out)
    print(f"{out}: harm judge with {len(judge.weights)} weights")
    return 0


def _add_harm_judge(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("harm-judge", help="refit the evaluation's independent harm judge")
    commands = group.add_subparsers(dest="subcommand", required=True, metavar="{fit}")
    fit = commands.add_parser("fit", help="fit on PyRIT's labelled responses + harmless seed responses, save JSON")
    fit.add_argument("--harmless", help="harmless responses JSONL (default: data/seed/harmless_responses.jsonl)")
    fit.add_argument("-o", "--output", help="file to write (default: data/seed/harm_judge.json)")
    fit.set_defaults(func=harm_judge_fit)


def plan_show(args: argparse.Namespace) -> int:
    """Print what the next `dvc repro` runs and, per stage that asks engines, what its row cache answers."""
    import dataclasses
    import json

    from caiforge import planning

    plans = planning.plan(config.project_root(), args.stages)
    print(json.dumps([dataclasses.asdict(p) for p in plans], indent=1) if args.json else planning.table(plans))
    return 0


def review_serve(args: argparse.Namespace) -> int:
    """Serve the review page for the project's review queue until Ctrl-C."""
    from caiforge import human_labels, review

    try:
        review.serve(config.project_root(), args.reviewer, lambda line: print(line, flush=True), port=args.port)
    except (review.ReviewError, human_labels.HumanLabelsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _add_review(sub: argparse._SubParsersAction) -> None:
    import getpass

    cmd = sub.add_parser("review", help="decide the pairs the AI labeller was unsure of, in a local web page")
    cmd.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default: 8765)")
    cmd.add_argument("--reviewer", default=getpass.getuser(), help="your name in the verdicts (default: the login)")
    cmd.set_defaults(func=review_serve)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    cmd = sub.add_parser(
        "plan", help="what the next dvc repro runs, and the engine requests it sends (counted, no model loaded)"
    )
    cmd.add_argument("stages", nargs="*", help="plan the requests of these stages only (default: every one)")
    cmd.add_argument("--json", action="store_true", help="print the plan as JSON")
    cmd.set_defaults(func=plan_show)


ERRORS: tuple[type[Exception], ...] = (constitution.ConstitutionError, config.ConfigError, config.StageError)
"""User-input errors: reported as `error: <message>` with exit code 1 instead of a traceback."""

GROUPS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "check": _add_check,
    "constitution": _add_constitution,
    "params": _add_params,
    "harm-judge": _add_harm_judge,
    "plan": _add_plan,
    "review": _add_review,
}
"""Top-level commands: name -> function that registers its parser(s) and sets `func` on each leaf."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caiforge", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(GROUPS) + "}")
    for add in GROUPS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `caiforge` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    command: Command = args.func
    try:
        return command(args)
    except ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
