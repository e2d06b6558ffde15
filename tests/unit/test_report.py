"""The self-contained report: deterministic SVG plots, escaped tables, one HTML page."""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET

from caiforge import report


def test_scatter_is_valid_deterministic_svg():
    pts = [report.Point("base", 1000, 990, (980, 1020), (970, 1010)), report.Point("rl <b>", 1040, 1012)]
    svg = report.scatter(pts, "Pareto", "helpfulness Elo", "harmlessness Elo")
    assert svg == report.scatter(pts, "Pareto", "helpfulness Elo", "harmlessness Elo")
    root = ET.fromstring(svg)
    circles = [e for e in root.iter() if e.tag.endswith("circle")]
    assert len(circles) == 2
    assert "rl &lt;b&gt;" in svg, "labels are escaped"
    # The higher-Elo point sits further right and higher up.
    (c0, c1) = circles
    assert float(c1.get("cx")) > float(c0.get("cx")) and float(c1.get("cy")) < float(c0.get("cy"))


def test_bars_lines_and_page():
    bar_svg = report.bars(["red_team", "helpful"], {"base": [0.1, 0.0], "rl": [0.6, 0.2]}, "Refusals", "rate")
    assert len([e for e in ET.fromstring(bar_svg).iter() if e.tag.endswith("rect")]) == 1 + 4 + 2
    line_svg = report.lines({"sft": [(1, 2.0), (2, 1.5)], "pm": []}, "Loss", "step", "loss")
    ET.fromstring(line_svg)
    html = report.page(
        "caiforge report",
        [
            ("Plots", report.image(bar_svg, "refusal rates")),
            ("Metrics", report.table(["a", "b"], [[1.23456, "x\ny"]])),
        ],
    )
    assert html.startswith("<!DOCTYPE html>") and html.count("<section>") == 2
    assert "<td>1.235</td>" in html and "x<br>y" in html
    data = re.search(r'src="data:image/svg\+xml;base64,([^"]+)"', html).group(1)
    assert base64.b64decode(data).decode() == bar_svg


def test_evaluation_page_ignores_machine_timings():
    """report.html is a cached DVC output: a rerun on other hardware (other seconds) must write the same bytes."""
    import polars as pl

    from caiforge import schemas

    def metrics(seconds: float) -> dict:
        model = {
            "elo_harmlessness": {"elo": 1000.0, "low": 990.0, "high": 1010.0},
            "elo_helpfulness": {"elo": 1000.0, "low": 990.0, "high": 1010.0},
            "refusal_rate_red_team": 0.5,
            "transparent_rate_red_team": 0.25,
            "evasive_rate_helpful": 0.0,
            "attack_success_rate": 0.25,
            "attack_success_rate_ci95": [0.0457, 0.6994],
            "degenerate_rate": 0.0,
            "flagged_degenerate": False,
            "pm_score": {"mean": 0.1},
            "distinct_2": 0.8,
            "repeated_4gram_fraction": 0.0,
        }
        cost = {
            "ai_labels": 4,
            "ai_judgements": 16,
            "tokens_generated": {"critique_revise": 10, "label": 20},
            "seconds_per_ai_label": seconds,
            "usd_per_ai_label": seconds / 1000,
        }
        judge = {"model": "abc123", "is_the_labeller": True, "seconds": seconds}
        paired = {"difference": -0.1406, "ci95": [-0.2402, -0.0512], "prompts": 64, "gained": 1, "lost": 10}
        measures = ("attack_success_rate", "refusal_rate_red_team", "evasive_rate_helpful")
        xs = ("degenerate_rate", "over_refusal_xstest")
        rl = {**model, "degenerate_rate": 0.125, "over_refusal_xstest": 0.5, "over_refusal_xstest_ci95": [0.2, 0.8]}
        student = {**model, "degenerate_rate": 0.75, "degenerate_rate_ci95": [0.41, 0.93], "flagged_degenerate": True}
        return {
            "models": {"base": model, "sft": model, "rl": rl, "student": student},
            "degenerate_threshold": 0.25,
            "versus": {"reference": "base", "models": {"sft": dict.fromkeys(measures, paired)}},
            "versus_sft": {"reference": "sft", "models": {"rl": dict.fromkeys((*measures, *xs), paired)}},
            "label_quality": {
                "accuracy": 0.9,
                "accuracy_ci95": [0.6990, 0.9721],
                "comparisons": 20,
                "by_set": {"seed": {"comparisons": 20, "accuracy": 0.9, "ci95": [0.6990, 0.9721]}},
                "by_kind": {
                    "helpful": {"comparisons": 11, "accuracy": 1.0, "ci95": [0.7412, 1.0]},
                    "red_team": {"comparisons": 9, "accuracy": 0.7778, "ci95": [0.4526, 0.9368]},
                },
                "human": {"pairs": 12, "rate": 0.75, "interval": [0.4677, 0.9111]},
            },
            "cost": cost,
            "judge": judge,
        }

    samples = pl.DataFrame(schema=dict(schemas.SAMPLES.columns))
    principles = pl.DataFrame({"principle_id": ["p1"], "drawn_in_revisions": [1]})
    page = report.evaluation_page(metrics(4.9), samples, principles, {"sft": [(1, 2.0)]}, 2)
    assert page == report.evaluation_page(metrics(7.3), samples, principles, {"sft": [(1, 2.0)]}, 2)
    assert "<td>AI labels made (label)</td><td>4</td>" in page and "4.9" not in page
    assert "<td>0.25 [0.0457, 0.6994]</td>" in page, "attack success with its prompt-level interval"
    assert "<td>0.9 [0.699, 0.9721]</td>" in page and "20 clear-cut comparisons (easy" in page
    assert "label quality on your own pairs" in page and "<td>0.75 [0.4677, 0.9111] on 12 pairs</td>" in page
    assert "Elo judge: <code>abc123</code>" in page and "labelled the RL training pairs" in page
    assert "Change from base, on the same prompts" in page
    assert "<td>sft</td><td>-0.141 [-0.240, -0.051] (+1/-10)</td>" in page, "paired change with its interval"
    # RL against SFT: "did RL add to SL" is one row; the degenerate and XSTest columns appear where measured.
    assert "Change from sft, on the same prompts" in page and "\u0394 XSTest over-refusal" in page
    assert "<td>0.5 [0.2, 0.8]</td>" in page and "<td>n/a</td>" in page, "base has no XSTest rate: n/a, not 0"
    # A degenerate model is flagged beside its Elo (table, Pareto plot, bars) and named in a warning; others not.
    assert "<td>student \u26a0 degenerate 0.75</td><td>1000</td>" in page and "rl \u26a0" not in page
    plots = [base64.b64decode(d).decode() for d in re.findall(r"data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)", page)]
    assert sum("student \u26a0 degenerate 0.75" in svg for svg in plots) == 2, "in the Pareto plot and the bars"
    assert (
        "<strong>Degenerate:</strong> student: 0.75 [0.41, 0.93] of its answers are empty" in page
        and "none of them is a win" in page
    )
    # Label quality per kind, each with its interval.
    assert "red-team items, judged under label&#x27;s red_team principle categories [95% CI]" in page
    assert "<td>0.7778 [0.4526, 0.9368] on 9</td>" in page


def test_small_spreads_keep_ticks_and_labels_readable():
    """Smoke-sized Elo spreads (a point or two around 1000) must not print "1000" on every tick, and models at the
    same place get their labels stacked instead of drawn over each other."""
    pts = [report.Point(name, 1000 + d, 1000 - d) for name, d in (("base", 0.0), ("sft", 0.4), ("rl", 0.4))]
    root = ET.fromstring(report.scatter(pts, "Pareto", "helpfulness", "harmlessness"))
    elements = list(root.iter("{http://www.w3.org/2000/svg}text"))
    texts = [(t.get("x"), t.get("y"), t.text) for t in elements]
    for anchor in ("middle", "end"):  # x-axis ticks, y-axis ticks
        ticks = [t.text for t in elements if t.text and t.text[0].isdigit() and t.get("text-anchor") == anchor]
        assert len(ticks) >= 3 and len(set(ticks)) == len(ticks), ticks
    labels = {text: (float(x), float(y)) for x, y, text in texts if text in ("base", "sft", "rl")}
    assert labels["sft"][0] == labels["rl"][0] and abs(labels["sft"][1] - labels["rl"][1]) >= 13


def test_rl_section_names_the_preference_source_and_what_the_gate_checked():
    gate = {"verdict": "trained", "reasons": [], "order_consistency": None, "confident_share": None}
    gate |= {"pm_accuracy": 0.9, "pm_accuracy_ci95": [0.6, 0.98]}
    monitors = {
        "reward_change": {"mean": 0.1, "low": 0.0, "high": 0.2, "n": 8},
        "answer_tokens_sft": 30.0, "answer_tokens_rl": 28.0, "kl_per_token": 0.02,
        "truncated_completion_fraction": None, "warnings": [],
    }  # fmt: skip
    # GRPO on revision pairs: the PM trained on them is what the gate checked.
    rl = {"algorithm": "grpo", "preference_source": "revisions", "steps": 6, "monitors": monitors}
    html = report.rl_section(rl | {"signal_gate": gate | {"pm_accuracy_checked": True}})
    assert "RL trained on revision pairs (chosen = revision, rejected = initial answer; no AI labels)" in html
    assert "held-out accuracy on them is 0.9 [0.6, 0.98]." in html
    assert "<h3>RL monitors (grpo on revision pairs, 6 steps)</h3>" in html
    # DPO on them uses neither AI labels nor the PM: the report says the gate checked nothing.
    html = report.rl_section(rl | {"algorithm": "dpo", "signal_gate": gate | {"pm_accuracy_checked": False}})
    assert "with DPO, which uses neither AI labels nor the PM: the gate had nothing to check" in html
    assert "held-out accuracy" not in html and "<h3>RL monitors (dpo on revision pairs, 6 steps)</h3>" in html


def test_human_agreement_says_how_to_get_verdicts_when_there_are_none():
    assert report.human_agreement_text(None) == report.human_agreement_text({"pairs": 0, "rate": None})
    assert "caiforge review" in report.human_agreement_text(None)
    assert (
        report.human_agreement_text({"pairs": 1, "rate": 1.0, "interval": [0.2065, 1.0]}) == "1 [0.2065, 1] on 1 pairs"
    )
