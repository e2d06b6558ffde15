"""Plan mode: a stage started by `caiforge plan` counts its engine requests instead of running them.

This module is what a stage needs to know about it, and nothing heavier: whether plan mode is on (`active`), the
exception that ends a planned stage (`Done`), and `end_of_requests`, which a stage calls after its last engine request
(a no-op in a normal run). The engines live in `caiforge.engines.plan`, the command in `caiforge.planning`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ENV = "CAIFORGE_PLAN"
"""Environment variable naming the plan-mode context file (set by `caiforge plan` for the stages it starts)."""

PENDING = "pending:"
"""Identity prefix of a model a stage upstream retrains in this build: every request to it depends."""

MARK = "\u2063pending-answer-"
"""Starts every placeholder answer (U+2063 never appears in a rendered prompt): a prompt holding it depends."""


@dataclass(frozen=True)
class Context:
    report: str
    """File the stage writes its counts to."""
    pending: tuple[str, ...] = ()
    """Outputs (paths relative to the project root) that stages upstream rebuild in this build."""


class Done(Exception):
    """Raised by `end_of_requests` in plan mode: the stage has asked everything; `stage_main` exits 0."""


def active() -> Context | None:
    """The plan-mode context, or None in a normal run."""
    path = os.environ.get(ENV)
    if not path:
        return None
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return Context(report=data["report"], pending=tuple(data.get("pending", ())))


@dataclass
class Counts:
    cached: int = 0
    send: int = 0
    depends: int = 0

    def add(self, other: Counts) -> None:
        self.cached += other.cached
        self.send += other.send
        self.depends += other.depends


CACHES: list[Any] = []
"""The plan-mode row caches this process opened (`caiforge.rowcache.PlanCache`): their counts are the report."""


def end_of_requests() -> None:
    """Called by a stage after its last engine request: in plan mode, write the counts and stop the stage."""
    ctx = active()
    if ctx is None:
        return
    total = Counts()
    for cache in CACHES:
        total.add(cache.counts)
    CACHES.clear()
    Path(ctx.report).write_text(json.dumps(asdict(total)), encoding="utf-8")
    raise Done
