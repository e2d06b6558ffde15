"""Pure rendering of the chat turns that the critique/revision loop sends to the policy.

The constitution's few-shot dialogues go in front as earlier turns of the same chat, each one a complete
prompt -> response -> critique request -> critique -> revision request -> revision exchange; then the real
prompt, the response under review and the request. Everything here is a pure function of its arguments, so
golden-string tests pin the exact prompts a model sees.
"""

from __future__ import annotations

from collections.abc import Sequence

from caiforge.constitution import CritiqueRevisionExample, CritiqueRevisionPrinciple
from caiforge.engines import Message


def _turn(role: str, content: str) -> Message:
    return {"role": role, "content": content}


def answer(prompt: str, system: str | None = None) -> list[Message]:
    """The policy's first (helpful-only) answer to a prompt."""
    head = [_turn("system", system)] if system else []
    return [*head, _turn("user", prompt)]


def few_shot_turns(examples: Sequence[CritiqueRevisionExample], *, with_critique: bool = True) -> list[Message]:
    """Few-shot dialogues as earlier chat turns (without the critique exchange in revision-only mode)."""
    turns: list[Message] = []
    for ex in examples:
        turns += [_turn("user", ex.prompt), _turn("assistant", ex.response)]
        if with_critique:
            turns += [_turn("user", ex.critique_request), _turn("assistant", ex.critique)]
        turns += [_turn("user", ex.revision_request), _turn("assistant", ex.revision)]
    return turns


def critique(
    prompt: str,
    response: str,
    principle: CritiqueRevisionPrinciple,
    examples: Sequence[CritiqueRevisionExample] = (),
    system: str | None = None,
) -> list[Message]:
    """Ask the model to critique `response` to `prompt` against `principle`."""
    head = [_turn("system", system)] if system else []
    return [
        *head,
        *few_shot_turns(examples),
        _turn("user", prompt),
        _turn("assistant", response),
        _turn("user", principle.critique),
    ]


def revision(
    prompt: str,
    response: str,
    principle: CritiqueRevisionPrinciple,
    critique_text: str | None,
    examples: Sequence[CritiqueRevisionExample] = (),
    system: str | None = None,
) -> list[Message]:
    """Ask for a rewrite of `response` in light of `critique_text` (None: revision-only mode, no critique turn)."""
    if critique_text is None:
        head = [_turn("system", system)] if system else []
        return [
            *head,
            *few_shot_turns(examples, with_critique=False),
            _turn("user", prompt),
            _turn("assistant", response),
            _turn("user", principle.revision),
        ]
    return [
        *critique(prompt, response, principle, examples, system),
        _turn("assistant", critique_text),
        _turn("user", principle.revision),
    ]
