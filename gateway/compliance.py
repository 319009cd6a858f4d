"""Compliance status (pure): which submission fulfils which obligation, period by period
(DESIGN §6). Ad-hoc requests and deemed consent are in :mod:`gateway.adhoc`.

No database, no clock: values in (obligations, :class:`Submission` values taken from archive
entries by :mod:`gateway.ledger`, a working-day calendar, the moment ``now``), values out.
Described in ``docs/compliance.md`` ("Status").

Matching. A submission fulfils (obligation, period) when its sender is the provider, its
category the obligation's, its period (the month of its ``PeriodEnd``, as filed) the month of
the period's last day, and its cadence the obligation's — as stated, or for an entry archived
without one, as its period's length says (:func:`gateway.obligations.cadence_of`). A November
monthly report is not the annual one, and an ad-hoc payload answers a request, not a periodic
obligation (Điều 8.4.a). Only entries received by ``now`` count, so a report "as at" a past
moment shows what was known then.

One cell, in order (:func:`status_for`):

1. accepted payloads, oldest first. The first one that is not a revoke is the report in
   force (a correction too, when nothing is in force: the data were provided). A later
   ``update``/``replace`` is a correction only when its ``replaces`` names the report in force
   or one it superseded (or names nothing: an update need not name it); one that names
   anything else — a document never filed for this sender, obligation and period — is
   ignored and listed (``ignored``). A later ``new`` is ignored. A revoke withdraws the
   report in force under the same naming rule (names nothing: archives from before the rule
   that a revoke names its document); a revoke of anything else changes nothing. A withdrawn
   report is as if never sent: the next payload is judged as a first one, and if none
   follows the cell is missing again (``withdrawn``).

   Timeliness is judged on the first report: its local receipt day against the due date
   decides on time or late (working days after the due date, at least 1: a weekend receipt
   after a Friday deadline is a day late). With corrections the cell is ``corrected``.

   ``early`` is a flag, not a status: the report in force (the last correction, or the first
   report) was received before the period could be complete
   (:func:`gateway.obligations.complete_from`: after the period's last day for a working-days
   rule, Điều 8.4.a "mốc số liệu … đến ngày 15"; from its first day for a "before" rule), so
   it cannot cover the period's last days. The regulation fixes the data cut-off but no
   earliest day to send, so an early report is still sent and judged as above; a correction
   received once the period could be complete clears the flag.
   Reports recorded as received on paper (:mod:`gateway.paper`) are evidence that the data
   were provided, not documents in that chain (nothing e-mailed names them): the earliest one
   counted at ``now`` (recorded by then, not withdrawn) is the report when no e-mailed one is
   in force (none came, all were rejected, or the one in force was revoked), judged on its
   day; when one is in force, timeliness is judged on the earlier of the first e-mailed
   report's day and the paper's. An e-mailed update or replace naming the paper's reference
   corrects it; an e-mailed revoke never withdraws a paper record (``gateway compliance
   withdraw-paper`` does). ``paper`` says the day judged was the paper's.
2. no accepted payload but rejected ones: ``rejected-only`` (missing in effect);
3. nothing: ``missing`` once the due date has passed (24:00 UTC+7), ``not-due-yet`` before.
"""

from __future__ import annotations

import gc
import re
from calendar import monthrange
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta
from functools import cache, partial
from typing import Any, Final, Literal, NamedTuple, Protocol, get_args

from formats.vntime import VN_TZ, local_day
from gateway.obligations import (
    Obligation,
    Period,
    cadence_of,
    complete_from,
    due_date,
    periods,
)

#: In the order reports count them: fulfilled first, then the problems.
Status = Literal["on-time", "late", "corrected", "rejected-only", "missing", "not-due-yet"]
STATUSES: Final[tuple[Status, ...]] = get_args(Status)
_CORRECTIONS: Final = frozenset({"update", "replace"})
_ONE_DAY: Final = timedelta(days=1)
_MONTH: Final = re.compile(r"([0-9]{4})-([0-9]{2})")


class Calendar(Protocol):
    """What the status needs from :class:`gateway.workdays.Calendar`."""

    @property
    def version(self) -> str: ...

    def add_working_days(self, start: date, n: int) -> date: ...

    def is_working_day(self, d: date) -> bool: ...


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cycle collector while building many acyclic values. Each full pass walks
    every object alive — a loaded year is ~400,000 — and building a year of cells triggers
    several: a third of the time (bench/compliance_bench.py). Process-wide, so only the caller
    that paused it resumes it; nothing is lost, collection is only deferred."""
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def end_of(day: date) -> datetime:
    """24:00 Asia/Ho_Chi_Minh at the end of ``day`` (BLDS 2015 Điều 148.6)."""
    return datetime.combine(day + _ONE_DAY, time(0), tzinfo=VN_TZ)


def working_days_late(calendar: Calendar, due: date, day: date) -> int:
    """Working days from the day after ``due`` to ``day`` inclusive; at least 1 if after."""
    if day <= due:
        return 0
    n, d = 0, due
    while d < day:
        d += _ONE_DAY
        n += calendar.is_working_day(d)
    return max(n, 1)


# --- submissions and their index ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Submission:
    """A received payload that may fulfil an obligation (an accepted or rejected message)."""

    seq: int
    provider: str
    category: str
    period: str  # YYYY-MM of PeriodEnd
    status: str  # accepted | rejected
    received_at: datetime
    document_id: str | None = None
    business: str = "new"  # new | revoke | update | replace
    replaces: str | None = None
    cadence: str | None = None  # as stated (None: archived without one)
    period_start: date | None = None
    period_end: date | None = None
    #: ``gateway`` (a message filed), or ``paper``: received outside the gateway and recorded
    #: by an administrator at ``recorded_at`` (:mod:`gateway.paper`).
    via: str = "gateway"
    recorded_at: datetime | None = None
    #: A paper record withdrawn (a mistake) no longer counts from this moment on.
    withdrawn_at: datetime | None = None
    received_on: date = field(init=False, compare=False, repr=False)  # local day, UTC+7
    #: From when it counts: when it was received, or, recorded later by hand, when recorded.
    known_at: datetime = field(init=False, compare=False, repr=False)
    #: The cadence it counts for: as stated, or by its period's length (``cadence_of``).
    counts_for: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "received_on", local_day(self.received_at))
        object.__setattr__(
            self, "known_at", max(self.received_at, self.recorded_at or self.received_at)
        )
        counts = cadence_of(self.cadence, self.period_start, self.period_end)
        object.__setattr__(self, "counts_for", counts)

    def counted(self, now: datetime) -> bool:
        """Whether the status at ``now`` counts it: known by then, and not withdrawn."""
        return self.known_at <= now and (self.withdrawn_at is None or now < self.withdrawn_at)

    @classmethod
    def from_entry(cls, seq: int, fields: Mapping[str, Any]) -> Submission | None:
        """From a message entry's fields (:func:`gateway.filing.message_item`) or a paper
        record's (:func:`gateway.paper.paper_item`), or ``None`` when it cannot fulfil
        anything: quarantined (the sender is not authenticated), or without agency, category or
        period (a payload that did not parse)."""
        status, agency = fields.get("status"), fields.get("agency")
        category, period = fields.get("category"), fields.get("period")
        if status not in ("accepted", "rejected") or not (agency and category and period):
            return None
        payload = fields.get("payload") or {}
        paper = fields.get("kind") == "paper"
        received = fields["received_at"] if paper else fields["transport"]["received_at"]
        return cls(
            seq,
            agency,
            category,
            period,
            status,
            datetime.fromisoformat(received),
            fields.get("document_id"),
            payload.get("business") or "new",
            payload.get("replaces"),
            payload.get("cadence"),
            _day(payload.get("period_start")),
            _day(payload.get("period_end")),
            "paper" if paper else "gateway",
            datetime.fromisoformat(fields["at"]) if paper else None,
        )


def _day(text: Any) -> date | None:
    return date.fromisoformat(text) if isinstance(text, str) and text else None


#: period → provider → category → the submission, or several (oldest first).
_Found = Submission | list[Submission]
_Tree = dict[str, dict[str, dict[str, _Found]]]


class Submissions:
    """Submissions indexed by period, provider and category. Nested dictionaries, and a lone
    submission stored as itself: a year of 20,000 obligations is indexed in ~0.1 s."""

    def __init__(self, tree: _Tree, size: int) -> None:
        self._tree, self._size = tree, size

    @classmethod
    def of(cls, submissions: Iterable[Submission]) -> Submissions:
        with _collector_paused():
            return cls._of(submissions)

    @classmethod
    def _of(cls, submissions: Iterable[Submission]) -> Submissions:
        tree: _Tree = {}
        n = 0
        for s in submissions:
            n += 1
            by_category = tree.setdefault(s.period, {}).setdefault(s.provider, {})
            found = by_category.get(s.category)
            if found is None:
                by_category[s.category] = s
            elif isinstance(found, list):
                found.append(s)
            else:
                by_category[s.category] = [found, s]
        for by_provider in tree.values():
            for by_category in by_provider.values():
                for found in by_category.values():
                    if isinstance(found, list):
                        found.sort(key=_order)
        return cls(tree, n)

    def get(self, period: str, provider: str, category: str) -> Sequence[Submission]:
        found = self._tree.get(period, {}).get(provider, {}).get(category)
        return () if found is None else found if isinstance(found, list) else (found,)

    def __len__(self) -> int:
        return self._size


def _order(s: Submission) -> tuple[datetime, int]:
    return (s.received_at, s.seq)


# --- cells and the matrix ----------------------------------------------------------------------


class Cell(NamedTuple):
    """The status of one obligation for one period (a named tuple: quick to make by the
    hundred thousand)."""

    obligation: Obligation
    period: Period
    due: date  # the last day on time; the deadline is 24:00 UTC+7 that day
    status: Status
    late_days: int = 0  # of the first accepted payload (also when corrected)
    received_at: datetime | None = None  # the first report's (accepted payload, or on paper)
    document_id: str | None = None  # the report in force: the last correction, or the first
    corrections: int = 0
    rejected: int = 0
    withdrawn: bool = False  # a revoke withdrew the report, and nothing is in force since
    #: A flag beside the status: the report in force came before its period could be complete
    #: (``complete_from``), so it cannot cover the period's last days.
    early: bool = False
    #: DocumentIds of corrections that named no report in force (ignored).
    ignored: tuple[str, ...] = ()
    #: The day judged on time or late was that of a report received on paper, recorded by an
    #: administrator (:mod:`gateway.paper`). ``document_id`` is still the report in force: the
    #: paper's reference when no e-mailed report is in force, else the e-mailed one.
    paper: bool = False

    def as_dict(self, calendar_version: str) -> dict[str, Any]:
        ob = self.obligation
        return {
            "obligation": ob.id,
            "provider": ob.provider,
            "category": ob.category,
            "cadence": ob.cadence,
            "recipients": list(ob.recipients),
            "legal_basis": ob.legal_basis,
            "period": self.period.as_dict(),
            "due": self.due.isoformat(),
            "deadline": end_of(self.due).isoformat(),
            "calendar_version": calendar_version,
            "status": self.status,
            "late_days": self.late_days,
            "received_at": self.received_at.isoformat() if self.received_at else None,
            "document_id": self.document_id,
            "corrections": self.corrections,
            "rejected": self.rejected,
            "withdrawn": self.withdrawn,
            "early": self.early,
            "ignored_corrections": list(self.ignored),
            "paper": self.paper,
        }


def _matches(s: Submission, ob: Obligation, label: str) -> bool:
    return (
        s.provider == ob.provider
        and s.category == ob.category
        and s.period == label
        and s.counts_for == ob.cadence
    )


def _cell(
    ob: Obligation,
    period: Period,
    due: date,
    complete: date,
    candidates: Sequence[Submission],
    late_days: Callable[[date, date], int],
    now: datetime,
    today: date,
) -> Cell:
    """Step 1–3 of the module docstring over ``candidates`` (this key's, oldest first);
    ``complete`` is the first day a report can cover the whole period (the ``early`` flag)."""
    chain: list[Submission] = []  # the report in force, and the reports it superseded first
    ignored: list[str] = []
    rejected = 0
    withdrawn = False
    cadence = ob.cadence
    counted = [s for s in candidates if s.counted(now) and s.counts_for == cadence]
    papers = [s for s in counted if s.via == "paper"]
    on_paper = papers[0] if papers else None  # the earliest report received on paper
    # What an e-mailed correction may name: the report in force, one it superseded, or a
    # report on paper (by its reference).
    paper_refs = {p.document_id for p in papers if p.document_id}
    corrects_paper = False  # the first e-mailed report in force corrects the one on paper
    for s in counted:
        if s.via == "paper":
            continue
        if s.status != "accepted":
            rejected += 1
            continue
        business = s.business
        names_chain = (
            s.replaces is None
            or any(c.document_id == s.replaces for c in chain)
            or s.replaces in paper_refs
        )
        if business == "revoke":
            # (A report on paper is withdrawn by `gateway compliance withdraw-paper` only.)
            if chain and names_chain:
                chain, withdrawn = [], True
        elif not chain:
            # Nothing in force: this is the report, "new" or not (a replace of a rejected or
            # withdrawn one, an update naming nothing): the data were provided, on its date.
            chain, withdrawn = [s], False
            corrects_paper = business in _CORRECTIONS and s.replaces in paper_refs
        elif business in _CORRECTIONS:
            if names_chain:
                chain.append(s)
            else:
                ignored.append(s.document_id or f"entry {s.seq}")
        # A later "new" while one is in force is not a correction: the first stays in force.
    status: Status
    if chain:
        first, current = chain[0], chain[-1]
        # A copy on paper received before the first e-mailed report: the data were provided
        # on its day (Điều 8.4.a, "bằng văn bản"); the e-mailed reports are still the ones
        # in force.
        if on_paper is not None and (corrects_paper or on_paper.received_on < first.received_on):
            first = on_paper
        corrections = len(chain) - 1 + corrects_paper
        day = first.received_on
        late = late_days(due, day) if day > due else 0
        status = "corrected" if corrections else "late" if late else "on-time"
        return Cell(
            ob, period, due, status, late, first.received_at, current.document_id,
            corrections, rejected, False, current.received_on < complete, tuple(ignored),
            first is on_paper,
        )  # fmt: skip
    if on_paper is not None:
        # No e-mailed report in force (none came, or it was revoked): the one on paper is.
        day = on_paper.received_on
        late = late_days(due, day) if day > due else 0
        return Cell(
            ob, period, due, "late" if late else "on-time", late, on_paper.received_at,
            on_paper.document_id, 0, rejected, False, day < complete, tuple(ignored), True,
        )  # fmt: skip
    if rejected and not withdrawn:
        return Cell(ob, period, due, "rejected-only", rejected=rejected, ignored=tuple(ignored))
    status = "missing" if today > due else "not-due-yet"
    return Cell(
        ob, period, due, status, rejected=rejected, withdrawn=withdrawn, ignored=tuple(ignored)
    )


def status_for(
    obligation: Obligation,
    period: Period,
    submissions: Iterable[Submission],
    calendar: Calendar,
    now: datetime,
) -> Cell:
    """The status of ``obligation`` for ``period`` at ``now``, from any ``submissions``."""
    label = f"{period.last.year:04}-{period.last.month:02}"
    found = sorted((s for s in submissions if _matches(s, obligation, label)), key=_order)
    due = due_date(obligation, period, calendar)
    complete = complete_from(obligation, period)
    late = partial(working_days_late, calendar)
    return _cell(obligation, period, due, complete, found, late, now, local_day(now))


@dataclass(frozen=True)
class Report:
    """Every obligation's status for the periods ending in one month, at ``at``."""

    period: str  # YYYY-MM
    at: datetime
    calendar_version: str
    cells: tuple[Cell, ...]  # in the order of the obligations given

    def counts(self) -> dict[str, int]:
        found = Counter(c.status for c in self.cells)
        return {s: found[s] for s in STATUSES}

    def as_dict(self) -> dict[str, Any]:
        return {
            "period": self.period,
            "at": self.at.isoformat(),
            "calendar_version": self.calendar_version,
            "counts": self.counts(),
            "cells": [c.as_dict(self.calendar_version) for c in self.cells],
        }


def month_bounds(label: str) -> tuple[date, date]:
    """First and last day of month ``label`` (YYYY-MM, years 0001–9999); ``ValueError``
    otherwise."""
    match = _MONTH.fullmatch(label)
    if not match or match[1] == "0000" or not 1 <= int(match[2]) <= 12:
        raise ValueError(f"{label!r} is not YYYY-MM")
    year, month = int(match[1]), int(match[2])
    return date(year, month, 1), date(year, month, monthrange(year, month)[1])


def matrix(
    obligations: Iterable[Obligation],
    submissions: Submissions | Iterable[Submission],
    calendar: Calendar,
    period_label: str,
    now: datetime,
) -> Report:
    """The status of every (obligation, period) whose period ends in month ``period_label``:
    the monthly period of that label, and a semi-annual or annual period ending that month.

    Periods and due dates are worked out once per (cadence, due rule), submissions looked up
    by key: no scan per cell (bench/compliance_bench.py)."""
    index = submissions if isinstance(submissions, Submissions) else Submissions.of(submissions)
    with _collector_paused():
        return _matrix(obligations, index, calendar, period_label, now)


def _matrix(
    obligations: Iterable[Obligation],
    index: Submissions,
    calendar: Calendar,
    period_label: str,
    now: datetime,
) -> Report:
    tree = index._tree.get(period_label, {})
    first, last = month_bounds(period_label)
    today = local_day(now)
    # Equal rules share their periods and due dates (keyed by the rule's fields: hashing a
    # DueRule per cell would cost a tenth of the time); late days are counted once per day.
    plans: dict[tuple[Any, ...], list[tuple[Period, date, date]]] = {}
    late = cache(partial(working_days_late, calendar))
    cells: list[Cell] = []
    add = cells.append
    for ob in obligations:
        rule = ob.due
        key = (ob.cadence, rule.kind, rule.n, rule.dates)
        plan = plans.get(key)
        if plan is None:
            free = replace(ob, valid_from=None, valid_to=None)
            plan = [
                (p, due_date(free, p, calendar), complete_from(free, p))
                for p in periods(free, first, last)
            ]
            plans[key] = plan
        start, end = ob.valid_from, ob.valid_to
        for period, due, complete in plan:
            if (start is not None and period.last < start) or (
                end is not None and period.last > end
            ):
                continue
            by_category = tree.get(ob.provider)
            found = None if by_category is None else by_category.get(ob.category)
            if found is None:
                status: Status = "missing" if today > due else "not-due-yet"
                add(Cell(ob, period, due, status))
                continue
            if not isinstance(found, list):  # the common case of _cell, inlined: one report
                day = found.received_on
                if (
                    found.status == "accepted"
                    and found.business == "new"
                    and found.via == "gateway"
                    and day <= due
                    and found.counted(now)
                    and found.counts_for == ob.cadence
                ):
                    at, doc = found.received_at, found.document_id
                    paper = found.via == "paper"
                    add(
                        Cell(
                            ob,
                            period,
                            due,
                            "on-time",
                            0,
                            at,
                            doc,
                            early=day < complete,
                            paper=paper,
                        )
                    )
                    continue
                found = [found]
            add(_cell(ob, period, due, complete, found, late, now, today))
    return Report(period_label, now, calendar.version, tuple(cells))


def history(
    obligations: Iterable[Obligation],
    submissions: Submissions | Iterable[Submission],
    calendar: Calendar,
    labels: Sequence[str],
    now: datetime,
    *,
    provider: str,
) -> list[Report]:
    """One agency's :func:`matrix` for each month of ``labels``."""
    own = [o for o in obligations if o.provider == provider]
    index = submissions if isinstance(submissions, Submissions) else Submissions.of(submissions)
    return [matrix(own, index, calendar, label, now) for label in labels]


def month_labels(first: str, last: str) -> list[str]:
    """``first`` … ``last`` (YYYY-MM), both included."""
    start, _ = month_bounds(first)
    end, _ = month_bounds(last)
    if end < start:
        raise ValueError(f"{last} is before {first}")
    months = range(start.year * 12 + start.month - 1, end.year * 12 + end.month)
    return [f"{m // 12:04}-{m % 12 + 1:02}" for m in months]
