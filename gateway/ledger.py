"""What the compliance status is computed from, read out of the archive (an edge).

Message entries are found through the log's search columns (kind, status, period, category:
indexed, and checked against the hashed records by `archive verify`); only the entry's record
(its JSON fields) is read, never a blob, and turned into the values of
:mod:`gateway.compliance`. Every function takes an open session; time is an argument.

Reading the archive is itself logged (DESIGN §5 rule 6): :func:`log_read` adds a ``read``
entry, and :func:`record_deemed_consent` files a ``deemed-consent`` entry per (request,
addressee) whose deadline passed unanswered, once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from archive import tables as t
from archive.log import Entry, Log
from archive.records import read_item
from gateway import paper
from gateway.adhoc import Reply, Request, RequestStatus, deemed_consent_item
from gateway.compliance import Submission

#: A message entry counts for compliance when the sender was authenticated (DESIGN §5 rule 2).
COUNTED = ("accepted", "rejected")
_BATCH = 5_000


def _records(s: Session, query: Select[int, bytes]) -> Iterator[tuple[int, dict[str, Any]]]:
    for seq, record in s.execute(query.execution_options(yield_per=_BATCH)):
        yield seq, json.loads(record)


def submissions(
    s: Session, periods: Sequence[str], *, agency: str | None = None
) -> list[Submission]:
    """Accepted and rejected message entries, and reports recorded as received on paper
    (:mod:`gateway.paper`; one withdrawn is counted until it was), for the periods ``periods``
    (YYYY-MM)."""
    out: list[Submission] = []
    if not periods:
        return out
    query = select(t.LogEntry.seq, t.LogEntry.record).where(
        t.LogEntry.kind.in_(("message", paper.KIND)),
        t.LogEntry.status.in_((*COUNTED, paper.WITHDRAWAL)),
        t.LogEntry.period.in_(sorted(set(periods))),
    )
    if agency is not None:
        query = query.where(t.LogEntry.agency == agency)
    withdrawn: dict[int, datetime] = {}
    for seq, fields in _records(s, query.order_by(t.LogEntry.seq)):
        if fields.get("status") == paper.WITHDRAWAL:
            withdrawn.setdefault(int(fields["withdraws"]), datetime.fromisoformat(fields["at"]))
        elif (sub := Submission.from_entry(seq, fields)) is not None:
            out.append(sub)
    if withdrawn:
        out = [
            replace(x, withdrawn_at=withdrawn.get(x.seq)) if x.seq in withdrawn else x for x in out
        ]
    return out


def requests_and_replies(
    s: Session, *, since: datetime | None = None
) -> tuple[list[Request], list[Reply]]:
    """Accepted ``request`` and ``reply`` entries (received from ``since`` on, if given)."""
    query = select(t.LogEntry.seq, t.LogEntry.record).where(
        t.LogEntry.kind == "message",
        t.LogEntry.status == "accepted",
        t.LogEntry.category.in_(("request", "reply")),
    )
    if since is not None:
        query = query.where(t.LogEntry.at >= since)
    requests: list[Request] = []
    replies: list[Reply] = []
    for seq, fields in _records(s, query.order_by(t.LogEntry.seq)):
        if (request := Request.from_entry(seq, fields)) is not None:
            requests.append(request)
        elif (reply := Reply.from_entry(seq, fields)) is not None:
            replies.append(reply)
    return requests, replies


def recorded_consents(s: Session) -> set[tuple[str, str]]:
    """(request DocumentId, addressee) of every deemed consent already filed."""
    query = select(t.LogEntry.document_id, t.LogEntry.agency).where(
        t.LogEntry.kind == "deemed-consent"
    )
    return {(str(d), str(a)) for d, a in s.execute(query)}


def record_deemed_consent(
    s: Session, statuses: Iterable[RequestStatus], *, at: datetime
) -> list[Entry]:
    """File a ``deemed-consent`` entry for each status in that state not filed before, in the
    caller's transaction (running it again files nothing)."""
    done = recorded_consents(s)
    items = [
        deemed_consent_item(st, at)
        for st in statuses
        if st.state == "deemed-consent" and (st.request.document_id, st.addressee) not in done
    ]
    return Log().append_many(s, items) if items else []


def log_read(s: Session, *, at: datetime, actor: str, action: str, target: str) -> None:
    """Record that a person read the archive through a compliance report."""
    Log().append_many(s, [read_item(at, actor, action, target)])


def agency_names(s: Session) -> dict[str, str]:
    """OrganId → Vietnamese name, from the directory."""
    return {o: n for o, n in s.execute(select(t.Agency.organ_id, t.Agency.name_vi))}
