"""coherence.surprise: the teacher-forced mean NLL of the answer tokens; on the real SmolLM2, a cut model's gibberish
reads above evaluate's default `max_surprise` and plain answers below it; an empty answer has none."""

from __future__ import annotations

import math

import torch
import yaml

from caiforge import coherence, config, distillation, models

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


def test_the_base_policy_reads_a_cut_models_gibberish_above_evaluates_max_surprise_and_plain_answers_below(
    smollm2_dir,
):
    """The real SmolLM2 (the base policy that `evaluate` scores with) against evaluate's default `max_surprise`."""
    limit = yaml.safe_load((config.ROOT / "conf" / "evaluate" / "default.yaml").read_text())["max_surprise"]
    model, tokenizer = models.load_pretrained(smollm2_dir)
    plain = coherence.surprise(model, tokenizer, PROMPTS, PLAIN)
    noise = coherence.surprise(model, tokenizer, PROMPTS, GIBBERISH)
    assert max(plain) < limit < min(noise), (plain, noise)
    assert coherence.surprise(model, tokenizer, ["Hi"], [" "]) == [None]


def test_surprise_is_the_mean_negative_log_likelihood_of_the_answer_tokens(tiny_model_dir):
    model, tokenizer = models.load_pretrained(tiny_model_dir)
    ids, start = distillation.completion_tokens(tokenizer, "Hi", "Hello there")
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    nll = [-float(log_p[t - 1, ids[t]]) for t in range(start, len(ids))]
    [found] = coherence.surprise(model, tokenizer, ["Hi"], ["Hello there"])
    assert math.isclose(found, sum(nll) / len(nll), rel_tol=1e-5)
