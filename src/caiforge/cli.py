"""The `caiforge` command line.

    caiforge constitution check FILE                     validate a constitution, print counts per part and category
    caiforge constitution import FORMAT SRC DEST [--force]   convert another project's format into our YAML
    caiforge params [OVERRIDE ...]                       compose conf/ into params.yaml (as `dvc exp run` does)
    caiforge harm-judge fit [--harmless FILE] [-o FILE]  refit the evaluation's harm judge (data/seed/harm_judge.json)
    caiforge plan [STAGE ...] [--json]                   what the next `dvc repro` runs and sends, from the row caches

Each command is one function `(args) -> exit code`; `GROUPS` maps a top-level command to the function that adds its
subcommands, so a new command (e.g. `params`) is one more entry there.
"""

from __future__ import annotations

import argparse
import logging
import sys
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


def constitution_check(args: argparse.Namespace) -> int:
    """Validate a constitution file (both principle lists required) and print a one-line summary."""
    c = constitution.check(args.file)
    print(f"{args.file}: ok: {c.name or '<unnamed>'}: {_counts(c)}")
    return 0


def constitution_import(args: argparse.Namespace) -> int:
    """Convert SRC (in FORMAT) into a constitution YAML at DEST; an existing DEST needs --force."""
    dest = Path(args.dest)
    if dest.exists() and not args.force:
        print(f"error: {dest} exists (use --force to overwrite it)", file=sys.stderr)
        return 1
    c = constitution.IMPORTERS[args.format](Path(args.src))
    constitution.dump(c, dest)
    print(f"{dest}: wrote {c.name}: {_counts(c)}")
    return 0


def _add_constitution(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("constitution", help="check or import constitution files")
    commands = group.add_subparsers(dest="subcommand", required=True, metavar="{check,import}")

    check = commands.add_parser("check", help="validate a constitution file and print counts")
    check.add_argument("file", help="constitution YAML, e.g. constitutions/default.yaml")
    check.set_defaults(func=constitution_check)

    imp = commands.add_parser("import", help="convert another project's constitution format into caiforge YAML")
    imp.add_argument("format", choices=sorted(constitution.IMPORTERS), help="source format")
    imp.add_argument("src", help="source file or folder (anthropic: the paper's prompts/ folder)")
    imp.add_argument("dest", help="YAML file to write, e.g. constitutions/anthropic.yaml")
    imp.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
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
    "constitution": _add_constitution,
    "params": _add_params,
    "harm-judge": _add_harm_judge,
    "plan": _add_plan,
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
