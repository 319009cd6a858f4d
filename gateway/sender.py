"""The sender: hands what the outbox holds to the relay, and records what the relay said.

Part of :mod:`gateway.outbound` (step 3): ``ready`` rows go to the relay; 250 → ``sent``, 4xx or
no connection → ``retry`` with backoff, 5xx or too old → ``failed`` and the admin is alerted;
each final state is filed as an ``outcome`` entry. A failure is never recorded as sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select

from archive import tables as t
from archive.log import Item
from archive.service import Archive
from gateway.outbound import Attempt, Deliver, alert, backoff, claim

log = logging.getLogger("gateway.sender")


@dataclass
class Sender:
    archive: Archive
    deliver: Deliver
    clock: Callable[[], datetime]
    name: str
    admin: str = ""
    give_up_after: timedelta = timedelta(hours=48)

    def run_once(self, limit: int = 20) -> list[tuple[int, str]]:
        """Send what is ready; returns (outbox id, new state) for each row handled."""
        db = self.archive.db
        with db.session() as s:
            ids = claim(s, self.name, self.clock(), limit, sending=True)
        if not ids:
            return []
        with db.session(read_only=True) as s:
            jobs = [
                (r.id, r.message, r.mail_from, tuple(r.rcpt_to or ()))
                for r in s.scalars(
                    select(t.Outbox).where(t.Outbox.id.in_(ids)).order_by(t.Outbox.id)
                )
            ]
        results = []
        for number, message, mail_from, rcpt_to in jobs:
            assert message is not None and mail_from is not None
            attempt = self.deliver(message, mail_from, rcpt_to)
            results.append((number, attempt))
        return self._record(results)

    def _record(self, results: list[tuple[int, Attempt]]) -> list[tuple[int, str]]:
        now = self.clock()
        out = []
        with self.archive.db.session() as s:
            items = []
            for number, attempt in results:
                row = s.get(t.Outbox, number)
                if row is None or row.state != "sending" or row.worker != self.name:
                    continue
                row.attempts += 1
                row.last_reply, row.worker, row.lease_until, row.updated_at = (
                    attempt.reply[:2000],
                    None,
                    None,
                    now,
                )
                state = attempt.outcome
                if state == "retry" and now - row.created_at >= self.give_up_after:
                    state = "failed"
                if state == "retry":
                    row.state, row.next_attempt_at = "retry", now + backoff(row.attempts)
                    log.warning(
                        "outbox %s (%s) will be retried: %s", row.id, row.key, attempt.reply
                    )
                else:
                    row.state = state
                    items.append(
                        Item(
                            "outcome",
                            now,
                            {
                                "for_seq": row.entry_seq,
                                "outbox": row.key,
                                "status": state,
                                "reply": row.last_reply,
                                "attempts": row.attempts,
                            },
                            {},
                        )
                    )
                    if state == "failed":
                        log.error("outbox %s (%s) failed: %s", row.id, row.key, attempt.reply)
                        if row.kind != "alert" and self.admin:
                            s.add(alert(row.key, f"{row.kind} {row.key}: {attempt.reply}", now))
                out.append((number, row.state))
            if items:
                self.archive.file_in(s, items, at=now)
        return out
