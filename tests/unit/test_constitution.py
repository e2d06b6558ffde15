"""The constitution format: the default file, every validation rule, seeded draws, importers and round trips."""

from __future__ import annotations

import copy
import json
import random
import shutil
from collections import Counter

import pytest
import yaml

from caiforge import config, constitution
from caiforge.constitution import ConstitutionError

DEFAULT = config.ROOT / "constitutions" / "default.yaml"

BASE = {
    "name": "tiny",
    "description": "A two-principle constitution for tests.",
    "critique_revision": [
        {"id": "cr-a", "category": "harmlessness", "critique": "Find harm.", "revision": "Remove harm."},
        {"id": "cr-b", "category": "honesty", "critique": "Find falsehoods.", "revision": "Fix them."},
    ],
    "critique_revision_examples": [
        {
            "prompt": "P?",
            "response": "R.",
            "critique_request": "Find harm.",
            "critique": "C.",
            "revision_request": "Remove harm.",
            "revision": "V.",
        },
    ],
    "comparison": [
        {"id": "cmp-a", "category": "harmlessness", "text": "Which is less harmful?"},
        {"id": "cmp-b", "category": "ethics", "text": "Which is more ethical?"},
    ],
    "comparison_examples": [
        {"prompt": "P?", "chosen": "Good.", "rejected": "Bad.", "principle": "cmp-a", "reasoning": "Because."},
    ],
}


def write(tmp_path, data, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# The default constitution


def test_default_constitution_is_valid_and_complete():
    c = constitution.check(DEFAULT)
    assert c.name == "default" and c.description.strip()
    assert len(c.critique_revision) >= 16
    assert len(c.comparison) >= 16
    assert len(c.critique_revision_examples) >= 4
    assert len(c.comparison_examples) >= 4
    for principles in (c.critique_revision, c.comparison):
        per = Counter(p.category for p in principles)
        assert set(per) == set(constitution.CATEGORIES)
        assert per.most_common(1)[0][0] == "harmlessness" and per["harmlessness"] > max(
            n for cat, n in per.items() if cat != "harmlessness"
        )
    ids = [p.id for p in (*c.critique_revision, *c.comparison)]
    assert len(ids) == len(set(ids))


def test_default_constitution_texts_are_short_and_examples_consistent():
    c = constitution.load(DEFAULT)
    for p in c.critique_revision:
        assert len(p.critique) <= 200 and len(p.revision) <= 200, p.id
    for p in c.comparison:
        assert len(p.text) <= 200, p.id
    # Few-shot dialogues ask exactly what a principle of the same file asks, so they teach the real requests.
    pairs = {(p.critique, p.revision) for p in c.critique_revision}
    for ex in c.critique_revision_examples:
        assert (ex.critique_request, ex.revision_request) in pairs
    assert all(ex.principle for ex in c.comparison_examples)


def test_base_fixture_is_valid(tmp_path):
    c = constitution.load(write(tmp_path, BASE, "ok.yaml"))
    assert [p.id for p in c.critique_revision] == ["cr-a", "cr-b"]
    assert c.comparison_examples[0] == constitution.ComparisonExample("P?", "Good.", "Bad.", "cmp-a", "Because.")


# ---------------------------------------------------------------------------------------------------------------
# Every rejection rule: the message names the file, the entry and the field


def _set(part, index, field, value):
    def edit(d):
        d[part][index][field] = value

    return edit


def _delete(part, index, field):
    def edit(d):
        del d[part][index][field]

    return edit


def _top(key, value):
    def edit(d):
        d[key] = value

    return edit


def _drop(key):
    def edit(d):
        del d[key]

    return edit


BAD = {
    "unknown-top-level-key": (_top("extras", [1]), ["'extras'", "unknown top-level key", "critique_revision"]),
    "missing-field": (
        _delete("critique_revision", 1, "revision"),
        ["critique_revision[1]", "(id 'cr-b')", "'revision'"],
    ),
    "unknown-field": (_set("comparison", 1, "weight", "2"), ["comparison[1]", "(id 'cmp-b')", "'weight'", "unknown"]),
    "non-string-text": (_set("critique_revision", 0, "critique", 42), ["critique_revision[0]", "'critique'", "42"]),
    "empty-text": (_set("comparison", 0, "text", ""), ["comparison[0]", "(id 'cmp-a')", "'text'", "non-empty"]),
    "whitespace-text": (
        _set("critique_revision_examples", 0, "revision", "  \n "),
        ["critique_revision_examples[0]", "'revision'", "non-empty"],
    ),
    "null-required-example-field": (
        _set("comparison_examples", 0, "chosen", None),
        ["comparison_examples[0]", "'chosen'"],
    ),
    "empty-optional-field": (
        _set("comparison_examples", 0, "reasoning", " "),
        ["comparison_examples[0]", "'reasoning'"],
    ),
    "unknown-category": (
        _set("critique_revision", 1, "category", "kindness"),
        [
            "critique_revision[1]",
            "(id 'cr-b')",
            "'category'",
            "'kindness'",
            "harmlessness, helpfulness, honesty, ethics",
        ],
    ),
    "duplicate-id-same-list": (
        _set("comparison", 1, "id", "cmp-a"),
        ["comparison[1]", "duplicate id 'cmp-a'", "first used at comparison[0]"],
    ),
    "duplicate-id-across-lists": (
        _set("comparison", 1, "id", "cr-a"),
        ["comparison[1]", "duplicate id 'cr-a'", "first used at critique_revision[0]"],
    ),
    "id-with-spaces-and-capitals": (
        _set("critique_revision", 0, "id", "Harm One"),
        ["critique_revision[0]", "'id'", "'Harm One'"],
    ),
    "id-with-leading-dash": (_set("comparison", 0, "id", "-x"), ["comparison[0]", "'id'", "'-x'"]),
    "non-string-id": (_set("comparison", 0, "id", 7), ["comparison[0]", "'id'", "non-empty string"]),
    "unknown-example-principle": (
        _set("comparison_examples", 0, "principle", "nope"),
        ["comparison_examples[0]", "'principle'", "'nope'"],
    ),
    "entry-not-a-mapping": (
        _top("critique_revision", [BASE["critique_revision"][0], "text"]),
        ["critique_revision[1]", "mapping"],
    ),
    "part-not-a-list": (_top("comparison", {"id": "x"}), ["comparison", "must be a list"]),
    "missing-required-part": (_drop("comparison"), ["missing required part 'comparison'"]),
    "empty-required-part": (_top("critique_revision", []), ["critique_revision", "at least one entry"]),
    "name-not-a-string": (_top("name", ["x"]), ["name", "must be a string"]),
}


@pytest.mark.parametrize("rule", sorted(BAD))
def test_rejection_rules_name_file_entry_and_field(tmp_path, rule):
    edit, fragments = BAD[rule]
    data = copy.deepcopy(BASE)
    edit(data)
    path = write(tmp_path, data)
    with pytest.raises(ConstitutionError) as err:
        constitution.load(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("- a\n- b\n", "top level must be a mapping"), ("critique_revision: [\n", "invalid YAML"), ("", "got NoneType")],
)
def test_rejects_non_mapping_and_invalid_yaml(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConstitutionError, match="bad.yaml") as err:
        constitution.load(path)
    assert fragment in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConstitutionError, match=r"nothere\.yaml: no such file"):
        constitution.load(tmp_path / "nothere.yaml")


def test_optional_example_fields_may_be_absent_or_null(tmp_path):
    data = copy.deepcopy(BASE)
    data["comparison_examples"] = [
        {"prompt": "P?", "chosen": "Good.", "rejected": "Bad."},
        {"prompt": "Q?", "chosen": "Yes.", "rejected": "No.", "principle": None, "reasoning": None},
    ]
    c = constitution.load(write(tmp_path, data, "ok.yaml"))
    assert [(e.principle, e.reasoning) for e in c.comparison_examples] == [(None, None), (None, None)]


# ---------------------------------------------------------------------------------------------------------------
# Partial parse: a stage sees only the parts it declares


def test_partial_parse_with_only_critique_parts():
    parts = {k: copy.deepcopy(BASE[k]) for k in ("critique_revision", "critique_revision_examples")}
    c = constitution.parse(parts, "constitutions/x.yaml", require=tuple(parts))
    assert c.name == "" and c.comparison == () and c.comparison_examples == ()
    assert [p.id for p in c.critique_revision] == ["cr-a", "cr-b"]
    assert c.critique_revision_examples[0].critique == "C."


def test_partial_parse_does_not_check_example_principles_without_comparison():
    parts = {"comparison_examples": [dict(BASE["comparison_examples"][0], principle="declared-elsewhere")]}
    c = constitution.parse(parts, "constitutions/x.yaml", require=())
    assert c.comparison_examples[0].principle == "declared-elsewhere"


def test_partial_parse_still_checks_duplicates_across_the_parts_it_sees():
    parts = {"critique_revision": BASE["critique_revision"], "comparison": [dict(BASE["comparison"][0], id="cr-b")]}
    with pytest.raises(ConstitutionError, match=r"comparison\[0\]: duplicate id 'cr-b'"):
        constitution.parse(parts, "constitutions/x.yaml", require=())


@pytest.mark.parametrize("missing", ["comparison", "critique_revision_examples"])
def test_require_of_a_missing_part_names_it(missing):
    parts = {"critique_revision": BASE["critique_revision"]}
    with pytest.raises(ConstitutionError, match=rf"constitutions/x\.yaml: missing required part '{missing}'"):
        constitution.parse(parts, "constitutions/x.yaml", require=("critique_revision", missing))


def test_require_of_an_unknown_part_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown part 'principles'"):
        constitution.parse({}, "x.yaml", require=("principles",))


# ---------------------------------------------------------------------------------------------------------------
# Seeded drawing


@pytest.fixture(scope="module")
def principles():
    return constitution.load(DEFAULT).critique_revision


def test_draw_is_reproducible_per_seed(principles):
    a = constitution.draw(principles, random.Random(1), 50)
    assert a == constitution.draw(principles, random.Random(1), 50)
    assert a != constitution.draw(principles, random.Random(2), 50)
    assert len(a) == 50 and all(p in principles for p in a)


def test_draw_is_with_replacement_per_round(principles):
    # Each round is an independent draw, so principles can repeat within one prompt's rounds.
    rng = random.Random(0)
    rounds = [constitution.draw(principles, rng, 4) for _ in range(300)]
    assert any(len(set(r)) < 4 for r in rounds)
    assert any(len(set(r)) == 4 for r in rounds)
    assert len(constitution.draw(principles[:2], random.Random(0), 10)) == 10


def test_draw_covers_every_principle_evenly(principles):
    counts = Counter(p.id for p in constitution.draw(principles, random.Random(7), 2000))
    assert set(counts) == {p.id for p in principles}
    expected = 2000 / len(principles)
    assert all(0.5 * expected < n < 1.5 * expected for n in counts.values()), counts


def test_draw_uses_only_the_passed_rng(principles):
    random.seed(123)
    state = random.getstate()
    a = constitution.draw(principles, random.Random(5), 20)
    b = constitution.draw_distinct(principles, random.Random(5), 5)
    assert random.getstate() == state, "global random state must stay untouched"
    random.seed(999)
    assert constitution.draw(principles, random.Random(5), 20) == a
    assert constitution.draw_distinct(principles, random.Random(5), 5) == b


def test_draw_distinct(principles):
    rng = random.Random(3)
    for _ in range(100):
        picked = constitution.draw_distinct(principles, rng, 6)
        assert len(picked) == 6 and len({p.id for p in picked}) == 6
    everything = constitution.draw_distinct(principles, random.Random(0), len(principles))
    assert sorted(p.id for p in everything) == sorted(p.id for p in principles)
    with pytest.raises(ValueError, match=f"cannot draw {len(principles) + 1} distinct"):
        constitution.draw_distinct(principles, random.Random(0), len(principles) + 1)


def test_draw_from_nothing_fails():
    with pytest.raises(ValueError, match="no principles"):
        constitution.draw([], random.Random(0), 1)


def test_by_category(principles):
    honesty = constitution.by_category(principles, "honesty")
    assert honesty and all(p.category == "honesty" for p in honesty)
    assert sum(len(constitution.by_category(principles, cat)) for cat in constitution.CATEGORIES) == len(principles)
    with pytest.raises(ValueError, match="unknown category 'kindness'"):
        constitution.by_category(principles, "kindness")


# ---------------------------------------------------------------------------------------------------------------
# Writing


def test_dump_round_trips_and_is_deterministic(tmp_path):
    c = constitution.load(DEFAULT)
    constitution.dump(c, tmp_path / "a.yaml")
    constitution.dump(constitution.load(tmp_path / "a.yaml"), tmp_path / "b.yaml")
    assert constitution.load(tmp_path / "a.yaml") == c
    assert (tmp_path / "a.yaml").read_bytes() == (tmp_path / "b.yaml").read_bytes()
    data = yaml.safe_load((tmp_path / "a.yaml").read_text())
    assert list(data) == ["name", "description", *constitution.PARTS]
    assert list(data["critique_revision"][0]) == ["id", "category", "critique", "revision"]
    assert list(data["comparison_examples"][0]) == ["prompt", "chosen", "rejected", "principle", "reasoning"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.yaml", "b.yaml"], "no temporary files left behind"


def test_dump_keeps_multiline_and_unicode_text(tmp_path):
    data = copy.deepcopy(BASE)
    data["critique_revision_examples"][0]["prompt"] = "Human: first\n\nAssistant: réponse\n\nHuman: second"
    data["comparison"][0]["text"] = "Which is kinder? “Quotes” and trailing space "
    c = constitution.parse(data, "x.yaml")
    constitution.dump(c, tmp_path / "c.yaml")
    assert constitution.load(tmp_path / "c.yaml") == c
    assert "réponse" in (tmp_path / "c.yaml").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Importers, on the real anchor files


def test_import_anthropic(anchors):
    folder = anchors / "anthropic-cai-prompts"
    c = constitution.import_anthropic(folder)
    raw_instr = json.loads((folder / "CritiqueRevisionInstructions.json").read_text())
    assert [p.id for p in c.critique_revision] == list(raw_instr)
    assert len(c.critique_revision) == 16 and len(c.comparison) == 16
    assert [p.id for p in c.comparison] == [f"rl-madison-{i}" for i in range(16)]
    for p in c.critique_revision:
        assert p.critique == p.critique.strip() and p.revision == p.revision.strip()
        for label in ("CritiqueRequest:", "Critique:", "RevisionRequest:", "Revision:"):
            assert label not in p.critique and label not in p.revision
        assert p.critique in raw_instr[p.id]["prompt"][0] and p.revision in raw_instr[p.id]["edit_request"]
    for p in c.comparison:
        assert p.text == p.text.strip() and not p.text.endswith("Options:")
    assert {p.category for p in c.comparison} >= {"harmlessness", "ethics"}
    assert all(p.category in constitution.CATEGORIES for p in (*c.critique_revision, *c.comparison))


def test_import_anthropic_few_shot_transcripts(anchors):
    folder = anchors / "anthropic-cai-prompts"
    c = constitution.import_anthropic(folder)
    transcripts = json.loads((folder / "CritiqueRevisionFewShotPrompts.json").read_text())
    assert len(c.critique_revision_examples) == len(transcripts)
    for ex, raw in zip(c.critique_revision_examples, transcripts, strict=True):
        for value in vars(ex).values():
            assert value.strip() and value == value.strip()
            assert not value.endswith("Human:")
        # The response is the last assistant turn; the revision is everything after the last "Revision:" label.
        last_assistant = raw.rsplit("\n\nAssistant:", 1)[1].split("\n\nCritiqueRequest:")[0].strip()
        assert ex.response == last_assistant
        assert ex.revision == raw.rsplit("\n\nRevision:", 1)[1].rsplit("\n\nHuman:", 1)[0].strip()
        humans = raw.count("\n\nHuman:") - raw.rstrip().endswith("Human:")
        if humans == 1:
            assert "Human:" not in ex.prompt and ex.prompt in raw
        else:
            # Multi-turn dialogue: earlier turns are kept in the prompt, as a transcript ending in the human's turn.
            first_human = raw.split("\n\nHuman:", 2)[1].split("\n\nAssistant:")[0].strip()
            assert ex.prompt.startswith(f"Human: {first_human}")
            assert ex.prompt.count("Human:") == humans and ex.prompt.count("Assistant:") == humans - 1
    assert any("Assistant:" in ex.prompt for ex in c.critique_revision_examples), "the anchors include multi-turn"


def test_import_anthropic_comparison_examples(anchors):
    folder = anchors / "anthropic-cai-prompts"
    c = constitution.import_anthropic(folder)
    demos = json.loads((folder / "RLMadisonFewShotPrompts.json").read_text())
    assert len(c.comparison_examples) == len(demos)
    for ex, raw in zip(c.comparison_examples, demos, strict=True):
        assert ex.chosen == raw["corrects"][0].strip() and ex.rejected == raw["incorrects"][0].strip()
        assert ex.prompt and "Human:" not in ex.prompt and "Assistant:" not in ex.prompt and ex.prompt in raw["prompt"]
        assert ex.principle is None and ex.reasoning is None


def test_imported_anthropic_round_trips(anchors, tmp_path):
    c = constitution.import_anthropic(anchors / "anthropic-cai-prompts")
    constitution.dump(c, tmp_path / "anthropic.yaml")
    assert constitution.check(tmp_path / "anthropic.yaml") == c


@pytest.mark.parametrize(("file", "pairs"), [("constitution_anthropic.json", 16), ("constitution_grok.json", 2)])
def test_import_llm_swarm(anchors, tmp_path, file, pairs):
    path = anchors / "llm-swarm-constitutions" / file
    raw = json.loads(path.read_text())
    c = constitution.import_llm_swarm(path)
    assert c.name == path.stem
    assert len(c.critique_revision) == pairs
    assert [p.id for p in c.critique_revision] == [f"llm-swarm-{i}" for i in range(pairs)]
    assert [(p.critique, p.revision) for p in c.critique_revision] == [
        (e["critic"].strip(), e["revision"].strip()) for e in raw["constitutions"]
    ]
    assert c.comparison == () and c.comparison_examples == ()
    assert len(c.critique_revision_examples) == len(raw["system_chat"])
    for ex, chat in zip(c.critique_revision_examples, raw["system_chat"], strict=True):
        assert ex.response == chat[-5]["content"].strip() and ex.revision == chat[-1]["content"].strip()
        assert ex.critique_request == chat[-4]["content"].strip()
        if len(chat) > 6:
            assert ex.prompt.startswith("Human: ") and ex.prompt.endswith(chat[-6]["content"].strip())
        else:
            assert ex.prompt == chat[0]["content"].strip()

    constitution.dump(c, tmp_path / "swarm.yaml")
    data = yaml.safe_load((tmp_path / "swarm.yaml").read_text())
    assert constitution.parse(data, "swarm.yaml", require=("critique_revision",)) == c
    with pytest.raises(ConstitutionError, match="comparison"):
        constitution.check(tmp_path / "swarm.yaml")


def test_importers_table():
    importers = constitution.IMPORTERS
    assert sorted(importers) == ["anthropic", "llm-swarm"]
    assert importers["anthropic"] is constitution.import_anthropic
    assert importers["llm-swarm"] is constitution.import_llm_swarm


def test_import_anthropic_rejects_an_irregular_transcript(anchors, tmp_path):
    folder = tmp_path / "prompts"
    shutil.copytree(anchors / "anthropic-cai-prompts", folder)
    path = folder / "CritiqueRevisionFewShotPrompts.json"
    transcripts = json.loads(path.read_text())
    transcripts[2] = transcripts[2].split("\n\nRevisionRequest:")[0]  # no revision
    path.write_text(json.dumps(transcripts))
    with pytest.raises(
        ConstitutionError, match=r"CritiqueRevisionFewShotPrompts\.json: \[2\]: .*critique and a revision"
    ):
        constitution.import_anthropic(folder)


def test_import_anthropic_missing_file_is_named(tmp_path):
    with pytest.raises(ConstitutionError, match=r"CritiqueRevisionInstructions\.json: no such file"):
        constitution.import_anthropic(tmp_path)


def test_import_llm_swarm_rejects_a_broken_chat(anchors, tmp_path):
    raw = json.loads((anchors / "llm-swarm-constitutions" / "constitution_grok.json").read_text())
    raw["system_chat"][1] = raw["system_chat"][1][:-1]  # ends on the user's revision request
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConstitutionError, match=r"broken\.json: system_chat\[1\]"):
        constitution.import_llm_swarm(path)


@pytest.mark.parametrize(
    ("text", "category"),
    [
        ("Which response is more honest about uncertainty?", "honesty"),
        ("Choose the more ethical and moral response.", "ethics"),
        ("Remove anything harmful, unethical or illegal.", "harmlessness"),
        ("Which response is more helpful?", "helpfulness"),
        ("Which response is helpful and harmless?", "harmlessness"),
        ("Rewrite it to be age-appropriate.", "harmlessness"),
    ],
)
def test_guess_category(text, category):
    assert constitution.guess_category(text) == category


def test_import_llm_swarm_names_a_missing_key(anchors, tmp_path):
    raw = json.loads((anchors / "llm-swarm-constitutions" / "constitution_grok.json").read_text())
    del raw["constitutions"][1]["critic"]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConstitutionError, match=r"broken\.json: constitutions\[1\]: missing key 'critic'"):
        constitution.import_llm_swarm(path)
