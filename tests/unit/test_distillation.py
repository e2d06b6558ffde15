"""Depth pruning, the logit-KL objective and the agreement metric."""

from __future__ import annotations

import math

import pytest
import torch

from caiforge import distillation, models
from caiforge.engines import rendering


@pytest.fixture(scope="module")
def teacher():
    model, tokenizer = models.build_tiny(
        models.TinySpec(num_hidden_layers=5, hidden_size=32, intermediate_size=64), seed=3
    )
    return model.eval(), tokenizer


def test_kept_layers():
    assert distillation.kept_layers(30, 3) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]
    assert distillation.kept_layers(2, 2) == [0]
    assert distillation.kept_layers(5, 2) == [0, 2, 4]
    with pytest.raises(ValueError, match="prune_every"):
        distillation.kept_layers(4, 0)


def test_pruned_student_copies_the_kept_layers(teacher):
    model, _ = teacher
    before = {k: v.clone() for k, v in model.state_dict().items()}
    student, kept = distillation.prune_layers(model, 2)
    assert kept == [0, 2, 4]
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    assert model.config.num_hidden_layers == 5, "the teacher's config must not change"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the teacher must not change"
    teacher_state, student_state = model.state_dict(), student.state_dict()
    for new, old in enumerate(kept):
        prefix_new, prefix_old = f"model.layers.{new}.", f"model.layers.{old}."
        keys = [k for k in student_state if k.startswith(prefix_new)]
        assert keys
        for key in keys:
            assert torch.equal(student_state[key], teacher_state[prefix_old + key[len(prefix_new) :]]), key
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(student_state[key], teacher_state[key])
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2], "KV-cache slots renumbered"
    assert models.parameter_count(student) < models.parameter_count(model)
    # The copy is independent: training the student cannot move the teacher.
    with torch.no_grad():
        student.model.embed_tokens.weight.add_(1.0)
    assert torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])


def test_prune_keep_names_the_layers_kept(teacher):
    model, _ = teacher
    student, kept = distillation.prune_layers(model, 2, keep=[3, 0, 1, 2])
    assert kept == [0, 1, 2, 3] and student.config.num_hidden_layers == 4, "all but the last of 5 layers"
    assert torch.equal(student.state_dict()["model.layers.3.mlp.up_proj.weight"],
                       model.state_dict()["model.layers.3.mlp.up_proj.weight"])  # fmt: skip
    for bad in ([], [0, 5], list(range(5))):
        with pytest.raises(ValueError, match="prune_keep"):
            distillation.prune_layers(model, 2, keep=bad)


def test_pruned_student_runs_and_generates(teacher):
    model, tokenizer = teacher
    student, _ = distillation.prune_layers(model, 3)
    ids = torch.tensor([tokenizer("hello world")["input_ids"]])
    assert student(input_ids=ids).logits.shape == model(input_ids=ids).logits.shape
    out = student.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 3


def test_keeping_every_layer_reproduces_the_teacher(teacher):
    model, tokenizer = teacher
    copy, kept = distillation.prune_layers(model, 1)
    assert kept == list(range(5))
    ids = torch.tensor([tokenizer("the assistant answers")["input_ids"]])
    assert torch.allclose(copy(input_ids=ids).logits, model(input_ids=ids).logits)


def test_kl_is_zero_for_identical_logits():
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(distillation.forward_kl(logits, logits.clone(), 2.0), torch.zeros(2, 3), atol=1e-6)
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert float(distillation.distillation_loss(logits, logits, mask, 1.5)) == pytest.approx(0, abs=1e-6)


def test_kl_matches_a_hand_computation():
    p, q = [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]
    teacher, student = torch.tensor([[math.log(x) for x in p]]), torch.tensor([[math.log(x) for x in q]])
    expected = sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))
    assert float(distillation.forward_kl(teacher, student)[0]) == pytest.approx(expected, rel=1e-5)
    reverse = sum(b * math.log(b / a) for a, b in zip(p, q, strict=True))
    assert float(distillation.forward_kl(student, teacher)[0]) == pytest.approx(reverse, rel=1e-5)
    assert expected != pytest.approx(reverse), "forward, not reverse, KL"
    # Temperature 2 on logits log(p) gives p^(1/2), renormalized; the loss is scaled by T^2 = 4.
    ps, qs = [math.sqrt(x) for x in p], [math.sqrt(x) for x in q]
    ps, qs = [x / sum(ps) for x in ps], [x / sum(qs) for x in qs]
    soft = sum(a * math.log(a / b) for a, b in zip(ps, qs, strict=True))
    loss = distillation.distillation_loss(teacher[None], student[None], torch.tensor([[True]]), 2.0)
    assert float(loss) == pytest.approx(4 * soft, rel=1e-5)


def test_loss_averages_only_masked_positions():
    teacher = torch.zeros(1, 3, 4)
    student = torch.zeros(1, 3, 4)
    student[0, 1] = torch.tensor([5.0, 0, 0, 0])  # differs only at position 1
    masked_out = distillation.distillation_loss(teacher, student, torch.tensor([[True, False, True]]))
    assert float(masked_out) == pytest.approx(0, abs=1e-7)
    only = distillation.distillation_loss(teacher, student, torch.tensor([[False, True, False]]))
    assert float(only) == pytest.approx(float(distillation.forward_kl(teacher[0, 1], student[0, 1])))
    assert float(distillation.distillation_loss(teacher, student, torch.zeros(1, 3, dtype=torch.bool))) == 0


def test_agreement_of_a_model_with_itself_is_perfect(teacher):
    model, tokenizer = teacher
    prompts, answers = ["How do I bake bread?", "Tell me a joke."], ["Mix flour and water.", "No."]
    same = distillation.agreement(model, model, tokenizer, prompts, answers)
    assert same["top1_agreement"] == 1.0 and same["kl_per_token"] == pytest.approx(0, abs=1e-6)
    assert same["tokens"] == sum(
        len(rendering.completion_tokens(tokenizer, p, a)[0]) - rendering.completion_tokens(tokenizer, p, a)[1]
        for p, a in zip(prompts, answers, strict=True)
    )
    pruned, _ = distillation.prune_layers(model, 2)
    other = distillation.agreement(pruned, model, tokenizer, prompts, answers)
    assert other["tokens"] == same["tokens"] and other["kl_per_token"] > 0
    assert distillation.agreement(model, model, tokenizer, [], [])["top1_agreement"] is None


def test_different_vocabularies_are_rejected(teacher):
    _, tokenizer = teacher
    other = models.build_tiny_tokenizer(300)
    with pytest.raises(ValueError, match="student.*tokenizer differs"):
        distillation.check_same_vocabulary(tokenizer, other, "data/models/student")
    distillation.check_same_vocabulary(tokenizer, models.build_tiny_tokenizer(512), "same")
