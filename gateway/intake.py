"""The durable inbox: a received message is committed here before the gateway answers 250.

An edge over :class:`archive.db.Database`. :func:`accept` is the only thing the SMTP/LMTP
listener and the IMAP poller call; it returns only once the raw bytes are durably committed
(SQLite WAL + synchronous=FULL, or PostgreSQL synchronous commit), and raises
:class:`~formats.errors.TransientError` (451) when they could not be.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from archive import tables as t
from archive.db import Database
from archive.records import Transport
from formats.errors import TransientError


def accept(db: Database, raw: bytes, transport: Transport, *, source_key: str | None = None) -> int:
    """Commit ``raw`` durably and return its intake number.

    ``source_key`` names a fetched message's origin (``imap:user@host/INBOX/<uidvalidity>/<uid>``):
    if a message with that key was already taken in (fetched, committed, then a crash before
    it was moved), its number is returned and nothing new is stored.
    """
    try:
        with db.session() as s:
            if source_key is not None:
                known = s.scalar(select(t.Intake.id).where(t.Intake.source_key == source_key))
                if known is not None:
                    return known
            row = t.Intake(
                received_at=transport.received_at,
                transport=transport.as_dict(),
                raw=raw,
                sha256=hashlib.sha256(raw).hexdigest(),
                state="new",
                attempts=0,
                next_attempt_at=None,
                archive_seq=None,
                updated_at=transport.received_at,
                size=len(raw),
                source_key=source_key,
            )
            s.add(row)
            s.flush()
            number = row.id
    except TransientError:
        raise
    except (SQLAlchemyError, OSError) as exc:
        # Disk full, read-only file system, I/O error: not committed, so the peer must retry.
        raise TransientError(f"the message could not be stored ({type(exc).__name__})") from exc
    return number


def backoff(attempts: int) -> timedelta:
    """1, 2, 4 … minutes, at most an hour, between tries of a transiently failing message."""
    return timedelta(minutes=min(60, 2 ** max(0, attempts - 1)))
