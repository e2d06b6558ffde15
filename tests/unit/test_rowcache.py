"""The row cache: exact-key reuse that never changes a result, durable journals, compaction and pruning."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from caiforge import config, engines, models, rowcache
from caiforge.engines import hf

# Rows that differ right after a shared few-shot prefix: every subset of them shares the same prefix length, so
# a row's key (and its numbers) are the same in any call.
DEMOS = [
    {"role": "user", "content": "a long few-shot demo that every row shares " * 3},
    {"role": "assistant", "content": "a demo answer " * 4},
]
LENGTHS = (1, 9, 3, 17, 5, 2, 11)
CONVS = [[*DEMOS, {"role": "user", "content": f"{w} " + "x " * n}] for w, n in zip("abcdefg", LENGTHS, strict=True)]
PREFILL = "The answer is: ("


@pytest.fixture(scope="module")
def tiny():
    return models.build_tiny(models.TinySpec(), seed=0)


def generator(tiny, cache=None, **kw) -> hf.TransformersGenerator:
    cfg = engines.GenerationConfig(
        **{"batch_size": 3, "max_new_tokens": 10, "temperature": 1.0, "progress": False, **kw}
    )
    g = hf.TransformersGenerator(*tiny, cfg)
    g.cache = cache
    return g


def scorer(tiny, cache=None, **kw) -> hf.TransformersChoiceScorer:
    s = hf.TransformersChoiceScorer(*tiny, engines.ScoringConfig(**{"batch_size": 2, "progress": False, **kw}))
    s.cache = cache
    return s


@pytest.mark.parametrize("prefix_reuse", [True, False])
def test_a_rows_numbers_do_not_depend_on_its_call(tiny, prefix_reuse):
    """Batch invariance, bit for bit: a row scored or sampled alone, in a subset or in a reordered call."""
    whole = scorer(tiny, prefix_reuse=prefix_reuse).choice_logprobs(CONVS, [PREFILL] * len(CONVS))
    for subset in ([3], [0, 5], [6, 2, 4, 1]):
        got = scorer(tiny, prefix_reuse=prefix_reuse).choice_logprobs(
            [CONVS[i] for i in subset], [PREFILL] * len(subset)
        )
        if prefix_reuse and len(subset) == 1:
            continue  # one row shares no prefix with anyone: a different key, see test_keys_hold_the_prefix
        assert got == [whole[i] for i in subset]
    texts = [c.text for c in generator(tiny, prefix_reuse=prefix_reuse).chat(CONVS, seed=5)]
    assert len(set(texts)) > 1
    got = [c.text for c in generator(tiny, prefix_reuse=prefix_reuse).chat(CONVS[4:0:-1], seed=5)]
    assert got == texts[4:0:-1]


REPLIES = ["yes", "a longer reply " * 25, "no", "a reply of middling length " * 4, "ok then", "z " * 70, "fine"]


def test_a_replys_logprobs_do_not_depend_on_its_call_and_come_back_from_the_cache(tiny, tmp_path):
    """Teacher-forced replies of many lengths: bit for bit the same alone (beside one other), in a subset or in a
    reordered call, and taken from the cache on a second call."""
    prompts = [c[-1]["content"] for c in CONVS]
    whole = scorer(tiny).reply_logprobs(prompts, REPLIES)
    assert len({hf.suffix_width(n - 1, hf.SCORE_STEPS) for _, n in whole}) >= 3, "replies in several buckets"
    for subset in ([3, 0], [6, 2, 4, 1], [5, 4, 3, 2, 1, 0]):
        got = scorer(tiny).reply_logprobs([prompts[i] for i in subset], [REPLIES[i] for i in subset])
        assert got == [whole[i] for i in subset]
    first = scorer(tiny, rowcache.RowCache(tmp_path))
    assert first.reply_logprobs(prompts[:4], REPLIES[:4]) == whole[:4]
    first.cache.close()
    again = scorer(tiny, rowcache.RowCache(tmp_path))
    assert again.reply_logprobs(prompts, REPLIES) == whole
    assert again.stats.cache_hits == 4 and again.stats.rows == 3


def test_keys_hold_the_prefix_and_every_setting(tiny):
    g = generator(tiny, batching="exact")
    base = g.key("prompt", 1, 0)
    assert len({base, g.key("prompt", 1, 40), g.key("prompt", 2, 0), g.key("prompt ", 1, 0)}) == 4
    assert generator(tiny, batching="exact", temperature=0.5).key("prompt", 1, 0) != base
    assert generator(tiny, batching="exact", batch_size=4).key("prompt", 1, 0) != base, "the shape fixes numbers"
    assert generator(tiny, batching="exact").key("prompt", 1, 0) == base


def test_dynamic_keys_do_not_hold_the_calls_prefix(tiny, tmp_path):
    """Under `dynamic`, a row added to a call that shortens the shared prefix leaves every other row's key as it
    was: the old rows come from the cache."""
    convs = [[{"role": "system", "content": "a long shared system prompt " * 4}, c[-1]] for c in CONVS]
    first = generator(tiny, rowcache.RowCache(tmp_path))
    first.chat(convs, seed=2)
    first.cache.close()
    again = generator(tiny, rowcache.RowCache(tmp_path))
    again.chat([*convs, CONVS[0]], seed=2)  # no system prompt: the shared prefix shrinks to the template's start
    assert again.stats.cache_hits == len(convs) and again.stats.rows == 1


def test_cached_rows_are_reused_and_new_rows_match_a_fresh_build(tiny, tmp_path):
    fresh = generator(tiny).chat(CONVS, seed=3)
    first = generator(tiny, rowcache.RowCache(tmp_path))
    assert first.chat(CONVS[:5], seed=3) == fresh[:5]
    assert first.stats.rows == 5 and first.stats.cache_hits == 0
    first.cache.close()

    again = generator(tiny, rowcache.RowCache(tmp_path))
    assert again.chat(CONVS, seed=3) == fresh, "reused rows plus new rows equal a build from an empty cache"
    assert again.stats.rows == 2 and again.stats.cache_hits == 5
    again.cache.close()
    assert generator(tiny, rowcache.RowCache(tmp_path)).chat(CONVS, seed=4) != fresh, "another seed, other keys"

    s = scorer(tiny, rowcache.RowCache(tmp_path / "s"))
    want = scorer(tiny).choice_logprobs(CONVS, [PREFILL] * len(CONVS))
    assert s.choice_logprobs(CONVS[2:], [PREFILL] * 5) == want[2:]
    s.cache.close()
    s2 = scorer(tiny, rowcache.RowCache(tmp_path / "s"))
    assert s2.choice_logprobs(CONVS, [PREFILL] * len(CONVS)) == want
    assert s2.stats.cache_hits == 5 and s2.stats.rows == 2, "two new requests (one forward row each)"


def test_duplicate_requests_run_once(tiny):
    g = generator(tiny)
    out = g.chat(CONVS[:2] * 3, seed=1)
    assert out == out[:2] * 3 and g.stats.rows == 2


def test_journal_survives_a_torn_line_and_rejects_a_corrupt_one(tmp_path):
    cache = rowcache.RowCache(tmp_path)
    cache.put([("k1", {"a": 1}), ("k2", [0.5, -1.25])])
    cache.close()
    (journal,) = tmp_path.glob("journal-*.jsonl")
    with open(journal, "a") as f:
        f.write('{"k": "k3", "v": ')  # a kill mid-write
    again = rowcache.RowCache(tmp_path)
    assert again.get("k2") == [0.5, -1.25] and again.get("k3") is None
    assert again.stats() == {"hits": 1, "misses": 1, "entries": 2}
    journal.write_text('garbage\n{"k": "k1", "v": 1}\n')
    with pytest.raises(ValueError, match=rf"{journal.name}, line 1"):
        rowcache.RowCache(tmp_path)


def test_compaction_keeps_everything_or_only_what_the_build_used(tmp_path):
    cache = rowcache.RowCache(tmp_path)
    cache.put([("old", 1), ("new", 2)])
    cache.close()
    build = rowcache.RowCache(tmp_path)
    assert build.get("new") == 2
    build.put([("newer", 3)])
    merged = build.compact()
    assert [p.name for p in tmp_path.iterdir()] == [merged.name]
    assert {json.loads(line)["k"] for line in merged.read_text().splitlines()} == {"old", "new", "newer"}
    assert build.compact() == merged, "content-named: compacting again changes nothing"

    pruned = rowcache.RowCache(tmp_path)
    assert pruned.get("newer") == 3
    kept = pruned.compact(keep_builds=1)
    assert [p.name for p in tmp_path.iterdir()] == [kept.name]
    assert rowcache.RowCache(tmp_path).entries == {"newer": 3}


def test_the_cache_keeps_what_its_last_builds_used(tmp_path):
    """However many builds a cache sees, it holds what one of the last `keep_builds` used: a row unused for that
    many builds is dropped, a row used again is kept, and nothing is lost while builds stay within the window."""
    for build, used in enumerate([["a", "b"], ["b", "c"], ["c"], ["c", "d"]], 1):
        cache = rowcache.RowCache(tmp_path)
        assert cache.build == build
        for k in used:
            if cache.get(k) is None:
                cache.put([(k, k.upper())])
        cache.compact(keep_builds=2)
    # Build 4 keeps what builds 3 and 4 used: c and d; a (build 1) and b (build 2) are gone.
    assert rowcache.RowCache(tmp_path).entries == {"c": "C", "d": "D"}
    everything = rowcache.RowCache(tmp_path)
    everything.put([("e", "E")])
    everything.compact(keep_builds=0)
    later = rowcache.RowCache(tmp_path)
    later.compact(keep_builds=2)
    assert set(rowcache.RowCache(tmp_path).entries) == {"e"}, "c, d last used two builds before: dropped"
    with pytest.raises(ValueError, match="keep_builds"):
        rowcache.RowCacheConfig(dir="x", keep_builds=-1)


def test_only_a_torn_last_line_is_dropped(tmp_path):
    """A bad line anywhere but a last line cut short (no newline after it) is an error naming file and line."""
    good = '{"k": "k1", "v": 1}'
    path = tmp_path / "journal-1-1.jsonl"
    path.write_text(f'{good}\nGARBAGE\n{{"k": "k2", "v"')
    with pytest.raises(ValueError, match=rf"{path.name}, line 2"):
        rowcache.RowCache(tmp_path)
    path.write_text(f"{good}\nGARBAGE\n")  # complete lines: written whole, so corrupt, not torn
    with pytest.raises(ValueError, match=rf"{path.name}, line 2"):
        rowcache.RowCache(tmp_path)
    path.write_text(f'{good}\n{{"k": "k2", "v"')
    assert rowcache.RowCache(tmp_path).entries == {"k1": 1}


def test_compaction_leaves_a_journal_another_process_is_writing(tmp_path):
    """compact() replaces what its cache read and wrote; a journal that appeared since (a live process) stays."""
    first = rowcache.RowCache(tmp_path)
    first.put([("a", 1)])
    first.close()
    build = rowcache.RowCache(tmp_path)
    other = rowcache.RowCache(tmp_path)  # opened at the same time, still writing when `build` compacts
    other.put([("b", 2)])
    build.put([("c", 3)])
    merged = build.compact()
    journals = sorted(p.name for p in tmp_path.glob("journal-*.jsonl"))
    assert len(journals) == 1 and merged.exists()
    other.put([("d", 4)])
    other.close()
    assert rowcache.RowCache(tmp_path).entries == {"a": 1, "b": 2, "c": 3, "d": 4}


def test_a_cached_row_carries_what_it_cost_to_make(tiny, tmp_path):
    """Each stored row records the engine seconds spent on it (a batch's time over its rows); a build that takes it
    from the cache reports that as `cached_seconds`, through compaction too; rows recorded before costs were kept
    count as unpriced."""
    first = generator(tiny, rowcache.RowCache(tmp_path))
    first.chat(CONVS, seed=3)
    first.cache.close()
    recorded = sum(first.cache.cost(k) for k in first.cache.entries)
    assert recorded == pytest.approx(first.stats.seconds, rel=1e-3) and recorded > 0
    s = scorer(tiny, rowcache.RowCache(tmp_path))
    s.choice_logprobs(CONVS, [PREFILL] * len(CONVS))
    s.cache.close()
    assert sum(s.cache.cost(k) for k in s.cache.entries) == pytest.approx(recorded + s.stats.seconds, rel=1e-3)
    rowcache.RowCache(tmp_path).compact()

    again = generator(tiny, rowcache.RowCache(tmp_path))
    again.chat(CONVS, seed=3)
    assert again.stats.rows == 0 and again.stats.cached_seconds == pytest.approx(recorded, rel=1e-3)
    assert again.stats.unpriced_cache_hits == 0 and again.stats.as_dict()["cached_seconds"] > 0

    old = tmp_path / "old"
    old.mkdir()
    key = next(iter(first.cache.entries))
    line = {"k": key, "v": first.cache.entries[key]}
    (old / "rows-old.jsonl").write_text(json.dumps(line) + "\n")
    legacy = generator(tiny, rowcache.RowCache(old))
    legacy.chat(CONVS, seed=3)
    assert legacy.stats.cache_hits == 1 and legacy.stats.unpriced_cache_hits == 1 and legacy.stats.rows == 6


def test_compaction_leaves_a_live_processs_journal_and_merges_it_once_that_process_is_gone(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        journal = tmp_path / f"journal-{writer.pid}-1.jsonl"  # that process's journal, still being appended to
        journal.write_text(json.dumps({"k": "theirs", "v": 1}) + "\n")
        build = rowcache.RowCache(tmp_path)
        build.put([("mine", 2)])
        build.compact(keep_builds=1)
        assert journal.exists(), "a journal a live process may still append to is not deleted"
        with journal.open("a") as f:
            f.write(json.dumps({"k": "later", "v": 3}) + "\n")
    finally:
        writer.kill()
        writer.wait()
    rowcache.RowCache(tmp_path).compact()
    assert not journal.exists() and rowcache.RowCache(tmp_path).entries == {"theirs": 1, "mine": 2, "later": 3}


def test_a_run_by_hand_is_no_build_and_prunes_nothing(tmp_path):
    cfg = rowcache.RowCacheConfig(dir=str(tmp_path), keep_builds=1)
    committed = rowcache.RowCache.open(cfg)
    committed.put([("committed", 1)])
    rowcache.finish(committed, cfg)
    for i in range(3):  # three hand runs, each with rows of its own, none using the committed build's
        hand = rowcache.RowCache.open(dataclasses.replace(cfg, build=False))
        assert hand.build == 2, "a hand run numbers no build"
        hand.put([(f"hand{i}", i)])
        rowcache.finish(hand, dataclasses.replace(cfg, build=False))
    rebuild = rowcache.RowCache.open(cfg)
    assert rebuild.build == 2 and rebuild.get("committed") == 1, "the committed build's rows survived"
    assert {f"hand{i}" for i in range(3)} <= set(rebuild.entries), "and the hand runs' rows were kept"


def test_the_stage_loader_marks_a_run_outside_dvc_as_no_build(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Cfg:
        out_dir: str
        row_cache: rowcache.RowCacheConfig

    cfg = Cfg("data/label", rowcache.RowCacheConfig(dir="data/label/rowcache"))
    monkeypatch.setenv("DVC_STAGE", "label")
    assert config._outside_dvc("label", cfg) == cfg, "under dvc repro: a build, written where params say"
    monkeypatch.delenv("DVC_STAGE")
    by_hand = config._outside_dvc("label", cfg)
    assert by_hand.row_cache.build is False and by_hand.out_dir == "outputs/label"
