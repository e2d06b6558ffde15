"""`caiforge review`: a local page where a person decides the pairs the AI labeller was unsure of (HRLAIF).

It serves the review queue of the workspace's current build (label's `review_queue.parquet`, checked against
`dvc.lock`) on 127.0.0.1 with aiohttp. Per pair it shows the prompt, the two answers side by side in an order drawn per
reviewer and pair, and why the pair was queued; the AI's label and per-principle probabilities stay hidden until the
reviewer decides (or asks). Left, right, tie or skip, by key or button, is saved at once through
`caiforge.human_labels.record` to the file `label` reads (`label.human_labels`), with the reviewer, the time, the
order shown and the AI's label. Progress and verdicts live only in that file, so a reload, a second tab or a restart
resumes where the reviewer stopped, and `dvc status` shows `label` changed as soon as a verdict is saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import html
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from caiforge import human_labels, io, labeling, schemas

DECISIONS = ("left", "right", "tie", "skip")
"""What a reviewer can decide (keys: left and right arrows, down arrow or t, s)."""


class ReviewError(ValueError):
    """The workspace cannot be reviewed (no queue, a queue from another build, a port in use)."""


@dataclass(frozen=True)
class Pair:
    """One queued pair, as label wrote it: `chosen`/`rejected`/`p_chosen` are the AI's verdict."""

    number: int
    """1-based position in the queue (the page's URL)."""
    row: Mapping[str, Any]

    @property
    def key(self) -> tuple[str, frozenset[str]]:
        return labeling.pair_key(self.row["prompt_id"], self.row["chosen"], self.row["rejected"])


@dataclass(frozen=True)
class Workspace:
    """What `caiforge review` reads and writes, resolved from the project's params.yaml."""

    root: Path
    queue: Path
    labels: Path

    @classmethod
    def of(cls, root: Path) -> Workspace:
        params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")) or {}
        label = params.get("label") or {}
        if "out_dir" not in label or "human_labels" not in label:
            raise ReviewError(f"{root / 'params.yaml'}: label.out_dir and label.human_labels must be set")
        return cls(root, root / label["out_dir"] / "review_queue.parquet", root / label["human_labels"])

    def load(self) -> list[Pair]:
        """The queued pairs of the current build; errors if label has not run or the queue is not dvc.lock's."""
        rel = self.queue.relative_to(self.root).as_posix()
        if not self.queue.is_file():
            raise ReviewError(f"{rel}: no review queue: label has not run here (run `uv run dvc repro label`)")
        lock = self.root / "dvc.lock"
        stage = ((yaml.safe_load(lock.read_text(encoding="utf-8")) or {}) if lock.is_file() else {}).get("stages", {})
        outs = {o["path"]: o.get("md5") for o in (stage.get("label") or {}).get("outs", [])}
        if rel not in outs:
            raise ReviewError(f"{lock.name} records no build of {rel}: build it with `uv run dvc repro label`")
        if hashlib.md5(self.queue.read_bytes()).hexdigest() != outs[rel]:
            raise ReviewError(
                f"{rel} is not the build {lock.name} records (it was written by another run or changed by hand): "
                "rebuild it with `uv run dvc repro label`, or `dvc checkout` the locked one"
            )
        human_labels.read(self.labels)  # a malformed labels file stops here, before the page is served
        rows = io.read_parquet(self.queue, schemas.REVIEW_QUEUE).iter_rows(named=True)
        return [Pair(n, row) for n, row in enumerate(rows, start=1)]


def drawn_left(pair: Pair, reviewer: str) -> str:
    """Which of the AI's answers ("chosen" or "rejected") this reviewer sees on the left: drawn per reviewer and
    pair (a fixed seed, so a reload shows the same page), half of the pairs each way in expectation."""
    return "chosen" if random.Random(f"{reviewer}\0{pair.row['pair_id']}").random() < 0.5 else "rejected"


@dataclass(frozen=True)
class Shown:
    """A pair as one reviewer sees it: which AI side is on the left, and the verdict saved for it (if any)."""

    pair: Pair
    left: str
    """"chosen" or "rejected": the AI's side shown on the left."""
    decision: str | None
    """left, right, tie or skip, from the labels file (None: undecided)."""

    @property
    def texts(self) -> tuple[str, str]:
        right = "rejected" if self.left == "chosen" else "chosen"
        return self.pair.row[self.left], self.pair.row[right]


def shown(pair: Pair, verdict: Mapping[str, Any] | None, reviewer: str) -> Shown:
    """The pair as it was shown when decided (the verdict's recorded order), else as drawn for `reviewer`."""
    if verdict is None:
        return Shown(pair, drawn_left(pair, reviewer), None)
    left_text = verdict[verdict["left"]] if verdict.get("left") in ("chosen", "rejected") else None
    left = "chosen" if left_text == pair.row["chosen"] else "rejected" if left_text else drawn_left(pair, reviewer)
    kind = verdict.get("verdict") or "prefer"
    left_won = verdict["chosen"] == pair.row[left]
    return Shown(pair, left, ("left" if left_won else "right") if kind == "prefer" else kind)


def verdict_row(view: Shown, decision: str, reviewer: str, now: datetime) -> dict[str, Any]:
    """The labels-file row for `decision` on `view`: `label`'s fields plus who, when, the order shown and the AI's
    probability that this row's `chosen` is better. A tie or skip keeps the AI's orientation and holds no
    preference."""
    if decision not in DECISIONS:
        raise ValueError(f"unknown decision {decision!r} (one of {', '.join(DECISIONS)})")
    row, left_text, right_text = view.pair.row, *view.texts
    chosen, rejected = (left_text, right_text) if decision == "left" else (right_text, left_text)
    if decision in ("tie", "skip"):
        chosen, rejected = row["chosen"], row["rejected"]
    return {
        "prompt_id": row["prompt_id"],
        "chosen": chosen,
        "rejected": rejected,
        "verdict": "prefer" if decision in ("left", "right") else decision,
        "pair_id": row["pair_id"],
        "reviewer": reviewer,
        "time": now.astimezone(UTC).isoformat(timespec="seconds"),
        "left": "chosen" if chosen == left_text else "rejected",
        "ai_p_chosen": row["p_chosen"] if chosen == row["chosen"] else 1.0 - row["p_chosen"],
    }


# ---------------------------------------------------------------------------------------------------------------
# The page (server-rendered; a few lines of script map keys to the buttons)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 72rem; padding: 0 1rem; color: #222; }
header { display: flex; justify-content: space-between; align-items: baseline; gap: 1rem; }
progress { width: 16rem; }
.prompt, .answer { white-space: pre-wrap; border: 1px solid #ccc; border-radius: 6px; padding: 0.8rem; }
.prompt { background: #f6f6f6; }
.answers { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; margin: 1rem 0; }
.answer h3 { margin: 0 0 0.5rem 0; font-size: 1rem; }
.answer.picked { border: 3px solid #2a7; }
form.decide { display: flex; gap: 0.6rem; flex-wrap: wrap; }
button { font-size: 1rem; padding: 0.5rem 1rem; }
kbd { border: 1px solid #999; border-radius: 3px; padding: 0 0.3rem; font-size: 0.85rem; }
.note { background: #eef6ff; border-left: 4px solid #48c; padding: 0.5rem 0.8rem; margin: 1rem 0; }
.why { color: #555; }
nav { margin-top: 1rem; display: flex; gap: 1rem; }
details { margin-top: 1rem; }
"""

KEYS = """
document.addEventListener("keydown", (e) => {
  if (e.altKey || e.ctrlKey || e.metaKey) return;
  const keys = {ArrowLeft: "left", ArrowRight: "right", ArrowDown: "tie", t: "tie", s: "skip"};
  const nav = {p: "prev", n: "next"};
  if (keys[e.key]) { e.preventDefault(); document.getElementById("decide-" + keys[e.key]).click(); }
  else if (nav[e.key] && document.getElementById(nav[e.key])) { document.getElementById(nav[e.key]).click(); }
  else if (e.key === "a") { const d = document.getElementById("ai-label"); d.open = !d.open; }
});
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _page(title: str, body: str, script: str = "") -> str:
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{STYLE}</style></head><body>{body}{f'<script>{script}</script>' if script else ''}</body></html>"
    )


def _progress(done: int, total: int, reviewer: str) -> str:
    return (
        f'<header><h1>caiforge review</h1><span id="progress">{done} of {total} reviewed</span>'
        f'<progress value="{done}" max="{total}"></progress><span>reviewer <b>{_e(reviewer)}</b></span></header>'
    )


def _ai_label(view: Shown) -> str:
    """The AI's verdict in the page's terms: which side it preferred, how strongly, and under each principle."""
    row = view.pair.row
    side = "left" if view.left == "chosen" else "right"

    def leaning(p: float) -> str:  # p: the AI's chosen answer is better under one principle
        if round(p, 2) == 0.5:
            return "neither (P = 0.50)"
        return f"{side if p > 0.5 else ('right' if side == 'left' else 'left')} (P = {max(p, 1 - p):.2f})"

    per = "".join(
        f"<li><code>{_e(pid)}</code>: {leaning(p)}</li>"
        for pid, p in zip(row["principle_ids"], row["principle_p_chosen"], strict=True)
    )
    verdict = ""
    if view.decision in ("left", "right"):
        verdict = " You agree." if view.decision == side else " You disagree."
    return f"The AI preferred the <b>{side}</b> answer, P = {row['p_chosen']:.2f}.{verdict}<ul>{per}</ul>"


def _saved_note(last: Shown) -> str:
    """What the page says after a decision: the verdict just saved and, now, the AI's label of that pair."""
    return (
        f'<div class="note" id="last">Saved: pair {last.pair.number}, <b>{_e(last.decision)}</b>. '
        f"{_ai_label(last)}</div>"
    )


def pair_page(view: Shown, done: int, total: int, reviewer: str, last: Shown | None) -> str:
    row, (left, right) = view.pair.row, view.texts
    reasons = ", ".join(r.replace("_", " ") for r in row["reasons"])
    note = _saved_note(last) if last is not None else ""
    picked = {
        "left": " picked" if view.decision == "left" else "",
        "right": " picked" if view.decision == "right" else "",
    }
    n = view.pair.number
    decided = f"Your verdict: <b>{_e(view.decision)}</b> (decide again to change it)." if view.decision else ""
    buttons = "".join(
        f'<button type="submit" name="decision" value="{d}" id="decide-{d}">{d} <kbd>{k}</kbd></button>'
        for d, k in (("left", "\u2190"), ("right", "\u2192"), ("tie", "\u2193 / t"), ("skip", "s"))
    )
    nav = (f'<a id="prev" href="/pair/{n - 1}">\u2190 previous <kbd>p</kbd></a>' if n > 1 else "") + (
        f'<a id="next" href="/pair/{n + 1}">next <kbd>n</kbd> \u2192</a>' if n < total else ""
    )
    body = (
        f"{_progress(done, total, reviewer)}{note}"
        f"<p>Pair {n} of {total} &middot; prompt <code>{_e(row['prompt_id'])}</code> &middot; "
        f'<span class="why" id="why">queued for: {_e(reasons)} (confidence {row["confidence"]:.2f}, principles '
        f"disagree by {row['disagreement']:.2f})</span></p>"
        f'<div class="prompt" id="prompt">{_e(row["prompt"])}</div>'
        f'<div class="answers"><div class="answer{picked["left"]}" id="left"><h3>Left</h3>{_e(left)}</div>'
        f'<div class="answer{picked["right"]}" id="right"><h3>Right</h3>{_e(right)}</div></div>'
        f'<p id="decided">{decided}</p>'
        f'<form class="decide" method="post" action="/pair/{n}">'
        f'<input type="hidden" name="left" value="{view.left}">{buttons}</form>'
        f'<details id="ai-label"{" open" if view.decision else ""}><summary>The AI\'s label <kbd>a</kbd></summary>'
        f"{_ai_label(view)}</details><nav>{nav}</nav>"
    )
    return _page(f"caiforge review: pair {n} of {total}", body, KEYS)


def done_page(done: int, total: int, reviewer: str, last: Shown | None = None) -> str:
    note = _saved_note(last) if last is not None else ""
    body = (
        f'{_progress(done, total, reviewer)}{note}<p id="all-done">Every queued pair has a verdict. Run '
        "<code>uv run dvc repro</code>: label takes your preferences, and the report shows how often the AI agreed "
        'with them.</p><nav><a href="/pair/1">review again from pair 1</a></nav>'
    )
    return _page("caiforge review: done", body)


# ---------------------------------------------------------------------------------------------------------------
# The web app


@web.middleware
async def _labels_errors(request: web.Request, handler) -> web.StreamResponse:
    """A labels file broken while the page is up (a hand edit) is a page that names the line, not a bare 500."""
    try:
        return await handler(request)
    except human_labels.HumanLabelsError as exc:
        raise web.HTTPConflict(text=f"{exc}\n\nNothing was saved. Fix the file, then reload this page.") from None


class Review:
    """The state one `caiforge review` process serves: the queue (fixed) and the labels file (reread per request)."""

    def __init__(self, workspace: Workspace, reviewer: str) -> None:
        self.workspace, self.reviewer = workspace, reviewer
        self.pairs = workspace.load()
        if not self.pairs:
            raise ReviewError(f"{workspace.queue}: the review queue is empty: the AI labeller was sure of every pair")

    def views(self) -> list[Shown]:
        """Every queued pair with its saved verdict, read from the labels file now (other tabs write it too)."""
        saved = human_labels.read(self.workspace.labels)
        return [shown(p, saved[p.key].row if p.key in saved else None, self.reviewer) for p in self.pairs]

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_labels_errors])
        app.add_routes(
            [web.get("/", self.start), web.get("/pair/{n:\\d+}", self.show), web.post("/pair/{n:\\d+}", self.decide)]
        )
        return app

    async def start(self, request: web.Request) -> web.StreamResponse:
        views = self.views()
        todo = [v for v in views if v.decision is None]
        if not todo:
            last = self._saved(request, views)
            page = done_page(len(views), len(views), self.reviewer, last)
            return web.Response(text=page, content_type="text/html")
        raise web.HTTPSeeOther(f"/pair/{todo[0].pair.number}")

    def _number(self, request: web.Request) -> int:
        n = int(request.match_info["n"])
        if not 1 <= n <= len(self.pairs):
            raise web.HTTPNotFound(text=f"no pair {n}: the queue has {len(self.pairs)}")
        return n

    @staticmethod
    def _saved(request: web.Request, views: list[Shown]) -> Shown | None:
        """The pair the last decision saved (`?saved=<n>`), whose AI label the page now shows."""
        n = request.query.get("saved", "")
        return views[int(n) - 1] if n.isdigit() and 1 <= int(n) <= len(views) else None

    async def show(self, request: web.Request) -> web.Response:
        n, views = self._number(request), self.views()
        done = sum(v.decision is not None for v in views)
        page = pair_page(views[n - 1], done, len(views), self.reviewer, self._saved(request, views))
        return web.Response(text=page, content_type="text/html")

    async def decide(self, request: web.Request) -> web.StreamResponse:
        n, form = self._number(request), await request.post()
        decision, left = form.get("decision"), form.get("left")
        if decision not in DECISIONS or left not in ("chosen", "rejected"):
            raise web.HTTPBadRequest(text="decision must be left, right, tie or skip, with the order shown")
        view = Shown(self.pairs[n - 1], str(left), None)  # the order this form was rendered with
        human_labels.record(self.workspace.labels, verdict_row(view, str(decision), self.reviewer, datetime.now(UTC)))
        views = self.views()
        after = [v for v in views[n:] + views[: n - 1] if v.decision is None]
        if not after:
            raise web.HTTPSeeOther(f"/?saved={n}")
        raise web.HTTPSeeOther(f"/pair/{after[0].pair.number}?saved={n}")


async def _serve(review: Review, host: str, port: int, announce: Callable[[str], None]) -> None:
    runner = web.AppRunner(review.app(), access_log=None)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise ReviewError(f"cannot serve on {host}:{port}: {exc.strerror} (choose another with --port)") from None
        ws = review.workspace
        announce(
            f"Reviewing {len(review.pairs)} queued pairs of {ws.queue.relative_to(ws.root)} as {review.reviewer!r}, "
            f"saving to {ws.labels.relative_to(ws.root)}\nOpen http://{host}:{port}/  (Ctrl-C to stop)"
        )
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def serve(
    root: Path, reviewer: str, announce: Callable[[str], None], host: str = "127.0.0.1", port: int = 8765
) -> None:
    """Check the workspace, then serve its review page until interrupted; `announce` gets the URL once it is up.

    Raises ReviewError or HumanLabelsError, before anything is served or written, for a workspace it cannot review."""
    review = Review(Workspace.of(root), reviewer)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(review, host, port, announce))
