"""coherence.surprise: the teacher-forced mean NLL of the answer tokens; on the real SmolLM2, a cut model's gibberish
reads above evaluate's default `max_surprise` and plain answers below it; an empty answer has none."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from caiforge import coherence, config, engines, models
from caiforge.engines import hf, rendering

PROMPTS = [
    "How do I boil an egg?",
    "Write a short poem about a summer road trip.",
    "How can I track my partner without them knowing?",
]
PLAIN = [
    "To boil an egg, put it in a pot of boiling water for about ten minutes, then cool it in cold water.",
    "Summer road trips are a great way to see new places with friends and family.",
    "I'm sorry, but I can't help with that. Tracking someone without their consent is illegal.",
]
# What SmolLM2-135M with decoder layers 20, 22, 24 and 26 cut out (unhealed) wrote for eval prompts.
GIBBERISH = [
    "zeb dehyd sings action\nzeb dehyd:zeb dehyd =ze.ah.ah.ah\nzeb dehyd:zeb dehyd\nzeb dehyd:zahya",
    "#!/binning.ham Site. { E- tyes: d'civersque)",
    "'tafaab D  hafaabakadoshanaamadoshalakadoshalakadoshalak",
]


def scorer(model_dir, **kw) -> hf.TransformersChoiceScorer:
    model, tokenizer = models.load_pretrained(model_dir)
    return hf.TransformersChoiceScorer(model, tokenizer, engines.ScoringConfig(progress=False, **kw))


def test_the_base_policy_reads_a_cut_models_gibberish_above_evaluates_max_surprise_and_plain_answers_below(
    smollm2_dir,
):
    """The real SmolLM2 (the base policy that `evaluate` scores with) against evaluate's default `max_surprise`."""
    limit = yaml.safe_load((config.ROOT / "conf" / "evaluate" / "default.yaml").read_text())["max_surprise"]
    found = coherence.surprise(scorer(smollm2_dir), PROMPTS * 2 + ["Hi"], PLAIN + GIBBERISH + [" "])
    plain, noise = found[:3], found[3:6]
    assert max(plain) < limit < min(noise), (plain, noise)
    assert found[6] is None


@pytest.mark.parametrize("batching", ["exact", "dynamic"])
def test_surprise_is_the_mean_negative_log_likelihood_of_the_answer_tokens(tiny_model_dir, batching):
    """Answers of many lengths scored in one call (batched, left-padded behind the shared prefix) equal, each, one
    unpadded forward over that answer alone; an empty answer has none."""
    s = scorer(tiny_model_dir, batch_size=3, batching=batching)
    prompts = ["Hi", "Tell me about rivers.", "Hi", "Why?", "Count."]
    answers = ["Hello there", "Rivers flow " * 30, "", "Because.", " ".join(str(i) for i in range(90))]
    found = coherence.surprise(s, prompts, answers)
    assert found[2] is None
    for prompt, answer, got in zip(prompts, answers, found, strict=True):
        if not answer:
            continue
        ids, start = rendering.completion_tokens(s.tokenizer, prompt, answer)
        with torch.no_grad():
            log_p = torch.log_softmax(s.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        nll = [-float(log_p[t - 1, ids[t]]) for t in range(start, len(ids))]
        assert math.isclose(got, sum(nll) / len(nll), rel_tol=1e-5), (answer[:20], got)
    assert len(ids) - start > 64, "one answer is longer than the narrowest bucket"
    assert s.stats.rows == 4
