"""Crash tests: kill -9 a writer at random moments; the log keeps exactly what was committed.

A child process (tests/archive_writer.py) appends entries whose content follows from their
sequence number, in transactions of random sizes, and reports each transaction's start and
commit on stdout. The parent kills it with SIGKILL at random moments — right after a commit was
reported, right after a transaction began, or after a random delay — and restarts it on the
same database. After every kill the log must hold exactly what was reported committed, or that
plus the one transaction whose commit returned before its report could be printed; nothing
else. At the end `verify` must find no problem, and every entry and blob must be exactly the
one its number says.

SIGKILL ends the process, not the machine: the operating system still writes what the process
had handed it. Surviving a power cut rests on the durability settings that
:meth:`archive.db.Database.open` asserts (WAL + synchronous=FULL; synchronous_commit=on).

The random choices come from one seed, printed in every failure message; rerun a failure with
``ARCHIVE_CRASH_SEED=<seed>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from archive import merkle
from archive import tables as t
from archive.blobs import BlobStore
from archive.db import Database
from archive.log import Log
from archive.verify import verify
from tests.archive_writer import blob, item

pytestmark = pytest.mark.slow  # about 12 s: two dozen writer processes started and killed

ROOT = Path(__file__).resolve().parent.parent
SEED = int(os.environ.get("ARCHIVE_CRASH_SEED", "61962"))
KILLS = 12
MAX_BATCH = 20
TIMEOUT = 60.0  # for any one line from a child (its start-up imports included)
MODES = ("after a reported commit", "after a transaction began", "after a random delay")


class Child:
    """A running tests/archive_writer.py, its stdout lines read by a thread."""

    def __init__(self, url: str, key: bytes, err: Path, *args: str) -> None:
        self.err = err
        with err.open("w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.archive_writer", url, key.hex(), *args],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                self._queue.put(line.strip())
        self._queue.put(None)

    def wait_for(self, word: str, count: int = 1) -> str:
        """Read lines until the ``count``-th one that starts with ``word``; return it."""
        seen = 0
        while True:
            try:
                line = self._queue.get(timeout=TIMEOUT)
            except queue.Empty:
                self.kill()
                raise AssertionError(f"writer silent for {TIMEOUT} s; {self.stderr()}") from None
            if line is None:
                raise AssertionError(f"writer ended unexpectedly; {self.stderr()}")
            self.lines.append(line)
            if line.split()[0] == word:
                seen += 1
                if seen == count:
                    return line

    def kill(self) -> None:
        """SIGKILL, then collect every line it managed to print."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=TIMEOUT)
        while (line := self._queue.get(timeout=TIMEOUT)) is not None:
            self.lines.append(line)

    def last(self, word: str) -> int | None:
        values = [int(line.split()[1]) for line in self.lines if line.split()[0] == word]
        return values[-1] if values else None

    def stderr(self) -> str:
        return f"its stderr:\n{self.err.read_text()[-3000:]}"


@pytest.fixture
def key() -> bytes:
    return hashlib.sha256(b"crash-test master key").digest()


@pytest.fixture
def spawn() -> Iterator[Callable[..., Child]]:
    """Start writers; any still running when the test ends (it failed) is killed."""
    children: list[Child] = []

    def start(url: str, key: bytes, err: Path, *args: str) -> Child:
        children.append(Child(url, key, err, *args))
        return children[-1]

    yield start
    for child in children:
        if child.proc.poll() is None:
            child.kill()


def _size(url: str) -> int:
    db = Database.open(url)  # a fresh open each time: SQLite recovers its WAL here
    try:
        with db.session() as s:
            return Log().size(s)
    finally:
        db.dispose()


def test_killed_writers_lose_nothing_committed_and_leave_nothing_half_written(
    database_url: str, key: bytes, tmp_path: Path, spawn: Callable[..., Child]
) -> None:
    rng = random.Random(SEED)
    Database.open(database_url).dispose()  # the schema, before any writer can be killed
    committed = 0
    outcomes: list[str] = []
    for kill in range(KILLS):
        mode = MODES[kill % len(MODES)] if kill < len(MODES) else rng.choice(MODES)
        where = f"seed {SEED}, kill {kill} {mode}"
        child = spawn(
            database_url,
            key,
            tmp_path / f"writer{kill}.err",
            f"--seed={rng.randrange(2**32)}",
            f"--max-batch={MAX_BATCH}",
        )
        ready = int(child.wait_for("ready").split()[1])
        assert ready == committed, f"{where}: the writer found {ready} entries, not {committed}"
        if mode == MODES[0]:
            child.wait_for("committed", rng.randint(1, 8))
        elif mode == MODES[1]:
            child.wait_for("begin", rng.randint(1, 8))
        else:
            time.sleep(rng.uniform(0.0, 0.15))
        child.kill()

        reported = child.last("committed") or ready
        begun = child.last("begin") or ready
        size = _size(database_url)
        assert size >= reported, f"{where}: {reported} entries were committed, {size} remain"
        assert size in (reported, begun), (
            f"{where}: the log holds {size} entries; the writer had committed {reported} "
            f"and begun a transaction to {begun}: {child.lines[-4:]}"
        )
        outcomes.append(
            "no transaction reported open"
            if begun == reported
            else "commit done, report not printed"
            if size == begun
            else "transaction cut off"
        )
        committed = size
    assert committed > 0, f"seed {SEED}: no writer ever committed ({outcomes})"
    print(f"seed {SEED}: kills ended {outcomes}")  # shown if a later check fails
    _check_log(database_url, key, committed, f"seed {SEED}, kills ended {outcomes}")


def test_a_writer_killed_inside_a_long_transaction_leaves_the_log_as_it_was(
    database_url: str, key: bytes, tmp_path: Path, spawn: Callable[..., Child]
) -> None:
    db = Database.open(database_url)
    log = Log(BlobStore(key))
    with db.session() as s:
        log.append_many(s, [item(seq) for seq in range(37)])
    before = _dump(db)
    db.dispose()

    child = spawn(database_url, key, tmp_path / "writer.err", "--seed=0", "--hold")
    child.wait_for("ready")
    wal = Path(database_url.removeprefix("sqlite:///") + "-wal")
    sqlite = database_url.startswith("sqlite")
    # Let the uncommitted transaction grow to 2,000 entries and more, until SQLite has had to
    # write some of it to the WAL file (its page cache is 2 MB): the kill then leaves
    # uncommitted frames on disk, which recovery must ignore.
    for flushes in range(1, 200):
        child.wait_for("flushed")
        if flushes >= 20 and not (sqlite and wal.stat().st_size < 3e6):
            break
    child.kill()
    if sqlite:
        assert wal.stat().st_size >= 3e6, "the uncommitted transaction never reached the disk"

    db = Database.open(database_url)
    try:
        assert _dump(db) == before, f"{flushes * 100} uncommitted entries changed the log"
    finally:
        db.dispose()
    _check_log(database_url, key, 37, "after a kill inside one transaction")


def _check_log(url: str, key: bytes, size: int, where: str) -> None:
    db = Database.open(url)
    log = Log(BlobStore(key))
    try:
        with db.session() as s:
            report = verify(s, log.blobs, [], check_blobs=True)
            assert report.problems == [], where
            assert (report.entries, report.blobs, log.size(s)) == (size, size, size), where
            nodes = s.scalar(select(func.count()).select_from(t.LogNode))
            assert nodes == 2 * size - size.bit_count(), f"{where}: stray tree nodes"
            leaves: list[bytes] = []
            for seq, record in _entries(s):
                assert seq == len(leaves), f"{where}: entry {len(leaves)} is missing"
                want = item(seq)
                fields = json.loads(record)
                address = hashlib.sha256(blob(seq)).hexdigest()
                assert fields == {
                    **want.fields,
                    "seq": seq,
                    "kind": want.kind,
                    "at": fields["at"],
                    "blobs": {"raw": address},
                }, f"{where}: entry {seq} is not what was written"
                assert datetime.fromisoformat(fields["at"]) == want.at, f"{where}: entry {seq}"
                assert log.blobs.get(s, address) == blob(seq), f"{where}: blob of entry {seq}"
                leaves.append(merkle.leaf_hash(record))
            assert merkle.root_of(leaves) == log.root(s) == report.root, where
    finally:
        db.dispose()


def _entries(s: Any) -> Iterator[tuple[int, bytes]]:
    rows = s.execute(select(t.LogEntry.seq, t.LogEntry.record).order_by(t.LogEntry.seq))
    for seq, record in rows:
        yield seq, bytes(record)


def _dump(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the log's tables, in key order."""
    out = {}
    with db.session() as s:
        for name in ("log_head", "log_entries", "log_nodes", "blobs", "data_keys"):
            table = t.Base.metadata.tables[name]
            rows = s.execute(select(table).order_by(*table.primary_key.columns))
            out[name] = [tuple(row) for row in rows]
    return out
