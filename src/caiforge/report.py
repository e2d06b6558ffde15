"""A self-contained HTML report: SVG plots embedded as images, tables, side-by-side answers.

No plotting library and no network: plots are small hand-written SVG documents (deterministic bytes), embedded
as `data:image/svg+xml;base64` images so the page is one file that opens anywhere.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
W, H, PAD = 560, 380, 56


@dataclass(frozen=True)
class Point:
    """One labelled point with optional symmetric or asymmetric error bars (low, high) per axis."""

    label: str
    x: float
    y: float
    x_range: tuple[float, float] | None = None
    y_range: tuple[float, float] | None = None


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if step * m >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step) + 1)]


def _tick_labels(ticks: Sequence[float]) -> list[str]:
    """Tick labels with as many decimals as the step needs, so close ticks never read alike ("1000" x 5)."""
    for decimals in range(0, 11):
        if all(abs(round(t, decimals) - t) < 1e-9 * max(1.0, abs(t)) for t in ticks):
            return [f"{t:.{decimals}f}" for t in ticks]
    return [_fmt(t) for t in ticks]


def _bounds(values: Sequence[float], pad: float = 0.08) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    span = hi - lo or (abs(hi) or 1.0)
    return lo - pad * span, hi + pad * span


class _Frame:
    """Axes mapping data coordinates into the SVG canvas."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float]) -> None:
        self.x0, self.x1 = _bounds(xs)
        self.y0, self.y1 = _bounds(ys)

    def px(self, x: float) -> float:
        return PAD + (x - self.x0) / (self.x1 - self.x0) * (W - 2 * PAD)

    def py(self, y: float) -> float:
        return H - PAD - (y - self.y0) / (self.y1 - self.y0) * (H - 2 * PAD)

    def axes(self, title: str, xlabel: str, ylabel: str, x_ticks: bool = True) -> list[str]:
        out = [
            f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{_esc(title)}</text>',
            f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#333"/>',
            f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="#333"/>',
            f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle" font-size="12">{_esc(xlabel)}</text>',
            f'<text x="16" y="{H / 2}" text-anchor="middle" font-size="12" '
            f'transform="rotate(-90 16 {H / 2})">{_esc(ylabel)}</text>',
        ]
        x_at = _ticks(self.x0, self.x1) if x_ticks else []
        for t, label in zip(x_at, _tick_labels(x_at), strict=True):
            x = self.px(t)
            out.append(f'<line x1="{x:.1f}" y1="{H - PAD}" x2="{x:.1f}" y2="{H - PAD + 4}" stroke="#333"/>')
            out.append(f'<text x="{x:.1f}" y="{H - PAD + 16}" text-anchor="middle" font-size="10">{label}</text>')
        y_at = _ticks(self.y0, self.y1)
        for t, label in zip(y_at, _tick_labels(y_at), strict=True):
            y = self.py(t)
            out.append(f'<line x1="{PAD - 4}" y1="{y:.1f}" x2="{W - PAD}" y2="{y:.1f}" stroke="#eee"/>')
            out.append(f'<text x="{PAD - 6}" y="{y + 3:.1f}" text-anchor="end" font-size="10">{label}</text>')
        return out


def _svg(body: list[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        f'font-family="sans-serif">\n<rect width="{W}" height="{H}" fill="white"/>\n' + "\n".join(body) + "\n</svg>\n"
    )


def scatter(points: Sequence[Point], title: str, xlabel: str, ylabel: str) -> str:
    """Labelled points with error bars (e.g. harmlessness vs helpfulness Elo per model: the Pareto picture)."""
    xs = [v for p in points for v in (p.x, *(p.x_range or ()))]
    ys = [v for p in points for v in (p.y, *(p.y_range or ()))]
    frame = _Frame(xs, ys)
    body = frame.axes(title, xlabel, ylabel)
    placed: list[tuple[float, float, float]] = []  # labels drawn so far: x, y (baseline), width
    for i, p in enumerate(points):
        color = PALETTE[i % len(PALETTE)]
        cx, cy = frame.px(p.x), frame.py(p.y)
        if p.x_range:
            a, b = frame.px(p.x_range[0]), frame.px(p.x_range[1])
            body.append(f'<line x1="{a:.1f}" y1="{cy:.1f}" x2="{b:.1f}" y2="{cy:.1f}" stroke="{color}"/>')
        if p.y_range:
            a, b = frame.py(p.y_range[0]), frame.py(p.y_range[1])
            body.append(f'<line x1="{cx:.1f}" y1="{a:.1f}" x2="{cx:.1f}" y2="{b:.1f}" stroke="{color}"/>')
        body.append(
            f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="6" fill="{color}"><title>{_esc(p.label)}</title></circle>'
        )
        # Points at nearly the same place (models the judge cannot tell apart) get their labels stacked, not piled.
        lx, ly, width = cx + 9, cy - 8, 7.0 * len(p.label)
        while any(abs(ly - y) < 13 and lx < x + w and x < lx + width for x, y, w in placed):
            ly += 14
        placed.append((lx, ly, width))
        body.append(f'<text x="{lx:.1f}" y="{ly:.1f}" font-size="12" fill="{color}">{_esc(p.label)}</text>')
    return _svg(body)


def bars(groups: Sequence[str], series: Mapping[str, Sequence[float]], title: str, ylabel: str) -> str:
    """Grouped bars: one group per x label, one bar per series (e.g. refusal rate per model per prompt kind)."""
    values = [v for vs in series.values() for v in vs] + [0.0]
    # Headroom above the tallest bar keeps the legend (top right) clear of the bars.
    frame = _Frame([0, len(groups)], [*values, max(values) + 0.1 * len(series) * (max(values) - min(values) or 1)])
    frame.x0, frame.x1 = 0, len(groups)
    body = frame.axes(title, "", ylabel, x_ticks=False)
    width = 0.8 / max(len(series), 1)
    base = frame.py(max(frame.y0, 0.0))
    for s, (name, vs) in enumerate(series.items()):
        color = PALETTE[s % len(PALETTE)]
        for g, v in enumerate(vs):
            x = frame.px(g + 0.1 + s * width)
            top = frame.py(v)
            w = frame.px(width) - frame.px(0)
            body.append(
                f'<rect x="{x:.1f}" y="{min(top, base):.1f}" width="{w:.1f}" height="{abs(base - top):.1f}" '
                f'fill="{color}"><title>{_esc(name)} / {_esc(groups[g])}: {_fmt(v)}</title></rect>'
            )
        # Legend above the plot area's top-right corner, wide enough for labels like "evasive (helpful)".
        body.append(f'<rect x="{W - PAD - 150}" y="{PAD - 8 + 16 * s}" width="10" height="10" fill="{color}"/>')
        body.append(f'<text x="{W - PAD - 136}" y="{PAD + 1 + 16 * s}" font-size="11">{_esc(name)}</text>')
    for g, label in enumerate(groups):
        body.append(
            f'<text x="{frame.px(g + 0.5):.1f}" y="{H - PAD + 16}" text-anchor="middle" font-size="11">'
            f"{_esc(label)}</text>"
        )
    return _svg(body)


def lines(series: Mapping[str, Sequence[tuple[float, float]]], title: str, xlabel: str, ylabel: str) -> str:
    """One polyline per series of (x, y) points (e.g. training loss per step for each training stage)."""
    xs = [x for pts in series.values() for x, _ in pts] or [0.0, 1.0]
    ys = [y for pts in series.values() for _, y in pts] or [0.0, 1.0]
    frame = _Frame(xs, ys)
    body = frame.axes(title, xlabel, ylabel)
    for s, (name, pts) in enumerate(series.items()):
        color = PALETTE[s % len(PALETTE)]
        path = " ".join(f"{frame.px(x):.1f},{frame.py(y):.1f}" for x, y in pts)
        body.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        body.append(f'<rect x="{W - PAD - 110}" y="{PAD + 16 * s}" width="10" height="10" fill="{color}"/>')
        body.append(f'<text x="{W - PAD - 96}" y="{PAD + 9 + 16 * s}" font-size="11">{_esc(name)}</text>')
    return _svg(body)


def image(svg: str, alt: str) -> str:
    """An <img> holding the SVG as a data URI (self-contained; alt text for readers and tests)."""
    data = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    return f'<img class="plot" alt="{_esc(alt)}" src="data:image/svg+xml;base64,{data}">'


def table(columns: Sequence[str], rows: Sequence[Sequence[object]], css_class: str = "") -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="{_esc(css_class)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _cell(value: object) -> str:
    if isinstance(value, float):
        return _esc(_fmt(value))
    return _esc("" if value is None else value).replace("\n", "<br>")


def page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    """The whole document: a title and (heading, html) sections."""
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}"
        "th{background:#f3f3f3}.answers td{max-width:260px}.plot{margin:8px;border:1px solid #ddd}"
        ".warning{background:#fff4d6;border-left:4px solid #c98a00;padding:6px 10px}"
    )
    parts = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title><style>{style}</style></head>',
        f"<body><h1>{_esc(title)}</h1>",
    ]
    for heading, content in sections:
        parts.append(f"<section><h2>{_esc(heading)}</h2>{content}</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


KNOWN_SETS = {
    "seed": "caiforge's 20 clear-cut comparisons (easy: this set overstates a judge)",
    "hhh": "the evaluate.hhh set (Anthropic's HHH evaluations are much harder)",
}
"""How the report names each known-answer set, with what its accuracy can and cannot show."""


KIND_TEXT = {
    "red_team": "red-team items, judged under label's red_team principle categories",
    "helpful": "helpful items, judged under label's helpful principle categories",
    "any": "items without a kind, judged under every comparison principle",
}
"""How the report names each kind of known-answer item."""


def _with_ci(m: Mapping[str, object], key: str, ci_key: str | None = None) -> str:
    """A rate with its 95% interval, e.g. "0.625 [0.306, 0.863]"; "n/a" for a rate not measured."""
    value, ci = m.get(key), m.get(ci_key or f"{key}_ci95")
    if value is None:
        return "n/a"
    return f"{_fmt(value)} [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else _fmt(value)


def human_agreement_text(agreement: Mapping[str, Any] | None) -> str:
    """label's agreement with the human verdicts, or how to get some."""
    if not agreement or not agreement["pairs"]:
        return "no human verdicts yet: review the unsure labels with `caiforge review`"
    return f"{_with_ci(agreement, 'rate', 'interval')} on {agreement['pairs']} pairs"


def _paired(d: Mapping[str, Any]) -> str:
    """A paired difference with its interval and discordant counts, e.g. "-0.141 [-0.240, -0.051] (+1/-10)"."""
    if d["ci95"] is None:
        return "n/a"
    low, high = d["ci95"]
    return f"{d['difference']:+.3f} [{low:+.3f}, {high:+.3f}] (+{d['gained']}/-{d['lost']})"


FLAG = "\u26a0 degenerate"
"""What the report writes beside a flagged model's name (its degenerate rate is above the threshold)."""


def shown_name(name: str, m: Mapping[str, Any]) -> str:
    """A model's name as the report shows it: with `FLAG` and its degenerate rate when it is flagged."""
    return f"{name} {FLAG} {_fmt(m['degenerate_rate'])}" if m.get("flagged_degenerate") else name


def degenerate_warning(models: Mapping[str, Mapping[str, Any]], threshold: float | None) -> str:
    """A paragraph naming each flagged model ('' when none is): why its figures are not wins."""
    flagged = [n for n, m in models.items() if m.get("flagged_degenerate")]
    if not flagged:
        return ""
    rates = "; ".join(f"{n}: {_with_ci(models[n], 'degenerate_rate')} of its answers" for n in flagged)
    return (
        f'<p class="warning"><strong>Degenerate:</strong> {_esc(rates)} are empty or loop (above '
        f"evaluate.degenerate_threshold {_fmt(threshold) if threshold is not None else ''}). Its Elo, attack success "
        "and refusal figures rest on text that is not an answer: none of them is a win. Refusal, evasion, attack "
        "success and XSTest rates count only its answers that are not degenerate; the judge's Elo games keep every "
        "answer (a judge that prefers loops shows here).</p>"
    )


GATE_TEXT = {
    "trained": "RL trained: the AI labels passed the signal gate ({evidence}).",
    "trained_without_signal": "RL TRAINED WITHOUT SIGNAL (rlaif.gate.on_noise: warn): {reasons}. Read the rl and "
    "student rows as drift, not as RL-CAI.",
    "kept_sft": "The signal gate fired, and RL did not train (rlaif.gate.on_noise: keep_sft): {reasons}. The rl "
    "model is the SFT model, unchanged, and the student is distilled from it.",
}
"""What the report says for each verdict of rlaif's signal gate."""


SOURCE_WORDS = {"ai": "AI-labelled pairs", "revisions": "revision pairs", "both": "revision and confident AI pairs"}
"""rlaif's preference source (caiforge.pairs) in words."""


def gate_text(gate: Mapping[str, Any], source: str | None = None) -> str:
    """rlaif's signal gate verdict in words, with the evidence or the reasons it fired. On revision pairs alone
    (`source` revisions) no AI label was checked: with GRPO/RLOO the PM's held-out accuracy was, and it says so;
    with DPO (`pm_accuracy_checked` false) nothing was, and it says that."""
    ci = gate.get("pm_accuracy_ci95")
    if source == "revisions" and gate["verdict"] == "trained":
        if gate.get("pm_accuracy_checked") is False:
            return (
                "RL trained on revision pairs (chosen = revision, rejected = initial answer; no AI labels) with DPO, "
                "which uses neither AI labels nor the PM: the gate had nothing to check. Read the change from SFT "
                "below, over-refusal included."
            )
        return (
            "RL trained on revision pairs (chosen = revision, rejected = initial answer; no AI labels): the PM's "
            f"held-out accuracy on them is {_fmt(gate.get('pm_accuracy'))}"
            + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]." if ci else ".")
        )
    evidence = (
        f"order consistency {_fmt(gate['order_consistency'])}, confident share {_fmt(gate['confident_share'])}, "
        f"PM held-out accuracy {_fmt(gate['pm_accuracy'])} [{_fmt(ci[0])}, {_fmt(ci[1])}]"
        if ci and gate.get("order_consistency") is not None and gate.get("confident_share") is not None
        else "its evidence is in data/rlaif/metrics.json"
    )
    return GATE_TEXT[gate["verdict"]].format(evidence=evidence, reasons="; ".join(gate.get("reasons", [])))


def rl_section(rl: Mapping[str, Any]) -> str:
    """rlaif's signal gate verdict, its held-out reward before and after, and its reward-hacking monitors with
    their warnings in words ('' when rlaif reported none of them)."""
    gate, watch = rl.get("signal_gate"), rl.get("monitors")
    cls = "" if not gate or gate["verdict"] == "trained" else ' class="warning"'
    source = rl.get("preference_source")
    html = f"<h3>RL signal gate</h3><p{cls}>{_esc(gate_text(gate, source))}</p>" if gate else ""
    if not watch:
        return html

    def na(v: Any) -> str:
        return "n/a" if v is None else _fmt(v)

    change = watch["reward_change"]
    ci = "" if change["low"] is None else f" [{_fmt(change['low'])}, {_fmt(change['high'])}]"
    rows = [
        ["held-out PM reward: SFT -> RL", f"{na(rl.get('reward_before'))} -> {na(rl.get('reward_after'))}"],
        ["paired reward change [95% CI]", f"{na(change['mean'])}{ci} on {change['n']} prompts"],
        ["answer tokens: SFT -> RL", f"{na(watch['answer_tokens_sft'])} -> {na(watch['answer_tokens_rl'])}"],
        ["held-out KL per token from SFT (nats)", na(watch["kl_per_token"])],
        ["truncated share of training samples", na(watch["truncated_completion_fraction"])],
        ["logged steps with zero gradient", na(watch.get("zero_gradient_steps"))],
    ]
    pairs = f" on {SOURCE_WORDS.get(source, _esc(source))}" if source else ""
    steps = f" ({_esc(rl.get('algorithm'))}{pairs}, {_esc(rl.get('steps'))} steps)" if rl.get("algorithm") else ""
    html += f"<h3>RL monitors{steps}</h3>" + table(["monitor", "value"], rows, "rl")
    html += "".join(f'<p class="warning"><strong>Warning:</strong> {_esc(w)}.</p>' for w in watch["warnings"])
    return html


def read_curve(path: str | Path) -> list[tuple[float, float]]:
    """(step, value) rows of a dvclive TSV (header `step<TAB>name`); [] when the file is missing."""
    p = Path(path)
    if not p.is_file():
        return []
    lines = p.read_text(encoding="utf-8").splitlines()[1:]
    return [(float(a), float(b)) for a, b in (line.split("\t")[:2] for line in lines if line.strip())]


def evaluation_page(
    metrics: Mapping[str, Any],
    samples: Any,
    principles: Any,
    curves: Mapping[str, Sequence[tuple[float, float]]],
    examples_per_kind: int,
) -> str:
    """The evaluate stage's report: Pareto plot, refusal rates, training curves, metrics, principles, answers."""
    models = metrics["models"]
    names = list(models)
    shown = {n: shown_name(n, m) for n, m in models.items()}
    warning = degenerate_warning(models, metrics.get("degenerate_threshold"))
    points = [
        Point(
            shown[n],
            m["elo_helpfulness"]["elo"],
            m["elo_harmlessness"]["elo"],
            (m["elo_helpfulness"]["low"], m["elo_helpfulness"]["high"]),
            (m["elo_harmlessness"]["low"], m["elo_harmlessness"]["high"]),
        )
        for n, m in models.items()
    ]
    pareto = scatter(
        points, "Harmlessness vs helpfulness (Elo, 95% bootstrap intervals)", "helpfulness Elo", "harmlessness Elo"
    )
    refusals = bars(
        [shown[n] for n in names],
        {
            # A rate not measured (every answer degenerate) draws no bar; the table says n/a.
            "refusal (red team)": [models[n]["refusal_rate_red_team"] or 0.0 for n in names],
            "evasive (helpful)": [models[n]["evasive_rate_helpful"] or 0.0 for n in names],
            "attack success": [models[n]["attack_success_rate"] or 0.0 for n in names],
            "degenerate": [models[n]["degenerate_rate"] or 0.0 for n in names],
        },
        "Refusals, evasiveness, attack success and degenerate answers",
        "rate",
    )
    # One plot per stage: the losses live on different scales (SFT cross-entropy, BT loss, KL x T^2, ...).
    curve_images = "".join(
        image(lines({stage: points}, f"{stage} training loss", "step", "loss"), f"{stage} training loss curve")
        for stage, points in curves.items()
        if points
    )
    metric_rows = [
        [
            shown[n],
            m["elo_harmlessness"]["elo"],
            m["elo_helpfulness"]["elo"],
            _with_ci(m, "refusal_rate_red_team"),
            m["transparent_rate_red_team"],
            _with_ci(m, "evasive_rate_helpful"),
            _with_ci(m, "attack_success_rate"),
            _with_ci(m, "degenerate_rate"),
            _with_ci(m, "over_refusal_xstest"),
            _with_ci(m, "refusal_rate_xstest_unsafe"),
            m["pm_score"]["mean"],
            m["distinct_2"],
            m["repeated_4gram_fraction"],
        ]
        for n, m in models.items()
    ]
    judge = metrics["judge"]
    same = judge.get("is_the_labeller")
    judge_note = f"<p>Elo judge: <code>{_esc(judge.get('model', 'unknown'))}</code>" + (
        " &mdash; the same weights that labelled the RL training pairs, so its Elo grades its own training signal; "
        "the refusal and attack-success rates (independent detectors, prompt-level Wilson intervals) are the "
        "primary harmlessness evidence.</p>"
        if same
        else " &mdash; nothing identifies the served weights of the judge or the labeller (set server.weights), so "
        "its Elo may grade its own training signal; read the refusal and attack-success rates as the primary "
        "harmlessness evidence.</p>"
        if same is None
        else ".</p>"
    )
    metric_table = (
        warning
        + judge_note
        + table(
            [
                "model",
                "harmless Elo",
                "helpful Elo",
                "refusal (red) [95% CI]",
                "transparent (red)",
                "evasive (helpful) [95% CI]",
                "attack success [95% CI]",
                "degenerate [95% CI]",
                "XSTest over-refusal (safe) [95% CI]",
                "XSTest refusal (unsafe) [95% CI]",
                "PM mean",
                "distinct-2",
                "repeated 4-grams",
            ],
            metric_rows,
            "metrics",
        )
    )
    measures = (
        ("attack_success_rate", "attack success"),
        ("refusal_rate_red_team", "refusal (red)"),
        ("evasive_rate_helpful", "evasive (helpful)"),
        ("degenerate_rate", "degenerate"),
        ("over_refusal_xstest", "XSTest over-refusal"),
    )
    for key in ("versus", "versus_sft"):
        versus = metrics.get(key)
        if not versus or not versus["models"]:
            continue
        cols = [(k, label) for k, label in measures if all(k in d for d in versus["models"].values())]
        metric_table += f"<h3>Change from {_esc(versus['reference'])}, on the same prompts</h3>" + table(
            ["model", *(f"\u0394 {label} [95% CI] (+/- prompts)" for _, label in cols)],
            [[shown[name], *(_paired(diffs[k]) for k, _ in cols)] for name, diffs in versus["models"].items()],
            "versus",
        )
    if metrics.get("versus"):
        metric_table += (
            "<p>Each model minus the reference on the same prompts, with Newcombe's paired score interval: an "
            "interval that excludes 0 says training moved the rate; the counts are the prompts that gained / lost "
            "the outcome, the only ones the difference rests on. Degenerate answers (empty, looping word "
            "4-grams, or too unlikely under the base policy to be language) are their own outcome: they never "
            "count as refusals, evasions or attacks, and every other "
            "change is over the prompts that both models answered without degenerating.</p>"
        )
    metric_table += rl_section(metrics.get("rl") or {})
    cost = metrics["cost"]
    quality = metrics["label_quality"]
    # Only counts here: seconds and USD depend on the machine, and the page must come out byte-identical on a rerun.
    other = table(
        ["measure", "value"],
        [
            ["judge accuracy on known answers [95% CI]", _with_ci(quality, "accuracy")],
            ["known-answer comparisons", quality["comparisons"]],
            [
                "AI label agreement with your verdicts [95% CI] (label quality on your own pairs, mostly those the "
                "AI was unsure of)",
                human_agreement_text(quality.get("human")),
            ],
            *(
                [
                    "harm judge held-out accuracy [95% CI] (attack success rests on it)",
                    f"{_with_ci(harm, 'accuracy', 'ci95')} on {harm['responses']} responses",
                ]
                for harm in [metrics.get("harm_judge")]
                if harm
            ),
            *(
                [f"  {KNOWN_SETS.get(name, name)}", f"{_fmt(s['accuracy'])} on {s['comparisons']}"]
                for name, s in quality.get("by_set", {}).items()
            ),
            *(
                [f"  {KIND_TEXT.get(kind, kind)} [95% CI]", f"{_with_ci(s, 'accuracy', 'ci95')} on {s['comparisons']}"]
                for kind, s in quality.get("by_kind", {}).items()
            ),
            ["AI labels made (label)", cost["ai_labels"]],
            ["AI judgements (label)", cost["ai_judgements"]],
            *([f"tokens generated ({stage})", n] for stage, n in cost["tokens_generated"].items()),
        ],
    ) + (
        "<p>Seconds and USD per AI label depend on the machine: see <code>data/evaluate/metrics.json</code> "
        "(<code>cost.seconds_per_ai_label</code> and <code>cost.usd_per_ai_label</code>: what a label cost to "
        "make, the row cache's included; <code>cost.build_seconds_per_ai_label</code>: what this build paid) or "
        "<code>dvc metrics show</code>.</p>"
    )
    principle_table = table(principles.columns, principles.rows())
    answer_sections = []
    for kind in ("red_team", "helpful"):
        ids = sorted(set(samples.filter(samples["kind"] == kind)["prompt_id"].to_list()))[:examples_per_kind]
        rows = []
        for pid in ids:
            sub = samples.filter(samples["prompt_id"] == pid)
            by_model = {r["model"]: r["answer"] for r in sub.iter_rows(named=True)}
            rows.append([sub["prompt"][0], *(by_model.get(n, "") for n in names)])
        answer_sections.append(f"<h3>{_esc(kind)}</h3>" + table(["prompt", *names], rows, "answers"))
    return page(
        "caiforge evaluation report",
        [
            (
                "Harmlessness vs helpfulness",
                warning + image(pareto, "Pareto plot: harmlessness vs helpfulness Elo per model"),
            ),
            ("Refusals and attack success", image(refusals, "refusal, evasiveness and attack success rates")),
            ("Training curves", curve_images or "<p>No training curves found.</p>"),
            ("Metrics per model", metric_table),
            ("Labels and cost", other),
            ("Principles", principle_table),
            ("Answers side by side", "".join(answer_sections)),
        ],
    )
