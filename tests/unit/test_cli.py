"""The `caiforge` command line, called in-process."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from caiforge import cli, config, constitution
from tests.unit.test_constitution import BASE

DEFAULT = config.ROOT / "constitutions" / "default.yaml"


def test_check_default_prints_counts(capsys):
    assert cli.main(["constitution", "check", str(DEFAULT)]) == 0
    out, err = capsys.readouterr()
    c = constitution.load(DEFAULT)
    assert err == "" and len(out.strip().splitlines()) == 1
    assert f"critique_revision {len(c.critique_revision)} (" in out
    assert f"comparison {len(c.comparison)} (" in out
    assert f"comparison_examples {len(c.comparison_examples)}" in out
    harmless = len(constitution.by_category(c.comparison, "harmlessness"))
    assert f"harmlessness {harmless}" in out
    assert all(cat in out for cat in constitution.CATEGORIES)


def test_check_duplicate_id_exits_1_and_names_it(tmp_path, capsys):
    data = copy.deepcopy(BASE)
    data["comparison"][1]["id"] = "cmp-a"
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump(data))
    assert cli.main(["constitution", "check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"error: {path}: comparison[1]: duplicate id 'cmp-a'")


def test_check_missing_file(tmp_path, capsys):
    assert cli.main(["constitution", "check", str(tmp_path / "none.yaml")]) == 1
    assert "none.yaml: no such file" in capsys.readouterr().err


def test_import_anthropic_needs_helpfulness_comparisons_and_says_how_to_add_them(anchors, tmp_path, capsys):
    folder = anchors / "anthropic-cai-prompts"
    dest = tmp_path / "constitutions" / "anthropic.yaml"
    assert cli.main(["constitution", "import", "anthropic", str(folder), str(dest)]) == 1
    err = capsys.readouterr().err
    assert f"so {dest} was not written" in err
    assert "evaluate needs at least one 'harmlessness' and one 'helpfulness' principle" in err
    assert "--fill-from constitutions/default.yaml" in err
    assert list(dest.parent.iterdir()) == [], "nothing written, no temporaries left"

    argv = ["constitution", "import", "anthropic", str(folder), str(dest), "--fill-from", str(DEFAULT)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    default = constitution.load(DEFAULT)
    helpful = constitution.by_category(default.comparison, "helpfulness")
    assert f"comparison: {len(helpful)} helpfulness" in out and "accepted by critique_revise, label, evaluate" in out
    written, imported = constitution.load(dest), constitution.import_anthropic(folder)
    assert written.critique_revision == imported.critique_revision, "critique principles are never mixed in"
    assert written.comparison == imported.comparison + tuple(helpful)
    assert cli.main(["constitution", "check", str(dest)]) == 0
    assert "accepted by critique_revise, label, evaluate" in capsys.readouterr().out


def test_import_llm_swarm_fails_without_comparisons_and_fills_them_on_request(anchors, tmp_path, capsys):
    dest = tmp_path / "grok.yaml"
    src = anchors / "llm-swarm-constitutions" / "constitution_grok.json"
    assert cli.main(["constitution", "import", "llm-swarm", str(src), str(dest)]) == 1
    err = capsys.readouterr().err
    assert f"{dest}: comparison: must have at least one entry" in err and "--fill-from" in err
    assert not dest.exists()
    assert cli.main(["constitution", "import", "llm-swarm", str(src), str(dest), "--fill-from", str(DEFAULT)]) == 0
    assert "comparison: all 18" in capsys.readouterr().out
    c = constitution.load(dest)
    assert len(c.critique_revision) == 2 and c.comparison == constitution.load(DEFAULT).comparison


def test_check_validates_what_the_stages_require(tmp_path, capsys):
    """A file whose shape is fine but which lacks a category a stage needs fails `constitution check`."""
    data = yaml.safe_load(DEFAULT.read_text())
    data["comparison"] = [p for p in data["comparison"] if p["category"] != "helpfulness"]
    kept = {p["id"] for p in data["comparison"]}
    data["comparison_examples"] = [e for e in data["comparison_examples"] if e.get("principle") in kept | {None}]
    path = tmp_path / "no-helpful.yaml"
    path.write_text(yaml.safe_dump(data))
    constitution.load(path)  # its own shape is valid
    assert cli.main(["constitution", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert "evaluate:" in err and "'helpfulness'" in err


def test_check_without_a_file_checks_the_configured_constitution(capsys):
    assert cli.main(["constitution", "check"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(str(Path("constitutions") / "default.yaml") + ": ok: default")


def test_import_refuses_to_overwrite_without_force(anchors, tmp_path, capsys):
    src = anchors / "llm-swarm-constitutions" / "constitution_grok.json"
    dest = tmp_path / "out.yaml"
    dest.write_text("keep me\n")
    fill = ["--fill-from", str(DEFAULT)]
    assert cli.main(["constitution", "import", "llm-swarm", str(src), str(dest), *fill]) == 1
    assert "--force" in capsys.readouterr().err
    assert dest.read_text() == "keep me\n"
    assert cli.main(["constitution", "import", "llm-swarm", str(src), str(dest), "--force", *fill]) == 0
    assert constitution.load(dest).name == "constitution_grok"


def test_import_of_a_bad_source_writes_nothing(tmp_path, capsys):
    dest = tmp_path / "out.yaml"
    assert cli.main(["constitution", "import", "anthropic", str(tmp_path / "nowhere"), str(dest)]) == 1
    assert "error: " in capsys.readouterr().err
    assert not dest.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv", [[], ["constitution"], ["constitution", "import", "nosuchformat", "a", "b"], ["nosuchcommand"]]
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "usage: caiforge" in capsys.readouterr().err
