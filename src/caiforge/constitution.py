"""Constitutions: load, validate, write, import other projects' formats, and draw principles with a seeded RNG.

A constitution is one YAML file under `constitutions/` with four parts (see `constitutions/default.yaml`):

- `critique_revision`: principles for the supervised stage, each a critique request and a revision request;
- `critique_revision_examples`: few-shot dialogues (prompt -> response -> critique -> revision);
- `comparison`: principles for AI feedback, each a question that picks the better of two responses;
- `comparison_examples`: few-shot comparison demos (chosen / rejected, optional principle and reasoning).

Every principle has a stable kebab-case id (unique across both principle lists) and one of `CATEGORIES`. A DVC
stage declares only the parts it uses, so `parse` also accepts a mapping with just those parts. Every error is a
`ConstitutionError` whose message names the file, the entry and the field.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from caiforge import io

log = logging.getLogger(__name__)

CATEGORIES = ("harmlessness", "helpfulness", "honesty", "ethics")
PARTS = ("critique_revision", "critique_revision_examples", "comparison", "comparison_examples")
DEFAULT_REQUIRE = ("critique_revision", "comparison")
ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]*")

P = TypeVar("P")


class ConstitutionError(ValueError):
    """A constitution file is malformed; the message names the file, the entry and the field."""


@dataclass(frozen=True)
class CritiqueRevisionPrinciple:
    """One supervised-stage principle: how to critique a response and how to revise it."""

    id: str
    category: str
    critique: str
    """Critique request: asks the assistant to critique its last response."""
    revision: str
    """Revision request: asks the assistant to rewrite the response in light of the critique."""


@dataclass(frozen=True)
class ComparisonPrinciple:
    """One AI-feedback principle: a question that picks the better of two responses."""

    id: str
    category: str
    text: str


@dataclass(frozen=True)
class CritiqueRevisionExample:
    """One few-shot dialogue for the critique/revision loop."""

    prompt: str
    response: str
    critique_request: str
    critique: str
    revision_request: str
    revision: str


@dataclass(frozen=True)
class ComparisonExample:
    """One few-shot comparison demo; `principle` names a comparison principle id when given."""

    prompt: str
    chosen: str
    rejected: str
    principle: str | None = None
    reasoning: str | None = None


@dataclass(frozen=True)
class Constitution:
    """A whole (or partial: only the parts a stage declares) constitution."""

    name: str = ""
    description: str = ""
    critique_revision: tuple[CritiqueRevisionPrinciple, ...] = ()
    critique_revision_examples: tuple[CritiqueRevisionExample, ...] = ()
    comparison: tuple[ComparisonPrinciple, ...] = ()
    comparison_examples: tuple[ComparisonExample, ...] = ()


# Entry type of each part and which of its fields may be absent or null.
_ENTRY_TYPES: dict[str, type] = {
    "critique_revision": CritiqueRevisionPrinciple,
    "critique_revision_examples": CritiqueRevisionExample,
    "comparison": ComparisonPrinciple,
    "comparison_examples": ComparisonExample,
}
_FIELDS: dict[str, tuple[str, ...]] = {
    "critique_revision": ("id", "category", "critique", "revision"),
    "critique_revision_examples": (
        "prompt",
        "response",
        "critique_request",
        "critique",
        "revision_request",
        "revision",
    ),
    "comparison": ("id", "category", "text"),
    "comparison_examples": ("prompt", "chosen", "rejected", "principle", "reasoning"),
}
_OPTIONAL = {"principle", "reasoning"}
_TOP_KEYS = ("name", "description", *PARTS)


# ---------------------------------------------------------------------------------------------------------------
# Validation


def parse(data: Any, source: str, require: Sequence[str] = DEFAULT_REQUIRE) -> Constitution:
    """Validate plain data (a loaded YAML mapping, or just the parts a stage declares) into a `Constitution`.

    `source` names the file in every error. Each part in `require` must be present and non-empty; parts that are
    absent stay empty. Ids must be unique across both principle lists.
    """
    if not isinstance(data, Mapping):
        raise ConstitutionError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    unknown = [k for k in data if k not in _TOP_KEYS]
    if unknown:
        raise ConstitutionError(f"{source}: unknown top-level key {unknown[0]!r} (allowed: {', '.join(_TOP_KEYS)})")
    for part in require:
        if part not in PARTS:
            raise ValueError(f"require: unknown part {part!r} (parts: {', '.join(PARTS)})")
        if part not in data:
            raise ConstitutionError(f"{source}: missing required part {part!r}")
        if not data[part]:
            raise ConstitutionError(f"{source}: {part}: must have at least one entry")
    header = {}
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            raise ConstitutionError(f"{source}: {key}: must be a string, got {type(data[key]).__name__}")
        header[key] = data.get(key, "")

    parts: dict[str, tuple[Any, ...]] = {}
    seen_ids: dict[str, str] = {}
    for part in PARTS:
        if part not in data:
            continue
        entries = data[part]
        if not isinstance(entries, list):
            raise ConstitutionError(f"{source}: {part}: must be a list, got {type(entries).__name__}")
        parts[part] = tuple(_parse_entry(part, i, entry, source, seen_ids) for i, entry in enumerate(entries))

    if "comparison" in data:
        known = {p.id for p in parts["comparison"]}
        for i, ex in enumerate(parts.get("comparison_examples", ())):
            if ex.principle is not None and ex.principle not in known:
                raise ConstitutionError(
                    f"{source}: comparison_examples[{i}]: field 'principle': unknown comparison principle id "
                    f"{ex.principle!r}"
                )
    return Constitution(**header, **parts)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return "an empty string" if not value else "only whitespace"
    return f"{type(value).__name__} {value!r}"


def _parse_entry(part: str, index: int, entry: Any, source: str, seen_ids: dict[str, str]) -> Any:
    where = f"{source}: {part}[{index}]"
    if not isinstance(entry, Mapping):
        raise ConstitutionError(f"{where}: must be a mapping, got {type(entry).__name__}")
    entry_id = entry.get("id")
    if isinstance(entry_id, str):
        where += f" (id {entry_id!r})"
    fields = _FIELDS[part]
    unknown = [k for k in entry if k not in fields]
    if unknown:
        raise ConstitutionError(f"{where}: unknown field {unknown[0]!r} (allowed: {', '.join(fields)})")
    values: dict[str, str | None] = {}
    for name in fields:
        value = entry.get(name)
        if name in _OPTIONAL and value is None:
            values[name] = None
            continue
        if name not in entry:
            raise ConstitutionError(f"{where}: missing field {name!r}")
        if not isinstance(value, str) or not value.strip():
            got = _describe(value)
            raise ConstitutionError(f"{where}: field {name!r} must be a non-empty string, got {got}")
        values[name] = value
    if "category" in values and values["category"] not in CATEGORIES:
        raise ConstitutionError(
            f"{where}: field 'category': unknown category {values['category']!r} (allowed: {', '.join(CATEGORIES)})"
        )
    if "id" in values:
        pid = values["id"]
        assert pid is not None
        if not ID_PATTERN.fullmatch(pid):
            raise ConstitutionError(
                f"{where}: field 'id': {pid!r} is not a valid id (lowercase letters, digits, '-', '_', '.'; "
                "starting with a letter or digit)"
            )
        if pid in seen_ids:
            raise ConstitutionError(f"{source}: {part}[{index}]: duplicate id {pid!r} (first used at {seen_ids[pid]})")
        seen_ids[pid] = f"{part}[{index}]"
    return _ENTRY_TYPES[part](**values)


# ---------------------------------------------------------------------------------------------------------------
# Files


def load(path: str | os.PathLike[str], require: Sequence[str] = DEFAULT_REQUIRE) -> Constitution:
    """Read and validate a constitution YAML file."""
    return parse(read_data(path), str(path), require)


def read_data(path: str | os.PathLike[str]) -> Any:
    """A constitution file's YAML as plain data (not yet validated); unreadable files are ConstitutionErrors."""
    source = str(path)
    try:
        text = io.read_utf8(path)
    except FileNotFoundError:
        raise ConstitutionError(f"{source}: no such file") from None
    except ValueError as exc:  # not UTF-8: names the line
        raise ConstitutionError(str(exc)) from None
    except OSError as exc:
        raise ConstitutionError(f"{source}: cannot read: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConstitutionError(f"{source}: invalid YAML: {exc}") from None


def check(path: str | os.PathLike[str]) -> Constitution:
    """Load `path` as a full constitution (critique/revision and comparison principles both required)."""
    return load(path)


def to_dict(c: Constitution) -> dict[str, Any]:
    """Plain data in the file's key order (optional example fields always present, possibly None)."""
    out: dict[str, Any] = {"name": c.name, "description": c.description}
    for part in PARTS:
        out[part] = [{name: getattr(entry, name) for name in _FIELDS[part]} for entry in getattr(c, part)]
    return out


class _Dumper(yaml.SafeDumper):
    """Safe YAML with multi-line strings as literal blocks, so few-shot dialogues stay readable in the file."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def dumps(c: Constitution) -> str:
    """The YAML text of `c`, deterministic: fixed key order, no sorting, unicode kept."""
    return yaml.dump(to_dict(c), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=119)


def dump(c: Constitution, path: str | os.PathLike[str]) -> None:
    """Write `c` to `path` atomically (temporary sibling, then rename)."""
    io.write_text(dumps(c), path)


def fill_from(c: Constitution, other: Constitution) -> tuple[Constitution, list[str]]:
    """`c` completed from `other`: every empty part taken whole, and `other`'s comparison principles of each
    category `c` has none of (an imported constitution often lacks the helpfulness comparisons `evaluate` and
    `label` judge by). Critique/revision principles are never mixed in: they decide what SL-CAI trains on.
    Returns the result and what was added, one line per addition."""
    parts: dict[str, tuple[Any, ...]] = {}
    added = []
    for part in PARTS:
        mine, theirs = getattr(c, part), getattr(other, part)
        if not mine and theirs:
            parts[part] = theirs
            added.append(f"{part}: all {len(theirs)}")
            continue
        if part == "comparison" and mine:
            have = {p.category for p in mine}
            extra = tuple(p for p in theirs if p.category not in have)
            for category in CATEGORIES:
                n = sum(p.category == category for p in extra)
                if n:
                    added.append(f"{part}: {n} {category}")
            mine = mine + extra
        parts[part] = mine
    return replace(c, **parts), added


# ---------------------------------------------------------------------------------------------------------------
# Sampling


def draw(principles: Sequence[P], rng: random.Random, k: int) -> list[P]:
    """`k` independent draws with replacement (one per critique/revision round, as in the paper), using only `rng`."""
    if not principles:
        raise ValueError("draw: no principles to draw from")
    if k < 0:
        raise ValueError(f"draw: k must be >= 0, got {k}")
    return rng.choices(list(principles), k=k)


def draw_distinct(principles: Sequence[P], rng: random.Random, k: int) -> list[P]:
    """`k` distinct principles (an ensemble for one comparison), using only `rng`."""
    if not 0 <= k <= len(principles):
        raise ValueError(f"draw_distinct: cannot draw {k} distinct principles from {len(principles)}")
    return rng.sample(list(principles), k)


def by_category(principles: Sequence[P], category: str) -> list[P]:
    """The principles of one category, in file order."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r} (allowed: {', '.join(CATEGORIES)})")
    return [p for p in principles if p.category == category]  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------------------
# Importers for other projects' formats


def guess_category(text: str) -> str:
    """Category for a principle whose source has none, by keyword (first rule that matches wins).

    "honest"/"truth"/"confiden" -> honesty; the words "ethical"/"ethics"/"moral" -> ethics ("unethical" in a list of
    harms does not count); "helpful" without any "harm" -> helpfulness; everything else -> harmlessness (the bulk of
    red-team principles).
    """
    t = text.lower()
    if any(w in t for w in ("honest", "truth", "confiden")):
        return "honesty"
    if re.search(r"\b(ethical|ethics|moral)\b", t):
        return "ethics"
    if "helpful" in t and "harm" not in t:
        return "helpfulness"
    return "harmlessness"


_LABELS = ("Human", "Assistant", "CritiqueRequest", "Critique", "RevisionRequest", "Revision")
_LABEL_SPLIT = re.compile(r"(?:^|\n\n)(" + "|".join(_LABELS) + r"):")


def _split_transcript(text: str) -> list[tuple[str, str]]:
    """A raw `\\n\\nHuman: ...\\n\\nAssistant: ...` transcript as (label, stripped text) turns; the trailing empty
    turn that opens the next exchange (`\\n\\nHuman:` or `\\n\\nAssistant:`) is dropped."""
    pieces = _LABEL_SPLIT.split(text.lstrip("\n"))
    if pieces[0].strip():
        raise ValueError(f"text before the first label: {pieces[0][:40]!r}")
    turns = [(pieces[i], pieces[i + 1].strip()) for i in range(1, len(pieces), 2)]
    if turns and not turns[-1][1]:
        turns.pop()
    return turns


def _context_prompt(turns: Sequence[tuple[str, str]]) -> str:
    """The user turn(s) that the few-shot response answers.

    One turn: its text. Several (a multi-turn dialogue): earlier turns are kept as a `Human:` / `Assistant:`
    transcript ending in the last human turn, so the example's context survives the flattening into one prompt.
    """
    if len(turns) == 1:
        return turns[0][1]
    return "\n\n".join(f"{'Human' if role in ('Human', 'user') else 'Assistant'}: {text}" for role, text in turns)


def _check_dialogue(turns: Sequence[tuple[str, str]], user: str, assistant: str) -> None:
    """Turns must alternate user/assistant, start with the user and end with the assistant."""
    if not turns or len(turns) % 2:
        raise ValueError(f"expected alternating {user}/{assistant} turns, got {[r for r, _ in turns]}")
    for i, (role, _) in enumerate(turns):
        if role != (user if i % 2 == 0 else assistant):
            raise ValueError(f"turn {i} is {role!r}, expected {user if i % 2 == 0 else assistant!r}")


def _read_json(path: Path, expect: type) -> Any:
    """The JSON value in `path`, which must be of type `expect` (list or dict)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConstitutionError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConstitutionError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(value, expect):
        raise ConstitutionError(f"{path}: expected a JSON {expect.__name__}, got {type(value).__name__}")
    return value


def _source_error(where: str, exc: Exception) -> ConstitutionError:
    """A ConstitutionError for a malformed source entry (a KeyError reads as the missing key)."""
    reason = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
    return ConstitutionError(f"{where}: {reason}")


def _strip_request(text: str, label: str, answer: str) -> str:
    """`\\n\\n<label>: request text\\n\\n<answer>:` -> `request text`."""
    m = re.fullmatch(rf"\s*{label}:\s*(.*?)\s*{answer}:\s*", text, flags=re.DOTALL)
    if not m:
        raise ValueError(f"expected '{label}: ... {answer}:', got {text[:60]!r}")
    return m.group(1)


def import_anthropic(folder: Path) -> Constitution:
    """Import the prompt files released with the Constitutional AI paper (Bai et al., 2022).

    - `CritiqueRevisionInstructions.json` -> `critique_revision` (ids are the JSON keys, e.g. `harmful0`);
    - `CritiqueRevisionFewShotPrompts.json` -> `critique_revision_examples`; multi-turn transcripts keep their
      earlier turns in `prompt` (see `_context_prompt`), the last assistant turn is the `response`;
    - `RLMadisonInstructions.json` -> `comparison` (ids `rl-madison-<i>`, the trailing "Options:" dropped);
    - `RLMadisonFewShotPrompts.json` -> `comparison_examples` (first correct = chosen, first incorrect = rejected).

    Categories are not in the source; `guess_category` assigns them. The precog (chain-of-thought) demos are not
    imported: their slots are written for a different comparison prompt layout.
    """
    folder = Path(folder)
    raw: dict[str, list[dict[str, Any]]] = {part: [] for part in PARTS}

    path = folder / "CritiqueRevisionInstructions.json"
    instructions = _read_json(path, dict)
    for key, entry in instructions.items():
        try:
            prompts = entry["prompt"]
            prompts = [prompts] if isinstance(prompts, str) else prompts
            if len(prompts) > 1:
                log.warning("%s: %s has %d critique requests; importing the first", path, key, len(prompts))
            critique = _strip_request(prompts[0], "CritiqueRequest", "Critique")
            revision = _strip_request(entry["edit_request"], "RevisionRequest", "Revision")
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise _source_error(f"{path}: {key}", exc) from None
        raw["critique_revision"].append(
            {
                "id": key,
                "category": guess_category(critique + " " + revision),
                "critique": critique,
                "revision": revision,
            }
        )

    path = folder / "CritiqueRevisionFewShotPrompts.json"
    for i, transcript in enumerate(_read_json(path, list)):
        try:
            turns = _split_transcript(transcript)
            tail = [label for label, _ in turns[-4:]]
            if tail != ["CritiqueRequest", "Critique", "RevisionRequest", "Revision"]:
                raise ValueError(f"expected the transcript to end in a critique and a revision, got {tail}")
            dialogue = turns[:-4]
            _check_dialogue(dialogue, "Human", "Assistant")
        except (TypeError, ValueError) as exc:
            raise _source_error(f"{path}: [{i}]", exc) from None
        raw["critique_revision_examples"].append(
            {
                "prompt": _context_prompt(dialogue[:-1]),
                "response": dialogue[-1][1],
                **dict(zip(_FIELDS["critique_revision_examples"][2:], (t for _, t in turns[-4:]), strict=True)),
            }
        )

    path = folder / "RLMadisonInstructions.json"
    for i, text in enumerate(_read_json(path, list)):
        if not isinstance(text, str):
            raise ConstitutionError(f"{path}: [{i}]: expected a string, got {type(text).__name__}")
        text = re.sub(r"\s*Options:\s*$", "", text).strip()
        raw["comparison"].append({"id": f"rl-madison-{i}", "category": guess_category(text), "text": text})

    path = folder / "RLMadisonFewShotPrompts.json"
    for i, demo in enumerate(_read_json(path, list)):
        try:
            turns = _split_transcript(demo["prompt"])
            _check_dialogue([*turns, ("Assistant", "")], "Human", "Assistant")
            chosen, rejected = demo["corrects"][0].strip(), demo["incorrects"][0].strip()
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise _source_error(f"{path}: [{i}]", exc) from None
        raw["comparison_examples"].append(
            {
                "prompt": _context_prompt(turns),
                "chosen": chosen,
                "rejected": rejected,
                "principle": None,
                "reasoning": None,
            }
        )

    data = {"name": folder.name, "description": f"Imported from Anthropic's Constitutional AI prompts ({folder.name})"}
    return parse({**data, **raw}, str(folder))


def import_llm_swarm(path: Path) -> Constitution:
    """Import an llm-swarm constitution file: `{"constitutions": [{critic, revision}], "system_chat": [[...]]}`.

    Each `constitutions` entry becomes a critique/revision principle (ids `llm-swarm-<i>`); each `system_chat`
    dialogue becomes a few-shot example: its last four messages are critique request, critique, revision request
    and revision, the one before is the response, and any earlier turns are kept in `prompt`. The format has no
    comparison principles, so `comparison` stays empty.
    """
    path = Path(path)
    data = _read_json(path, dict)
    principles, chats = data.get("constitutions"), data.get("system_chat")
    if not isinstance(principles, list) or not isinstance(chats, list):
        raise ConstitutionError(f"{path}: expected lists under the keys 'constitutions' and 'system_chat'")
    raw: dict[str, Any] = {"name": path.stem, "description": f"Imported from llm-swarm constitution {path.name}"}
    raw["critique_revision"] = []
    for i, entry in enumerate(principles):
        try:
            critique, revision = entry["critic"].strip(), entry["revision"].strip()
        except (KeyError, TypeError, AttributeError) as exc:
            raise _source_error(f"{path}: constitutions[{i}]", exc) from None
        raw["critique_revision"].append(
            {
                "id": f"llm-swarm-{i}",
                "category": guess_category(critique + " " + revision),
                "critique": critique,
                "revision": revision,
            }
        )
    raw["critique_revision_examples"] = []
    for i, chat in enumerate(chats):
        try:
            turns = [(m["role"], m["content"].strip()) for m in chat]
            _check_dialogue(turns, "user", "assistant")
            if len(turns) < 6:
                raise ValueError(f"expected at least 6 messages (prompt ... revision), got {len(turns)}")
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise _source_error(f"{path}: system_chat[{i}]", exc) from None
        raw["critique_revision_examples"].append(
            {
                "prompt": _context_prompt(turns[:-5]),
                "response": turns[-5][1],
                **dict(zip(_FIELDS["critique_revision_examples"][2:], (t for _, t in turns[-4:]), strict=True)),
            }
        )
    raw["comparison"] = []
    raw["comparison_examples"] = []
    return parse(raw, str(path), require=("critique_revision",))


IMPORTERS: dict[str, Callable[[Path], Constitution]] = {"anthropic": import_anthropic, "llm-swarm": import_llm_swarm}
"""Formats `caiforge constitution import` understands: name -> importer (source path -> Constitution)."""
