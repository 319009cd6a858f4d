"""Pipeline workers: take messages from the durable inbox, decide, file, and mark them done.

Exactly-once in the archive (DESIGN §5 rule 8): filing the entry, recording its replay keys and
marking the inbox row done happen in ONE transaction, so a crash anywhere leaves the row either
untouched (it is processed again) or done with its archive entry — never filed twice, never
lost. A duplicate (same sender and Message-ID, or same signer and payload) is not filed again:
its row points at the original entry, whose receipt is sent again.

The pipeline itself (decryption, verification, XML) runs outside any transaction: it is the
slow part, and it is pure.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy.orm import Session

from archive import tables as t
from archive.records import Transport
from archive.service import Archive
from gateway import intake
from gateway.filing import message_item
from gateway.pipeline import Context, process
from gateway.verdict import Verdict


@dataclass(frozen=True)
class Outcome:
    intake_id: int
    disposition: str  # accepted | rejected | quarantined | retry | duplicate
    archive_seq: int | None


def replay_keys(verdict: Verdict) -> list[str]:
    """The keys that identify a submission a second time (DESIGN §5 rule 3)."""
    keys = []
    if verdict.from_addr and verdict.message_id:
        keys.append(_key("sender", verdict.from_addr.lower(), verdict.message_id))
    if verdict.signer is not None and verdict.opened is not None:
        signer = hashlib.sha256(verdict.signer.cert.public_bytes(Encoding.DER)).hexdigest()
        payload = hashlib.sha256(verdict.opened.payload).hexdigest()
        keys.append(_key("signed", signer, payload))
    return keys


def _key(kind: str, *parts: str) -> str:
    return f"{kind}:" + hashlib.sha256("\x00".join(parts).encode()).hexdigest()


@dataclass
class Worker:
    archive: Archive
    context: Callable[[], Context]
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)

    def run_once(self, limit: int = 50) -> list[Outcome]:
        """Process what is waiting now; returns what happened to each message."""
        db = self.archive.db
        with db.session(read_only=True) as s:
            waiting = [
                (r.id, r.raw, r.received_at, Transport.from_dict(r.transport))
                for r in intake.pending(s, self.clock(), limit)
            ]
        ctx = self.context()
        return [
            self._one(number, raw, received, transport, ctx)
            for number, raw, received, transport in waiting
        ]

    def _one(
        self, number: int, raw: bytes, received: datetime, transport: Transport, ctx: Context
    ) -> Outcome:
        verdict = process(raw, ctx, at=received)
        with self.archive.db.session() as s:
            row = s.get(t.Intake, number)
            if row is None or row.state == "done":
                return Outcome(number, "done-elsewhere", row.archive_seq if row else None)
            now = self.clock()
            if verdict.disposition == "retry":
                row.state, row.attempts = "retry", row.attempts + 1
                row.next_attempt_at = now + intake.backoff(row.attempts)
                row.updated_at = now
                return Outcome(number, "retry", None)
            # Only an authenticated sender can claim a Message-ID or a payload: a forgery that
            # reuses them must not suppress (or be suppressed by) the genuine message.
            authenticated = verdict.agency is not None and verdict.signer is not None
            keys = replay_keys(verdict) if authenticated else []
            original = self._seen(s, keys)
            if original is not None:
                _done(row, original, now)
                return Outcome(number, "duplicate", original)
            [entry] = self.archive.file_in(s, [message_item(verdict, raw, transport)], at=now)
            for key in keys:
                s.add(t.Seen(key=key, archive_seq=entry.seq))
            _done(row, entry.seq, now)
            return Outcome(number, verdict.disposition, entry.seq)

    def _seen(self, s: Session, keys: list[str]) -> int | None:
        for key in keys:
            row = s.get(t.Seen, key)
            if row is not None:
                return row.archive_seq
        return None


def _done(row: t.Intake, seq: int, now: datetime) -> None:
    row.state, row.archive_seq, row.updated_at = "done", seq, now
