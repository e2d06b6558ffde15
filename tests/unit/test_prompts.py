"""Golden strings: the exact chats the critique/revision loop sends to the policy."""

from __future__ import annotations

from caiforge import models, prompts
from caiforge.constitution import CritiqueRevisionExample, CritiqueRevisionPrinciple

P = CritiqueRevisionPrinciple(id="p1", category="harmlessness", critique="Is it harmful?", revision="Fix it.")
EX = CritiqueRevisionExample(
    prompt="Ex prompt",
    response="Ex answer",
    critique_request="Ex crit req",
    critique="Ex crit",
    revision_request="Ex rev req",
    revision="Ex revision",
)


def roles(chat):
    return [(t["role"], t["content"]) for t in chat]


def test_answer_and_system():
    assert roles(prompts.answer("Hi")) == [("user", "Hi")]
    assert roles(prompts.answer("Hi", "Be kind.")) == [("system", "Be kind."), ("user", "Hi")]


def test_critique_with_few_shot():
    assert roles(prompts.critique("Q", "A", P, [EX])) == [
        ("user", "Ex prompt"),
        ("assistant", "Ex answer"),
        ("user", "Ex crit req"),
        ("assistant", "Ex crit"),
        ("user", "Ex rev req"),
        ("assistant", "Ex revision"),
        ("user", "Q"),
        ("assistant", "A"),
        ("user", "Is it harmful?"),
    ]


def test_revision_after_critique_and_revision_only():
    assert roles(prompts.revision("Q", "A", P, "It is harmful.", [])) == [
        ("user", "Q"),
        ("assistant", "A"),
        ("user", "Is it harmful?"),
        ("assistant", "It is harmful."),
        ("user", "Fix it."),
    ]
    assert roles(prompts.revision("Q", "A", P, None, [EX])) == [
        ("user", "Ex prompt"),
        ("assistant", "Ex answer"),
        ("user", "Ex rev req"),
        ("assistant", "Ex revision"),
        ("user", "Q"),
        ("assistant", "A"),
        ("user", "Fix it."),
    ]


def test_rendered_text_through_chat_template():
    _, tok = models.build_tiny(models.TinySpec(), seed=0)
    text = tok.apply_chat_template(
        prompts.revision("Q", "A", P, "Bad.", []), tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
        "<|im_start|>user\nIs it harmful?<|im_end|>\n<|im_start|>assistant\nBad.<|im_end|>\n"
        "<|im_start|>user\nFix it.<|im_end|>\n<|im_start|>assistant\n"
    )
