"""The human-labels file: every format label reads, its errors, and `record`, the writer that loses nothing."""

from __future__ import annotations

import json
import multiprocessing

import polars as pl
import pytest

from caiforge import human_labels, labeling

ROWS = [{"prompt_id": "p1", "chosen": "good", "rejected": "bad", "annotator": "ann"}]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_every_format_reads_the_same_verdicts(tmp_path, fmt):
    path = tmp_path / f"labels.{fmt}"
    df = pl.DataFrame(ROWS * 2 + [{"prompt_id": "p2", "chosen": "x", "rejected": "y", "annotator": None}])
    df = df.with_columns(verdict=pl.Series([None, "prefer", "tie"]))
    {"jsonl": df.write_ndjson, "csv": df.write_csv, "parquet": df.write_parquet}[fmt](path)
    verdicts = human_labels.read(path)
    assert verdicts == {
        labeling.pair_key("p1", "bad", "good"): human_labels.Verdict("p1", "good", "bad", "prefer"),
        labeling.pair_key("p2", "y", "x"): human_labels.Verdict("p2", "x", "y", "tie"),
    }
    assert [v.is_preference for v in verdicts.values()] == [True, False]


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        ([{"prompt_id": "p1", "chosen": "good"}], r"line 1: missing field 'rejected'"),
        ([{"prompt_id": "p1", "chosen": " ", "rejected": "bad"}], r"line 1: field 'chosen' must be a non-empty"),
        (
            [{"prompt_id": "p1", "chosen": "x", "rejected": "x"}],
            r"line 1: fields 'chosen' and 'rejected' are the same",
        ),
        ([*ROWS, {"prompt_id": "p1", "chosen": "bad", "rejected": "good"}], r"line 2: .*labelled both ways"),
        ([*ROWS, {**ROWS[0], "verdict": "tie"}], r"line 2: .*labelled both ways"),
        ([{"prompt_id": 3, "chosen": "a", "rejected": "b"}], r"line 1: field 'prompt_id' must be text, got int"),
        ([{**ROWS[0], "verdict": "maybe"}], r"line 1: field 'verdict' must be one of prefer, tie, skip"),
        ([ROWS[0], "", "{not json"], r"line 3: not a JSON object"),
        ([ROWS[0], "[1, 2]"], r"line 2: not a JSON object \(found list\)"),
    ],
)
def test_errors_name_file_line_and_field(tmp_path, lines, match):
    path = tmp_path / "labels.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in lines))
    with pytest.raises(human_labels.HumanLabelsError, match=match) as err:
        human_labels.read(path)
    assert str(err.value).startswith(str(path))


def test_missing_empty_or_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="human labels file does not exist"):
        human_labels.read(tmp_path / "nope.jsonl")
    (tmp_path / "labels.txt").write_text("x")
    with pytest.raises(human_labels.HumanLabelsError, match="unsupported"):
        human_labels.read(tmp_path / "labels.txt")
    (tmp_path / "empty.jsonl").write_text("\n")
    assert human_labels.read(tmp_path / "empty.jsonl") == {}, "the shipped default: no labels yet"
    (tmp_path / "bad.csv").write_text("prompt_id,chosen\nr000,x\n")
    with pytest.raises(human_labels.HumanLabelsError, match=r"bad.csv: row 1: missing field 'rejected'"):
        human_labels.read(tmp_path / "bad.csv")


def test_record_appends_replaces_and_keeps_other_lines(tmp_path):
    path = tmp_path / "seed" / "labels.jsonl"
    path.parent.mkdir()
    hand = '{"prompt_id": "p0",  "chosen": "a", "rejected": "b", "note": "typed by hand"}'  # odd spacing, no "\n"
    path.write_text(hand)
    human_labels.record(path, {"prompt_id": "p1", "chosen": "good", "rejected": "bad", "reviewer": "ann"})
    human_labels.record(path, {"prompt_id": "p2", "chosen": "x", "rejected": "y", "verdict": "skip"})
    # Changing a verdict replaces it, in place: the opposite preference, then a tie.
    human_labels.record(path, {"prompt_id": "p1", "chosen": "bad", "rejected": "good", "reviewer": "bob"})
    lines = path.read_text().splitlines()
    assert lines[0] == hand, "a line the writer does not replace is kept byte for byte"
    assert [json.loads(line)["prompt_id"] for line in lines] == ["p0", "p1", "p2"]
    assert json.loads(lines[1]) == {"prompt_id": "p1", "chosen": "bad", "rejected": "good", "reviewer": "bob"}
    human_labels.record(path, {"prompt_id": "p1", "chosen": "good", "rejected": "bad", "verdict": "tie"})
    verdicts = human_labels.read(path)
    assert len(verdicts) == 3 and verdicts[labeling.pair_key("p1", "good", "bad")].verdict == "tie"
    assert list(path.parent.iterdir()) == [path], "no temporary file is left behind"


def test_record_refuses_a_malformed_file_and_leaves_it_untouched(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    before = path.read_bytes()
    with pytest.raises(human_labels.HumanLabelsError, match=r"labels.jsonl: line 2: not a JSON object"):
        human_labels.record(path, {"prompt_id": "p9", "chosen": "a", "rejected": "b"})
    with pytest.raises(human_labels.HumanLabelsError, match=r"new verdict: field 'verdict' must be one of"):
        human_labels.record(
            tmp_path / "other.jsonl", {"prompt_id": "p9", "chosen": "a", "rejected": "b", "verdict": 1}
        )
    with pytest.raises(human_labels.HumanLabelsError, match=r"must end in .jsonl"):
        human_labels.record(tmp_path / "labels.csv", {"prompt_id": "p9", "chosen": "a", "rejected": "b"})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.jsonl"]


def _write_many(path: str, writer: int, count: int, start) -> None:
    start.wait()
    for i in range(count):
        human_labels.record(path, {"prompt_id": f"w{writer}-{i}", "chosen": "a", "rejected": "b", "reviewer": writer})


def _read_until(path: str, stop, start) -> None:
    start.wait()
    while not stop.is_set():
        human_labels.read(path)  # raises (exit code 1) if it ever finds no file or a torn one


def test_two_processes_writing_at_once_lose_nothing_and_a_reader_always_finds_the_file(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text("")
    ctx = multiprocessing.get_context("spawn")
    start, stop = ctx.Barrier(3), ctx.Event()
    procs = [ctx.Process(target=_write_many, args=(str(path), w, 40, start)) for w in range(2)]
    reader = ctx.Process(target=_read_until, args=(str(path), stop, start))
    for p in [*procs, reader]:
        p.start()
    for p in procs:
        p.join(timeout=120)
    stop.set()
    reader.join(timeout=60)
    assert [p.exitcode for p in [*procs, reader]] == [0, 0, 0]
    ids = {v.prompt_id for v in human_labels.read(path).values()}
    assert ids == {f"w{w}-{i}" for w in range(2) for i in range(40)}, "every verdict of both writers is in the file"
