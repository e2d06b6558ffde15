"""caiforge.preference: the soft-label BT loss, calibration metrics, scoring and the KL estimate."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from caiforge import preference


def test_soft_loss_matches_hand_computation():
    rc, rr, p = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([0.75, 0.5])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    by_hand = (
        -(0.75 * math.log(sig(1.0)) + 0.25 * math.log(sig(-1.0)))
        - (0.5 * math.log(sig(-2.0)) + 0.5 * math.log(sig(2.0)))
    ) / 2
    assert preference.soft_bt_loss(rc, rr, p).item() == pytest.approx(by_hand, rel=1e-6)


def test_soft_loss_reduces_to_hard_loss_at_p_one():
    gen = torch.Generator().manual_seed(0)
    rc, rr = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    hard = -F.logsigmoid(rc - rr).mean()  # TRL RewardTrainer's stock loss
    assert torch.allclose(preference.soft_bt_loss(rc, rr, torch.ones(16)), hard)


def test_soft_loss_is_minimized_at_the_label():
    # d/dd of the loss is sigma(d) - p: zero when the PM's probability equals the soft label.
    d = torch.tensor([math.log(0.8 / 0.2)], requires_grad=True)
    preference.soft_bt_loss(d, torch.zeros(1), torch.tensor([0.8])).backward()
    assert d.grad.abs().item() < 1e-6


def test_accuracy_skips_ties_in_the_label():
    assert preference.accuracy([1.0, 0.0, 5.0], [0.0, 1.0, 0.0], [0.9, 0.6, 0.5]) == 0.5
    assert preference.accuracy([1.0], [0.0], [0.5]) is None


def test_expected_calibration_error():
    assert preference.expected_calibration_error([0.7, 0.7], [0.7, 0.7]) == pytest.approx(0.0)
    # Two bins: {0.55, 0.65} vs targets {0.5, 1.0} -> |0.6 - 0.75| * 1; {0.95} vs {0.95} -> 0.
    ece = preference.expected_calibration_error([0.55, 0.65, 0.95], [0.5, 1.0, 0.95], bins=2)
    assert ece == pytest.approx(2 / 3 * 0.15)
    assert preference.expected_calibration_error([], []) is None
    assert preference.expected_calibration_error([1.0], [1.0], bins=10) == pytest.approx(0.0)


def test_evaluate_pairs_empty_is_null():
    assert preference.evaluate_pairs([], [], []) == {
        "loss": None,
        "accuracy": None,
        "accuracy_ci95": None,
        "accuracy_pairs": 0,
        "ece": None,
        "mean_margin": None,
    }


def test_encode_chat_keeps_the_end(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = preference.chat("a question " * 50, "the answer")
    full = preference.encode_chat(tok, messages, 10_000)
    assert preference.encode_chat(tok, messages, 8) == full[-8:]


@pytest.fixture(scope="module")
def tiny_pm(tiny_model_dir):
    model, tokenizer = preference.init_from_causal_lm(tiny_model_dir, seed=0)
    return preference.PreferenceModel(model, tokenizer, max_length=64, batch_size=2)


def test_scores_do_not_depend_on_batching(tiny_pm, tiny_model_dir):
    prompts = ["hi", "how do I bake bread?", "tell me a joke about cats please"]
    responses = ["hello", "mix flour and water", "no"]
    batched = tiny_pm.score(prompts, responses)
    single = [tiny_pm.score([p], [r])[0] for p, r in zip(prompts, responses, strict=True)]
    assert batched == pytest.approx(single, abs=1e-5)
    again, _ = preference.init_from_causal_lm(tiny_model_dir, seed=0)
    assert torch.equal(again.score.weight, tiny_pm.model.score.weight), "the new head is seeded"


def test_reward_function_scores_conversational_completions(tiny_pm):
    reward = preference.reward_function(tiny_pm)
    prompts = [[{"role": "user", "content": "hi"}]] * 2
    completions = [[{"role": "assistant", "content": "hello"}], [{"role": "assistant", "content": "go away"}]]
    assert reward(prompts=prompts, completions=completions, trainer_state=None) == tiny_pm.score(
        ["hi", "hi"], ["hello", "go away"]
    )
    with pytest.raises(TypeError, match="conversational"):
        reward(prompts=["hi"], completions=["hello"])


def test_sampled_kl_is_zero_against_itself_and_reads_the_sampled_ids(tiny_model_dir):
    from caiforge import models

    model, tokenizer = models.load_pretrained(tiny_model_dir)
    kl = preference.sampled_kl(model, model, tokenizer, ["hi there", "tell me more"], seed=0, max_new_tokens=6)
    assert kl["kl_per_token"] == pytest.approx(0.0) and kl["kl_per_sequence"] == pytest.approx(0.0)
    assert 2 <= kl["tokens"] <= 12 and 0 <= kl["truncated"] <= 1
    again = preference.sampled_kl(model, model, tokenizer, ["hi there", "tell me more"], seed=0, max_new_tokens=6)
    assert again == kl, "seeded per prompt: the same samples"


def test_sampled_kl_is_an_unbiased_estimate_of_the_true_kl(tiny_model_dir):
    """One-token answers: the exact KL of the first-token distributions is computable, and the estimate must land
    on it. A KL read on greedy answers (the old estimate) is log p/q at the argmax, a different number."""
    from caiforge import models
    from caiforge.engines.rendering import encode, render_chat

    policy, tokenizer = models.load_pretrained(tiny_model_dir)
    reference, _ = models.build_tiny(models.TinySpec(), seed=1)
    reference.eval()
    prompt = "hi there"
    head = encode(tokenizer, render_chat(tokenizer, [{"role": "user", "content": prompt}]))
    with torch.inference_mode():
        p = torch.log_softmax(policy(input_ids=torch.tensor([head])).logits[0, -1].float(), -1)
        q = torch.log_softmax(reference(input_ids=torch.tensor([head])).logits[0, -1].float(), -1)
    exact = float((p.exp() * (p - q)).sum())
    log_ratio = p - q
    spread = float((p.exp() * (log_ratio - exact) ** 2).sum().sqrt())
    n = 300
    estimates = [
        preference.sampled_kl(policy, reference, tokenizer, [prompt], seed=s, max_new_tokens=1)["kl_per_sequence"]
        for s in range(n)
    ]
    mean = sum(estimates) / n
    assert abs(mean - exact) < 4 * spread / n**0.5 + 1e-6, (mean, exact)
    greedy = float(log_ratio[int(p.argmax())])
    assert abs(greedy - exact) > 4 * spread / n**0.5, "the test can tell the estimators apart"


def test_sampled_kl_scores_the_sampled_ids_not_their_retokenised_text(tiny_model_dir, monkeypatch):
    """A sample whose ids do not survive decode + encode ("t", "h" re-encodes as "th"): the KL must be read on the
    ids the policy drew, end token included."""
    from caiforge import models
    from caiforge.engines import hf
    from caiforge.engines.rendering import encode, stop_token_ids

    model, tokenizer = models.load_pretrained(tiny_model_dir)
    vocab = tokenizer.get_vocab()
    merged = next(t for t in sorted(vocab) if len(t) == 2 and t.isalpha() and t[0] in vocab and t[1] in vocab)
    drawn = [vocab[merged[0]], vocab[merged[1]], stop_token_ids(tokenizer)[0]]  # two pieces of one merged token
    assert encode(tokenizer, tokenizer.decode(drawn[:2])) != drawn[:2], "the sample must not round-trip"
    head = [1, 2, 3]
    monkeypatch.setattr(hf.TransformersGenerator, "sample_ids", lambda self, convs, seed: [(head, drawn)])
    scored = []
    real = preference._token_logprobs

    def spy(model_, ids, start):
        scored.append((list(ids), start))
        return real(model_, ids, start)

    monkeypatch.setattr(preference, "_token_logprobs", spy)
    kl = preference.sampled_kl(model, model, tokenizer, ["hi"], seed=0, max_new_tokens=3)
    assert scored == [(head + drawn, len(head))] * 2, "policy and reference both read the drawn ids"
    assert kl["tokens"] == 3 and kl["truncated"] == 0.0
