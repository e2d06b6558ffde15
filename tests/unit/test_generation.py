"""The generation engine on a tiny local model: order, grouping, stopping, reproducibility."""

from __future__ import annotations

import random

import pytest
import torch

from caiforge import generation, models

CONVS = [[{"role": "user", "content": "hi " * n}] for n in (1, 9, 3, 17, 5, 2, 11)]


@pytest.fixture(scope="module")
def tiny():
    return models.build_tiny(models.TinySpec(), seed=0)


def engine(tiny, **kw) -> generation.TransformersGenerator:
    cfg = generation.GenerationConfig(**{"batch_size": 3, "max_new_tokens": 12, "progress": False, **kw})
    return generation.TransformersGenerator(*tiny, cfg)


def test_batched_equals_one_by_one_greedy(tiny):
    """Length grouping and left padding must not change greedy outputs, nor their order."""
    batched = engine(tiny).chat(CONVS, seed=0)
    single = [engine(tiny, batch_size=1).chat([c], seed=0)[0] for c in CONVS]
    assert [c.text for c in batched] == [c.text for c in single]
    assert [c.prompt_tokens for c in batched] == [len(engine(tiny).render(c)) for c in CONVS]


def test_sampling_is_reproducible_and_seeded(tiny):
    g = engine(tiny, temperature=1.0, top_p=0.95)
    state = torch.random.get_rng_state()
    py_state = random.getstate()
    a, b, c = g.chat(CONVS, seed=1), g.chat(CONVS, seed=1), g.chat(CONVS, seed=2)
    assert a == b
    assert a != c
    assert torch.equal(torch.random.get_rng_state(), state), "global torch RNG must be untouched"
    assert random.getstate() == py_state


def test_stops_at_end_token_and_counts(tiny):
    model, tok = tiny
    end = tok.convert_tokens_to_ids("<|im_end|>")
    g = engine(tiny, max_new_tokens=8)
    assert end in g.stop_ids and tok.eos_token_id in g.stop_ids
    # Force the end token after 3 generated tokens by biasing the LM head through a hook.
    step = {"n": 0}

    def force_end(_module, _inputs, output):
        step["n"] += 1
        if step["n"] >= 4:
            output[..., :] = -1e4
            output[..., end] = 1e4
        return output

    handle = model.lm_head.register_forward_hook(force_end)
    try:
        (out,) = g.chat(CONVS[:1], seed=0)
    finally:
        handle.remove()
    assert out.finished
    assert out.completion_tokens == 4, "3 tokens + the end token"
    assert "<|im_end|>" not in out.text
    (cap,) = engine(tiny, max_new_tokens=5).chat(CONVS[:1], seed=0)
    assert cap.completion_tokens <= 5
    assert cap.finished or cap.completion_tokens == 5


def test_stats_and_config_validation(tiny):
    g = engine(tiny)
    outs = g.chat(CONVS, seed=0)
    assert g.stats.rows == len(CONVS)
    assert g.stats.completion_tokens == sum(o.completion_tokens for o in outs)
    with pytest.raises(ValueError, match="top_p"):
        generation.GenerationConfig(top_p=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        generation.GenerationConfig(batch_size=0)
