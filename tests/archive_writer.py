"""A child process for the crash tests (tests/test_archive_crash.py): appends to the archive log
until it is killed.

Each entry's content is a function of its sequence number alone (:func:`item`), so whoever
reads the log afterwards knows exactly what every entry must hold. The writer speaks one line
per event on stdout, flushed at once, so the parent always knows what was promised::

    ready SIZE        the log held SIZE entries when this process started
    begin TARGET      a transaction started that will take the log to TARGET entries
    committed TARGET  that transaction's commit returned: TARGET entries are durable

With ``--hold`` it instead opens one transaction and never commits it, printing
``flushed COUNT`` each time another batch of uncommitted entries has been sent to the
database, until it is killed (or reaches ``--until``).

Run:  python -m tests.archive_writer DATABASE_URL MASTER_KEY_HEX --seed N [--max-batch B]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
from datetime import UTC, datetime, timedelta

from archive.blobs import BlobStore
from archive.db import Database
from archive.log import Item, Log

AT = datetime(2026, 11, 2, 3, 0, tzinfo=UTC)
AGENCIES = ("H26.SNV", "H26.STC", "H26.SYT")


def item(seq: int) -> Item:
    """Entry ``seq``: fields and a small blob (100–900 bytes) derived from ``seq`` alone."""
    return Item(
        "message",
        AT + timedelta(seconds=seq),
        {
            "n": seq,
            "agency": AGENCIES[seq % len(AGENCIES)],
            "status": "rejected" if seq % 5 == 0 else "accepted",
            "message_id": f"<{seq}@crash.test>",
        },
        {"raw": blob(seq)},
    )


def blob(seq: int) -> bytes:
    return hashlib.sha256(b"entry %d" % seq).digest() * (3 + seq % 26)


def _say(line: str) -> None:
    # A closed pipe (the parent is gone) ends the writer with BrokenPipeError: no orphan keeps
    # writing to a database nobody watches.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run(db: Database, log: Log, rng: random.Random, max_batch: int, until: int) -> None:
    with db.session() as s:
        size = log.size(s)
    _say(f"ready {size}")
    while size < until:
        batch = rng.randint(1, max_batch)
        with db.session() as s:
            size = log.size(s)  # SQLite: BEGIN IMMEDIATE, so no one appends behind our back
            _say(f"begin {size + batch}")
            log.append_many(s, [item(seq) for seq in range(size, size + batch)])
        size += batch
        _say(f"committed {size}")


def hold(db: Database, log: Log, until: int) -> None:
    with db.session() as s:
        size = log.size(s)
        _say(f"ready {size}")
        for start in range(size, until, 100):
            log.append_many(s, [item(seq) for seq in range(start, min(start + 100, until))])
            s.flush()
            _say(f"flushed {min(start + 100, until) - size}")
        raise SystemExit("hold: reached --until without being killed; rolled back")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Append to the archive log until killed.")
    parser.add_argument("url")
    parser.add_argument("master_key", help="the archive master key, 64 hex digits")
    parser.add_argument("--seed", type=int, required=True, help="for the batch sizes")
    parser.add_argument("--max-batch", type=int, default=20)
    parser.add_argument("--until", type=int, default=100_000, help="stop at this many entries")
    parser.add_argument("--hold", action="store_true", help="one transaction, never committed")
    args = parser.parse_args(argv)
    db = Database.open(args.url)
    log = Log(BlobStore(bytes.fromhex(args.master_key)))
    try:
        if args.hold:
            hold(db, log, args.until)
        else:
            run(db, log, random.Random(args.seed), args.max_batch, args.until)
    finally:
        db.dispose()


if __name__ == "__main__":
    main()
