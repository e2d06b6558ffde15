"""Choice scoring on a tiny local model: option tokens, fast and sequence paths, batching, order."""

from __future__ import annotations

import pytest
import torch

from caiforge import engines, models
from caiforge.engines import hf, rendering

CONVS = [[{"role": "user", "content": "Which is better? " + "x " * n}] for n in (1, 9, 3, 17, 5)]
PREFILL = "The answer is: ("


@pytest.fixture(scope="module")
def tiny():
    return models.build_tiny(models.TinySpec(), seed=0)


def scorer(tiny, **kw) -> hf.TransformersChoiceScorer:
    return hf.TransformersChoiceScorer(*tiny, engines.ScoringConfig(**{"batch_size": 2, "progress": False, **kw}))


def manual(tiny, text: str, option: str) -> float:
    """log P(option | text) from one unpadded forward over text + option (the reference)."""
    model, tok = tiny
    ctx = tok(text, add_special_tokens=False)["input_ids"]
    full = tok(text + option, add_special_tokens=False)["input_ids"]
    assert full[: len(ctx)] == ctx, "the reference assumes the option does not merge with the text"
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(torch.tensor([full])).logits.float(), -1)[0]
    return sum(float(logprobs[t - 1, full[t]]) for t in range(len(ctx), len(full)))


def test_option_tokens_as_the_model_would_emit_them(tiny):
    _, tok = tiny
    text = scorer(tiny).render(CONVS[0], PREFILL)
    plan = rendering.plan_options(tok, text, ("A", "B"))
    assert plan.single_token
    assert tok.decode(list(plan.context)) == text
    assert [tok.decode(list(c)) for c in plan.continuations] == ["A", "B"]
    # When the prompt stops before the "(", the shared " (" joins the context and the letters stay single tokens.
    plan = rendering.plan_options(tok, "The answer is:", (" (A", " (B"))
    assert plan.single_token and tok.decode(list(plan.context)) == "The answer is: ("


def test_merged_option_token_moves_the_context_back():
    """A tokenizer with "(A" as one token: the context loses its "(" and the merged tokens are the options."""
    tok = models.build_tiny_tokenizer(512)
    tok.add_tokens(["(A", "(B"])
    plan = rendering.plan_options(tok, PREFILL, ("A", "B"))
    conts = [tok.convert_ids_to_tokens(list(c)) for c in plan.continuations]
    assert [c[-1] for c in conts] == ["(A", "(B"]
    for opt, cont in zip("AB", plan.continuations, strict=True):
        assert tok.decode(list(plan.context) + list(cont)) == PREFILL + opt


def test_option_tokens_are_planned_once_per_prompt_tail(tiny):
    """Questions that differ before the chat template's last special token share one plan, and it is the plan of
    each whole prompt; a prompt without special tokens is planned whole, and a merging tail is still refused."""
    _, tok = tiny
    s = scorer(tiny)
    planner = rendering.OptionTokens(tok, ("A", "B"))
    texts = [s.render([{"role": "user", "content": f"question {i} " * (i + 1)}], PREFILL) for i in range(40)]
    for text in texts:
        whole = rendering.plan_options(tok, text, ("A", "B"))
        assert planner.single(text) == whole.continuations
    assert planner.planned == 1 and len(planner.plans) == 1
    bare = "no template here ("
    assert planner.single(bare) == rendering.plan_options(tok, bare, "AB").continuations
    assert planner.planned == 2 and len(planner.plans) == 1, "a prompt without special tokens is not memoized"
    # " (" is one token after the prompt, but " " then "(A" with an option: the server would read the next token
    # after " (", not the option tokens; context tokens of the same count must not pass for the prompt's own.
    merging = models.build_tiny_tokenizer(512)
    merging.add_tokens(["(A", "(B"])
    merging.chat_template = tok.chat_template
    with pytest.raises(ValueError, match="not single tokens right after the prompt"):
        rendering.OptionTokens(merging, ("A", "B")).single(texts[0])


def test_logprobs_match_an_unpadded_forward_and_batching(tiny):
    s = scorer(tiny)
    got = s.choice_logprobs(CONVS, [PREFILL] * len(CONVS))
    for conv, (la, lb) in zip(CONVS, got, strict=True):
        text = s.render(conv, PREFILL)
        assert la == pytest.approx(manual(tiny, text, "A"), abs=1e-4)
        assert lb == pytest.approx(manual(tiny, text, "B"), abs=1e-4)
    single = [scorer(tiny, batch_size=1).choice_logprobs([c], [PREFILL])[0] for c in CONVS]
    assert [v for row in got for v in row] == pytest.approx([v for row in single for v in row], abs=1e-4)
    assert s.choice_logprobs(CONVS, [PREFILL] * len(CONVS)) == got, "deterministic"
    assert s.stats.rows == 2 * len(CONVS)


def test_multi_token_options_are_scored_as_sequences(tiny):
    s = scorer(tiny)
    options = ("A) first answer", "B) second one")
    (got,) = s.choice_logprobs(CONVS[:1], [PREFILL], options)
    text = s.render(CONVS[0], PREFILL)
    assert not rendering.plan_options(s.tokenizer, text, options).single_token
    assert got == pytest.approx(tuple(manual(tiny, text, o) for o in options), abs=1e-4)


def test_bad_inputs():
    tok = models.build_tiny_tokenizer(512)
    with pytest.raises(ValueError, match="distinct"):
        rendering.plan_options(tok, "x", ("A", "A"))
    with pytest.raises(ValueError, match="batch_size"):
        engines.ScoringConfig(batch_size=0)


def test_prefix_reuse_equals_the_full_forward(tiny):
    """Questions behind a long shared prefix (few-shot demos): the prefix's KV cache computed once gives the same
    log-probs as running every question in full."""
    demos = [{"role": "user", "content": "demo question " * 6}, {"role": "assistant", "content": "(A)"}]
    convs = [[*demos, *c] for c in CONVS]
    reused = scorer(tiny)
    got = reused.choice_logprobs(convs, [PREFILL] * len(convs))
    full = scorer(tiny, prefix_reuse=False)
    want = full.choice_logprobs(convs, [PREFILL] * len(convs))
    assert reused.stats.prefix_tokens_reused > 20 * (len(convs) - 1)
    assert full.stats.prefix_tokens_reused == 0
    assert [v for row in got for v in row] == pytest.approx([v for row in want for v in row], abs=1e-4)
    for conv, (la, _) in zip(convs, got, strict=True):
        assert la == pytest.approx(manual(tiny, reused.render(conv, PREFILL), "A"), abs=1e-4)


def test_scoring_widths_are_quarter_octaves_with_a_padding_column():
    widths = [hf.suffix_width(n, hf.SCORE_STEPS) for n in range(0, 2000)]
    assert sorted(set(widths))[:9] == [64, 80, 96, 112, 128, 160, 192, 224, 256]
    for n, w in enumerate(widths):
        assert w >= n + 1, "room for one padding column, so the attention mask is never dropped"
        assert n < 64 or w <= 1.25 * (n + 1), "at most a quarter of padding above the minimum width"
    # Generation keeps powers of two: each width is a batch of its own, and its filler rows decode to the end.
    assert {hf.suffix_width(n) for n in range(0, 1000)} == {64, 128, 256, 512, 1024}
