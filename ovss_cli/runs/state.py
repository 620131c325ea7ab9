"""What a ``segment`` run has done, kept under ``OUT/.ovss/`` so that a run killed at any
moment (SIGKILL included) finishes by running the same command again, and shards merge.

- ``run.json``: the run's identity (vocabulary, method, model, weights, options, formats). A
  resumed run must have the same one; ``--overwrite`` starts afresh.
- ``<writer>.sqlite``: one SQLite file per writing process (``main``, ``shard-1-of-3``,
  ``main.rank-0-of-2``, ...): a row per input with its manifest line and COCO regions,
  committed only after the input's files are in place (so a row means complete outputs).
  Rows carry the input's position in the run's order and the run's *generation*: a run marks
  every input it meets (processed, or already done) with its own generation, and the final
  ``manifest.jsonl`` / ``coco.json`` are the rows of that generation, in position order.
- ``final.json``: the generation and writers of the last completed run (what ``ovss merge``
  reads).
- ``lock``: an exclusive ``flock`` held while a run writes (released by the OS if it dies).
"""
from __future__ import annotations

import contextlib
import heapq
import json
import os
import secrets
import shutil
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import UsageError
from ..io.atomic import atomic_write_text, remove_stale_temps, storage_error
from ..io.jsontext import dumps

STATE_DIR = ".ovss"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    rel BLOB PRIMARY KEY,
    pos INTEGER NOT NULL,
    gen TEXT NOT NULL,
    ok INTEGER NOT NULL,
    files TEXT NOT NULL,
    manifest TEXT NOT NULL,
    image TEXT,
    annotations TEXT,
    seconds REAL
);
CREATE INDEX IF NOT EXISTS records_by_generation ON records (gen, pos);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_COLUMNS = "rel, pos, gen, ok, files, manifest, image, annotations, seconds"
_PENDING_LIMIT = 512  # generation marks of done inputs written per transaction


@dataclass
class Record:
    """One input's row: where it stands in the run and what the final files say about it."""

    rel: str
    pos: int
    gen: str
    ok: bool
    files: list[str]  # output files, relative to the output folder
    manifest: dict[str, Any]  # its manifest.jsonl line
    image: dict[str, Any] | None = None  # its COCO image entry, without the id
    annotations: list[dict[str, Any]] | None = None  # its COCO annotations, without ids
    seconds: float = 0.0

    def row(self) -> tuple:
        return (rel_key(self.rel), self.pos, self.gen, int(self.ok), dumps(self.files),
                dumps(self.manifest, separators=(",", ":")), None if self.image is None else dumps(self.image),
                None if self.annotations is None else json.dumps(self.annotations), self.seconds)

    @classmethod
    def from_row(cls, row: tuple) -> "Record":
        rel, pos, gen, ok, files, manifest, image, annotations, seconds = row
        return cls(bytes(rel).decode("utf-8", "surrogateescape"), int(pos), gen, bool(ok), json.loads(files),
                   json.loads(manifest),
                   None if image is None else json.loads(image),
                   None if annotations is None else json.loads(annotations), float(seconds or 0.0))


def rel_key(rel: str) -> bytes:
    """An input's key in the state files: its relative path's bytes (file names need not be
    valid UTF-8)."""
    return rel.encode("utf-8", "surrogateescape")


def state_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / STATE_DIR


def read_identity(out_dir: str | Path) -> dict[str, Any] | None:
    """The identity a folder's runs were made with (None: no ovss run wrote it)."""
    path = state_dir(out_dir) / "run.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))["identity"]


def identity_differences(found: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    """Short lines naming what differs: ``"vocabulary.classes: ... before, ... now"``; for lists,
    what was added and removed."""
    lines = []
    for key in sorted(set(found) | set(wanted)):
        a, b = found.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += identity_differences(a, b, f"{prefix}{key}.")
        elif isinstance(a, list) and isinstance(b, list) and a != b:
            gone = [x for x in a if x not in b]
            new = [x for x in b if x not in a]
            change = "; ".join(part for part in (f"now without {_short(gone)}" if gone else "",
                                                 f"now with {_short(new)}" if new else "") if part)
            lines.append(f"{prefix}{key}: {change or 'reordered'}")
        elif a != b:
            lines.append(f"{prefix}{key}: {_short(a)} before, {_short(b)} now")
    return lines


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_identity(out_dir: Path, identity: dict[str, Any], what: str = "this run") -> None:
    """Refuse to mix runs: a folder holding another run's outputs is an error naming the
    difference."""
    found = read_identity(out_dir)
    if found is None or found == identity:
        return
    diff = identity_differences(found, identity)
    shown = "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")
    raise UsageError(f"{out_dir} holds the outputs of a run with other settings than {what} ({shown}); "
                     "use another --out, or --overwrite to redo everything")


class RunLock:
    """An exclusive lock on an output folder for the length of a run."""

    def __init__(self, out_dir: Path):
        self.path = state_dir(out_dir) / "lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = self._take(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644))
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def check_free(self) -> None:
        """Fail now, as :meth:`acquire` would, if another run holds the lock (creates nothing:
        for a check before a model loads; the run still takes the lock itself)."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return
        os.close(self._take(fd))

    def _take(self, fd: int) -> int:
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(f"{self.path.parent.parent} is being written by another ovss run (pid {holder}); "
                             "wait for it to finish, or choose another --out") from None
        return fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def prepare(out_dir: Path, identity: dict[str, Any], overwrite: bool) -> None:
    """Set a folder up for a run with ``identity``: check (or, with ``overwrite``, clear) the
    state of earlier runs, remove temp files a killed run left, and record the identity. Call
    with the folder's lock held."""
    folder = state_dir(out_dir)
    remove_stale_temps(out_dir)
    if overwrite:
        remove_published(out_dir)
        for path in folder.glob("*"):
            if path.name != "lock":
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    else:
        check_identity(out_dir, identity)
        # Until this run completes, the folder holds no finished run: an interrupted re-run must
        # not leave the last run's manifest, COCO file or final.json (which `ovss merge` trusts)
        # beside rows it has re-tagged. The end of the run writes them again.
        for name in ("manifest.jsonl", "coco.json", f"{STATE_DIR}/final.json"):
            with contextlib.suppress(FileNotFoundError):
                (Path(out_dir) / name).unlink()
    if read_identity(out_dir) is None:
        atomic_write_text(folder / "run.json", json.dumps({"identity": identity}, indent=2, sort_keys=True) + "\n")


def remove_published(out_dir: str | Path) -> int:
    """Delete what earlier runs published in ``out_dir`` (every file their rows name, and the
    run-wide ``manifest.jsonl`` / ``coco.json``), so that ``--overwrite`` leaves no stale output
    beside the new run's; returns how many files were removed."""
    out_dir = Path(out_dir)
    folder = state_dir(out_dir)
    if read_identity(out_dir) is None and not any(folder.glob("*.sqlite")):
        return 0  # no ovss run wrote here: nothing of ours to remove
    names: set[str] = {"manifest.jsonl", "coco.json"}
    for path in sorted(folder.glob("*.sqlite")):
        db = _connect(path, read_only=True)
        try:
            for (files,) in db.execute("SELECT files FROM records"):
                names.update(json.loads(files))
        except sqlite3.Error:  # an unreadable state file: its outputs are overwritten as met
            pass
        finally:
            db.close()
    removed = 0
    for name in sorted(names):
        with contextlib.suppress(FileNotFoundError):
            (out_dir / name).unlink()
            removed += 1
    return removed


def create_writers(out_dir: str | Path, writers: Iterable[str]) -> None:
    """Create every writer's state file with its schema (rank 0, before the other ranks start,
    so no rank ever opens another's file half-created)."""
    folder = state_dir(out_dir)
    for writer in writers:
        _connect(folder / f"{writer}.sqlite").close()


def count_rows(out_dir: str | Path, writer: str, generation: str) -> int:
    """How many inputs ``writer`` recorded in ``generation`` (0 when its file is missing)."""
    path = state_dir(out_dir) / f"{writer}.sqlite"
    if not path.is_file():
        return 0
    db = _connect(path, read_only=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM records WHERE gen = ?", (generation,)).fetchone()[0])
    finally:
        db.close()


def new_generation() -> str:
    return secrets.token_hex(8)


class RunState:
    """One writing process's view of the state: its own SQLite file (rows it writes) and the
    other writers' files (rows it may reuse). Safe to use from a reader and a writer thread."""

    def __init__(self, out_dir: str | Path, writer: str, generation: str):
        self.out_dir = Path(out_dir)
        self.writer = writer
        self.generation = generation
        folder = state_dir(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = _connect(folder / f"{writer}.sqlite")
        self._others = [(p, _connect(p, read_only=True)) for p in sorted(folder.glob("*.sqlite"))
                        if p.stem != writer]
        self._pending: list[tuple[str, int, str]] = []
        self.reused = 0  # inputs found complete (here or in another writer's file)

    def done(self, rel: str, pos: int) -> bool:
        """Whether ``rel`` already has complete outputs (a successful row whose files exist);
        if so it joins this run's generation at ``pos``."""
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM records WHERE rel = ? AND ok = 1", (rel_key(rel),)).fetchone()
            if row is not None and self._files_exist(row):
                self._pending.append((self.generation, pos, rel_key(rel)))
                if len(self._pending) >= _PENDING_LIMIT:
                    self._flush()
                self.reused += 1
                return True
            for _, other in self._others:
                row = other.execute(f"SELECT {_COLUMNS} FROM records WHERE rel = ? AND ok = 1",
                                    (rel_key(rel),)).fetchone()
                if row is not None and self._files_exist(row):
                    record = Record.from_row(row)
                    record.pos, record.gen = pos, self.generation
                    self._db.execute(f"INSERT OR REPLACE INTO records ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
                                     record.row())
                    self._db.commit()
                    self.reused += 1
                    return True
        return False

    def _files_exist(self, row: tuple) -> bool:
        return all((self.out_dir / f).is_file() for f in json.loads(row[4]))

    def _flush(self) -> None:
        if self._pending:
            self._db.executemany("UPDATE records SET gen = ?, pos = ? WHERE rel = ?", self._pending)
            self._db.commit()
            self._pending.clear()

    def record(self, record: Record) -> None:
        """Store an input's row (its files must already be in place), durably; a full or
        read-only disk is an :class:`~ovss_cli.errors.OutputError`."""
        record.gen = self.generation
        with self._lock:
            try:
                self._flush()
                self._db.execute(f"INSERT OR REPLACE INTO records ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
                                 record.row())
                self._db.commit()
            except (sqlite3.Error, OSError) as error:
                fatal = storage_error(error, self.out_dir)
                if fatal is None:
                    raise
                with contextlib.suppress(sqlite3.Error):
                    self._db.rollback()
                raise fatal from None

    def finish(self) -> None:
        """Everything this process met is marked with the generation."""
        with self._lock:
            self._flush()

    def close(self) -> None:
        with self._lock:
            with contextlib.suppress(sqlite3.Error):  # unsaved marks are only redone by the next run
                self._flush()
            self._db.close()
            for _, other in self._others:
                other.close()


class StateReader:
    """Read-only view of every writer's rows (for ``--dry-run``): what an input's status is."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self._dbs = [_connect(p, read_only=True) for p in sorted(state_dir(out_dir).glob("*.sqlite"))]

    def status(self, rel: str) -> str:
        """``done`` (complete outputs), ``failed`` (failed before: retried) or ``new``."""
        failed = False
        for db in self._dbs:
            for files, ok in db.execute("SELECT files, ok FROM records WHERE rel = ?", (rel_key(rel),)):
                if ok and all((self.out_dir / f).is_file() for f in json.loads(files)):
                    return "done"
                failed = failed or not ok
        return "failed" if failed else "new"

    def close(self) -> None:
        for db in self._dbs:
            db.close()


def _connect(path: Path, read_only: bool = False) -> sqlite3.Connection:
    if read_only:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, timeout=60)
    else:
        db = sqlite3.connect(path, check_same_thread=False, timeout=60)
        db.execute("PRAGMA synchronous = NORMAL")
        db.executescript(_SCHEMA)
        db.commit()
    return db


def records(out_dir: str | Path, writers: Iterable[str], generation: str) -> Iterator[Record]:
    """The rows of ``generation`` from the writers' files, in position order (streamed: a
    merge of per-file sorted queries, so memory stays flat)."""
    folder = state_dir(out_dir)
    connections = [_connect(folder / f"{w}.sqlite", read_only=True) for w in writers
                   if (folder / f"{w}.sqlite").is_file()]
    try:
        cursors = [db.execute(f"SELECT {_COLUMNS} FROM records WHERE gen = ? ORDER BY pos", (generation,))
                   for db in connections]
        for row in heapq.merge(*cursors, key=lambda r: r[1]):
            yield Record.from_row(row)
    finally:
        for db in connections:
            db.close()


def write_final(out_dir: str | Path, generation: str, writers: list[str]) -> None:
    """Record which generation and writers make up the folder's completed run."""
    atomic_write_text(state_dir(out_dir) / "final.json",
                      json.dumps({"generation": generation, "writers": writers}, indent=2) + "\n")


def read_final(out_dir: str | Path) -> tuple[str, list[str]] | None:
    path = state_dir(out_dir) / "final.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data["generation"], list(data["writers"])


@contextlib.contextmanager
def locked(out_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold the folder's lock (see :class:`RunLock`) for a block."""
    lock = RunLock(out_dir)
    if enabled:
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
