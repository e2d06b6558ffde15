"""Tokenizer-side logic every engine shares: the rendered prompt, the end tokens, the option tokens.

Every engine sees the same text: the model's own chat template renders a conversation locally, whether the tokens
then go to a local model or to a server's `/v1/completions`.

Option tokens are found the way the model would emit them: tokenize `prompt + option` for every option and take the
longest token prefix they all share as the context. Usually that is the prompt itself and each option is one more
token ("(" then "A"); when a tokenizer merges the last prompt character with the letter ("(A" as one token) the
context is one token shorter and the merged tokens are the options.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from caiforge.engines import Message

END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
"""Chat templates' end-of-turn markers, tried in this order."""


def render_chat(tokenizer: Any, conversation: Sequence[Message], prefill: str = "", *, open_turn: bool = True) -> str:
    """The chat template with an open assistant turn, followed by the pre-filled start of the answer (with
    `open_turn=False`: the conversation as it stands, its last turn closed).

    Message contents and the prefill are text, never control tokens: a red-team prompt or a model's answer that
    spells out `<|im_end|>\n<|im_start|>assistant` must not close its turn and forge another (see `neutralize`).
    """
    specials = special_strings(tokenizer)  # once per render: this runs for every row of every call
    turns = [{**turn, "content": neutralize(tokenizer, turn["content"], specials)} for turn in conversation]
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=open_turn)
    return text + neutralize(tokenizer, prefill, specials)


class ChatRenderer:
    """`render_chat` for the many conversations one engine renders with one tokenizer: the special strings found
    once, and the chat template compiled once (transformers' own compiled, sandboxed template) and rendered with
    what `apply_chat_template` gives it (the messages, `add_generation_prompt`, the special tokens) without its
    per-call conversion of rich message objects, which plain {"role", "content"} text turns do not need. The first
    render in each mode is compared with `apply_chat_template`; if they differ, or the turns are not plain text,
    or this transformers has no such compiler, every render goes through `apply_chat_template`."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.specials = special_strings(tokenizer)
        self.variables = dict(tokenizer.special_tokens_map)
        self.agrees: dict[bool, bool] = {}
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            self.template: Any = _compile_jinja_template(tokenizer.get_chat_template())
        except (ImportError, AttributeError, TypeError, ValueError):
            self.template = None

    def __call__(self, conversation: Sequence[Message], prefill: str = "", *, open_turn: bool = True) -> str:
        turns = [
            {**turn, "content": neutralize(self.tokenizer, turn["content"], self.specials)} for turn in conversation
        ]
        text = self._compiled(turns, open_turn)
        if text is None:
            text = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=open_turn)
        return text + neutralize(self.tokenizer, prefill, self.specials)

    def _compiled(self, turns: list[dict], open_turn: bool) -> str | None:
        plain = all(turn.keys() == {"role", "content"} and type(turn["content"]) is str for turn in turns)
        if self.template is None or not plain or self.agrees.get(open_turn) is False:
            return None
        text = self.template.render(
            messages=turns, tools=None, documents=None, add_generation_prompt=open_turn, **self.variables
        )
        if open_turn not in self.agrees:
            want = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=open_turn)
            self.agrees[open_turn] = text == want
            return want
        return text


def special_strings(tokenizer: Any) -> list[str]:
    """Every special token's text (chat markers, EOS, ...), longest first."""
    found = set(tokenizer.all_special_tokens)
    found |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return sorted((s for s in found if s), key=lambda s: (-len(s), s))


def neutralize(tokenizer: Any, text: str, specials: Sequence[str] | None = None) -> str:
    """`text` with each special token's spelling broken by a zero-width space after its first character, so that
    no tokenizer (ours or a server's) can read it as the control token; every other text is left unchanged.
    `specials`: `special_strings(tokenizer)`, when the caller already has them."""
    for special in special_strings(tokenizer) if specials is None else specials:
        if special in text:
            text = text.replace(special, special[0] + ZERO_WIDTH_SPACE + special[1:])
    return text


ZERO_WIDTH_SPACE = "\u200b"


def encode(tokenizer: Any, text: str) -> list[int]:
    """The tokens of a rendered prompt: the chat template wrote every special token it wants, so none is added."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def reply_turn(tokenizer: Any, prompt: str, reply: str) -> tuple[str, str]:
    """The rendered (user `prompt`, assistant `reply`) chat cut where the assistant turn starts: the head (what a
    generator is given) and the reply turn after it, its end included (text never becomes a control token)."""
    turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    head = render_chat(tokenizer, turns[:1])
    full = render_chat(tokenizer, turns, open_turn=False)
    if not full.startswith(head):
        raise ValueError("the chat template does not render the prompt as a prefix of the full chat")
    return head, full[len(head) :]


def completion_tokens(tokenizer: Any, prompt: str, reply: str) -> tuple[list[int], int]:
    """Token ids of the rendered (user prompt, assistant reply) chat and where the assistant turn starts: the head
    and the reply turn tokenized apart, as a generator's prompt and its answer are."""
    head, turn = reply_turn(tokenizer, prompt, reply)
    head_ids = encode(tokenizer, head)
    return head_ids + encode(tokenizer, turn), len(head_ids)


def added_bos(tokenizer: Any) -> str | None:
    """The BOS text `tokenizer` puts before any text it encodes with its special tokens (what a server that
    tokenizes a prompt by the model's own defaults adds: transformers' `add_special_tokens`, llama.cpp's GGUF
    `add_bos_token`, converted from it), or None when it adds none."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    return tokenizer.bos_token if tokenizer("a")["input_ids"][:1] == [bos] != encode(tokenizer, "a")[:1] else None


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn: the chat template's end marker (if it is one token) and EOS."""
    ids: list[int] = []
    for token in END_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.append(tid)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the tokenizer has neither a chat end token nor an EOS token: generation could not stop")
    return ids


@dataclass(frozen=True)
class OptionPlan:
    """How one prompt's options are read: a shared context and each option's continuation tokens."""

    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]

    @property
    def single_token(self) -> bool:
        return all(len(c) == 1 for c in self.continuations)


def plan_options(tokenizer: Any, text: str, options: Sequence[str]) -> OptionPlan:
    """Tokenize `text + option` for each option; split into the common token prefix and per-option continuations."""
    if len(set(options)) != len(options) or len(options) < 2:
        raise ValueError(f"options must be at least two distinct strings, got {list(options)}")
    full = [encode(tokenizer, text + opt) for opt in options]
    common = 0
    while all(len(f) > common for f in full) and len({f[common] for f in full}) == 1:
        common += 1
    if common == 0:
        raise ValueError("the prompt shares no tokens with its options; cannot score (is the prompt empty?)")
    conts = tuple(tuple(f[common:]) for f in full)
    if any(not c for c in conts):
        raise ValueError(f"options {list(options)} tokenize identically after the prompt; cannot tell them apart")
    return OptionPlan(tuple(full[0][:common]), conts)


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix all rows share."""
    if not rows:
        return 0
    shortest = min(len(r) for r in rows)
    n = 0
    first = rows[0]
    while n < shortest and all(r[n] == first[n] for r in rows):
        n += 1
    return n


class OptionTokens:
    """The options' continuation tokens after many prompts, each checked to be one token right after its prompt,
    planned once per prompt tail: the text from its last special token on (a chat template's assistant header and
    the prefill). Tokenizers split text at special tokens and tokenize each piece on its own, so what follows a
    special token tokenizes the same whatever precedes it. A prompt without special tokens is planned whole."""

    def __init__(self, tokenizer: Any, options: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.options = tuple(options)
        self.specials = special_strings(tokenizer)
        self.plans: dict[str, tuple[tuple[int, ...], ...]] = {}
        self.planned = 0

    def tail(self, text: str) -> str | None:
        """`text` from its last special token on, or None when it holds none."""
        cut = max((text.rfind(s) for s in self.specials), default=-1)
        return text[cut:] if cut >= 0 else None

    def single(self, text: str) -> tuple[tuple[int, ...], ...]:
        """Each option's one token after `text`; ValueError when an option is not one token right after it."""
        tail = self.tail(text)
        if tail is not None and tail in self.plans:
            return self.plans[tail]
        piece = text if tail is None else tail
        plan = plan_options(self.tokenizer, piece, self.options)
        self.planned += 1
        if not plan.single_token or list(plan.context) != encode(self.tokenizer, piece):
            raise ValueError(
                f"options {list(self.options)} are not single tokens right after the prompt for this tokenizer "
                f"(the prompt ends {piece[-40:]!r})"
            )
        if tail is not None:
            self.plans[tail] = plan.continuations
        return plan.continuations
