"""Atomic writes and the clean-up of what a killed run leaves."""

from __future__ import annotations

import pytest

from caiforge import io


def test_a_failed_write_leaves_nothing_and_stale_temporaries_are_removed(tmp_path):
    with pytest.raises(RuntimeError), io.atomic_path(tmp_path / "out" / "x.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert list((tmp_path / "out").iterdir()) == []

    # What SIGKILL leaves: atomic_path's temporary directories, and the row cache's temporary files.
    stale = [tmp_path / "out" / ".model.k2j3.tmp", tmp_path / "out" / "rowcache" / ".rows-ab.jsonl.tmp"]
    stale[0].mkdir(parents=True)
    (stale[0] / "model.safetensors").write_bytes(b"partial")
    stale[1].parent.mkdir()
    stale[1].write_text("partial")
    keep = [tmp_path / "out" / "model.tmp", tmp_path / "out" / "rowcache" / "rows-ab.jsonl"]
    for path in keep:
        path.write_text("real")
    assert io.remove_stale_temporaries(tmp_path / "out") == sorted(stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)
    assert io.remove_stale_temporaries(tmp_path / "missing") == []
