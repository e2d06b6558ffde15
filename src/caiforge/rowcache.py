"""The row cache: every engine request, keyed by everything that determines its answer, kept across builds.

A key is the sha256 of a canonical JSON of the request's *key material*: the engine's identity (weights
fingerprint or served model id), dtype and device kind, every decoding or scoring setting, the batch shape the
answer was computed in, the exact rendered prompt and the row's own seed. A row is reused only on an exact key
match, so reuse never changes a result (the transformers engine computes a row in fixed shapes that do not depend
on the other rows of its call, see `caiforge.engines.hf`).

On disk a cache is a directory that DVC tracks as a persistent output of its stage (`persist: true`): pushed,
pulled and shared like any artifact, kept in place while the stage reruns, and safe to delete (the next build
recomputes what is missing). It holds JSON-lines files of `{"k": key, "v": value, "b": build, "s": seconds}`, where
`b` numbers the last build of this cache that used the entry (each completed build is the previous one's number
plus one) and `s` is the engine time the row cost the build that made it (what a row taken from the cache cost):

- while a stage runs, finished rows are appended (and flushed) to a journal of its own, so a killed run keeps them
  and the rerun resumes from there; a torn last line (no newline after it) is ignored, and any other line that is
  not an entry is an error naming the file and line;
- when the stage completes, the files it read and its own journal are compacted into one, named by its content
  hash (`rows-<hash>.jsonl`), holding the entries that one of the last `keep_builds` builds used (this one
  included; 0 keeps all): the cache stays as large as a few builds, however many builds it has seen, and
  reverting a recent edit still finds its rows. Files that appeared after it opened the cache, and journals of
  processes still running, are left for the next build to merge. A run by hand (outside `dvc repro`) is no build:
  it leaves its journal and prunes nothing.

Files are only ever created whole or appended to under a fresh name and deleted; never rewritten in place, so a
file DVC links from its cache is never modified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caiforge import io, planmode

log = logging.getLogger(__name__)

SYNC_EVERY = 2.0
"""Seconds between fsyncs of the journal (every put is flushed to the OS at once, which a killed process keeps)."""


@dataclass(frozen=True)
class RowCacheConfig:
    """Where a stage keeps its row cache (declare it in dvc.yaml as an output with `persist: true`)."""

    dir: str | None = None
    """The cache directory, e.g. data/label/rowcache; null: no cache (every request runs)."""
    keep_builds: int = 3
    """When the stage completes, keep the entries that one of the last `keep_builds` builds used (1: this build's
    only; 0: everything ever computed). Bounds the cache, and the time to read it at every start."""

    build: bool = True
    """False for a stage run by hand, outside `dvc repro` (the stage loader sets it): its rows join the cache as a
    journal that the next build merges, but the run is no build: it numbers none and prunes nothing, so hand runs
    never push out the rows the committed build uses."""

    def __post_init__(self) -> None:
        if self.keep_builds < 0:
            raise ValueError(f"row_cache.keep_builds must be >= 0, got {self.keep_builds}")


def key(material: dict[str, Any]) -> str:
    """The content address of a request: sha256 of its canonical JSON."""
    text = json.dumps(material, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class RowCache:
    """A key -> JSON value store on a directory, appended to as rows finish, compacted when the stage completes."""

    def __init__(self, directory: str | os.PathLike[str] | None) -> None:
        self.dir = Path(directory) if directory else None
        """None: in memory only (`caiforge plan` on a stage without a cache dir)."""
        self.entries: dict[str, Any] = {}
        self.costs: dict[str, float] = {}
        self.used: set[str] = set()
        self.last_build: dict[str, int] = {}
        """Key -> the number of the last completed build that used it (absent: a journal's, not yet compacted)."""
        self.build = 1
        """This build's number: one more than the newest completed build's."""
        self.hits = 0
        self.misses = 0
        self._journal: Any = None
        self._synced = 0.0
        self._read: list[Path] = []
        """The files loaded at open and this process's journal: what `compact` replaces."""
        if self.dir is None:
            return
        if self.dir.is_file():
            raise ValueError(f"{self.dir}: the row cache must be a directory, found a file")
        for path in sorted(self.dir.glob("*.jsonl")):
            self._load(path)
            self._read.append(path)
        self.build = 1 + max(self.last_build.values(), default=0)

    @classmethod
    def open(cls, cfg: RowCacheConfig) -> RowCache | None:
        """The stage's cache; under `caiforge plan`, a read-only one that counts what the build would send."""
        if planmode.active():
            return PlanCache(cfg.dir)
        return cls(cfg.dir) if cfg.dir else None

    def _load(self, path: Path) -> None:
        lines = path.read_bytes().split(b"\n")
        torn = len(lines) if lines[-1].strip() else 0  # a last line with no newline after it: a write cut short
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                self.entries.setdefault(entry["k"], entry["v"])
                if "s" in entry:
                    self.costs.setdefault(entry["k"], float(entry["s"]))
                if "b" in entry:
                    self.last_build[entry["k"]] = max(int(entry["b"]), self.last_build.get(entry["k"], 0))
            except (ValueError, KeyError, TypeError) as err:
                if number == torn:  # a killed run's journal
                    log.info("%s: ignoring an incomplete last line", path)
                    continue
                raise ValueError(f"{path}, line {number}: not a row-cache entry ({err}); delete the file") from err

    def get(self, k: str) -> Any | None:
        """The cached value of key `k`, or None; counts a hit or a miss and marks `k` as used by this build."""
        self.used.add(k)
        if k in self.entries:
            self.hits += 1
            return self.entries[k]
        self.misses += 1
        return None

    def skip(self, k: str) -> None:
        """A request that may not be answered from the cache (nothing identifies its model): counted as a miss."""
        self.misses += 1

    def cost(self, k: str) -> float | None:
        """The engine seconds the build that made row `k` spent on it (None: not recorded)."""
        return self.costs.get(k)

    def put(self, items: Iterable[tuple[str, Any]], seconds: float | None = None) -> None:
        """Store finished rows, each made in `seconds` of engine time (kept with it, see `cost`): appended to this
        run's journal, flushed to the OS before returning."""
        lines = []
        for k, value in items:
            self.entries[k] = value
            self.used.add(k)
            entry = {"k": k, "v": value}
            if seconds is not None:
                self.costs[k] = entry["s"] = round(float(seconds), 6)
            lines.append(json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n")
        if not lines:
            return
        if self._journal is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            journal = self.dir / f"journal-{os.getpid()}-{time.time_ns()}.jsonl"
            self._journal = open(journal, "a", encoding="utf-8")  # noqa: SIM115 (kept open across puts)
            self._read.append(journal)
        self._journal.write("".join(lines))
        self._journal.flush()  # in the OS's hands: survives a SIGKILL of this process
        if time.monotonic() - self._synced > SYNC_EVERY:  # and, every few seconds, a crash of the machine
            os.fsync(self._journal.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        if self._journal is not None:
            os.fsync(self._journal.fileno())
            self._journal.close()
            self._journal = None

    def compact(self, keep_builds: int = 0) -> Path | None:
        """Merge the files this cache read or wrote into one content-named file, with the entries one of the last
        `keep_builds` builds used (0: all); returns its path. Files another process added since this cache opened
        stay. Entries of a journal no build completed count as this build's."""
        self.close()
        last = {
            k: self.build if k in self.used or k not in self.last_build else self.last_build[k] for k in self.entries
        }
        keep = {k: v for k, v in self.entries.items() if not keep_builds or last[k] > self.build - keep_builds}
        # Another live process's journal stays where it is: it may still be appending (the next build merges it).
        old = [path for path in self._read if path.exists() and not _live_journal(path)]
        if not keep and not old:
            return None
        body = "".join(
            json.dumps(
                {"k": k, "v": keep[k], "b": last[k], **({"s": self.costs[k]} if k in self.costs else {})},
                ensure_ascii=False,
                separators=(",", ":"),
            )
            + "\n"
            for k in sorted(keep)
        )
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"rows-{hashlib.sha256(body.encode()).hexdigest()[:16]}.jsonl"
        if not final.exists():
            tmp = self.dir / f".{final.name}.tmp"
            tmp.write_text(body, encoding="utf-8")
            os.replace(tmp, final)
        for path in old:
            if path != final:
                path.unlink()
        self._read = [final]
        for stale in self.dir.glob(".*.tmp"):
            stale.unlink()
        return final

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "entries": len(self.entries)}


class PlanCache(RowCache):
    """A row cache that is only read: misses are counted (as `send` or `depends`), stored in memory only."""

    def __init__(self, directory: str | None) -> None:
        super().__init__(directory if directory and Path(directory).is_dir() else None)
        self.depends: set[str] = set()
        """Keys of requests that depend on what this build has yet to produce (marked by the plan engines)."""
        self.counts = planmode.Counts()
        planmode.CACHES.append(self)

    def get(self, k: str) -> Any | None:
        value = super().get(k)
        if value is not None:
            self.counts.cached += 1
        elif k in self.depends:
            self.counts.depends += 1
        else:
            self.counts.send += 1
        return value

    def skip(self, k: str) -> None:
        super().skip(k)
        self.counts.send += 1

    def put(self, items: Any, seconds: float | None = None) -> None:
        for k, value in items:
            self.entries[k] = value  # a later call of the same run would find it, as in a real build

    def compact(self, keep_builds: int = 0) -> Path | None:
        return None


def _live_journal(path: Path) -> bool:
    """`path` is the journal of another process that is still running (named journal-<pid>-<ns>.jsonl)."""
    parts = path.name.split("-")
    if len(parts) != 3 or parts[0] != "journal" or not parts[1].isdigit() or int(parts[1]) == os.getpid():
        return False
    return io.process_alive(int(parts[1]))


def finish(cache: RowCache | None, cfg: RowCacheConfig) -> dict[str, int] | None:
    """A stage's last step once its outputs are written: the cache's counts, then compaction (and pruning); a run
    that is no build (`cfg.build` false) only closes its journal."""
    if cache is None:
        return None
    stats = cache.stats()
    if cfg.build:
        cache.compact(keep_builds=cfg.keep_builds)
    else:
        cache.close()
    return stats
