"""Finding things in the archive: entries by their business fields (`gateway archive
list|search`), the receipt entry that answers a message, the checkpoint a proof is made under.

A :class:`Query` is a value that builds one SQL statement over the search columns of
:class:`archive.tables.LogEntry` (which `archive verify` checks against the hashed records);
:func:`summary` turns a row into what a listing shows. No session, no clock: dates given
without a time zone are read as Vietnam time by :func:`parse_bound`::

    q = Query(agency="H26.SNV", period="2026-10", start=parse_bound("2026-11-01"))
    rows = session.scalars(q.statement()).all()
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import datetime, time, timedelta
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from archive import tables as t
from archive.bundle import RECEIPT_BLOB, RECEIPT_FOR, RECEIPT_KIND
from formats.vntime import VN_TZ

#: Times given without an offset are Vietnam time (UTC+7), as agencies and clerks read them.
_PERIOD = re.compile(r"\d{4}-(0[1-9]|1[0-2])")
_COLUMNS = ("agency", "category", "period", "status", "document_id", "message_id", "digest")


class QueryError(ValueError):
    """A search option that cannot be understood; the message says what is expected."""


@dataclass(frozen=True)
class Query:
    agency: str | None = None
    category: str | None = None
    period: str | None = None
    status: str | None = None
    document_id: str | None = None
    message_id: str | None = None
    digest: str | None = None
    kind: str | None = None
    start: datetime | None = None  # inclusive
    end: datetime | None = None  # exclusive
    after: int | None = None  # entries with a larger sequence number only
    limit: int = 100

    def __post_init__(self) -> None:
        if self.period is not None and not _PERIOD.fullmatch(self.period):
            raise QueryError(f"period {self.period!r} is not YYYY-MM (e.g. 2026-10)")
        if self.digest is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", self.digest):
            raise QueryError("digest must be the 64 hex digits of a SHA-256")
        if self.limit < 1:
            raise QueryError("limit must be at least 1")
        for bound in (self.start, self.end):
            if bound is not None and bound.utcoffset() is None:
                raise QueryError("search times must carry a time zone")
        if self.start and self.end and self.end <= self.start:
            raise QueryError("the end of the date range is before its start")

    def statement(self) -> Select[t.LogEntry]:
        q = select(t.LogEntry)
        for name in _COLUMNS:
            value = getattr(self, name)
            if value is not None:
                value = value.lower() if name == "digest" else value
                q = q.where(getattr(t.LogEntry, name) == value)
        if self.kind is not None:
            q = q.where(t.LogEntry.kind == self.kind)
        if self.start is not None:
            q = q.where(t.LogEntry.at >= self.start)
        if self.end is not None:
            q = q.where(t.LogEntry.at < self.end)
        if self.after is not None:
            q = q.where(t.LogEntry.seq > self.after)
        return q.order_by(t.LogEntry.seq).limit(self.limit)

    def describe(self) -> str:
        """The query as a read log shows it: ``agency=H26.SNV status=accepted limit=100``."""
        parts = []
        for name, value in asdict(self).items():
            if value is not None and name != "limit":
                shown = value.isoformat() if isinstance(value, datetime) else value
                parts.append(f"{name}={shown}")
        return " ".join([*parts, f"limit={self.limit}"])


def parse_bound(text: str, *, end: bool = False) -> datetime:
    """A ``--from``/``--to`` value: a date (the whole day, Vietnam time) or an ISO time.

    ``--to 2026-11-30`` includes that day: the bound returned is the next midnight, exclusive.
    """
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            day = datetime.combine(datetime.fromisoformat(text).date(), time(), VN_TZ)
            return day + timedelta(days=1) if end else day
        value = datetime.fromisoformat(text)
    except ValueError:
        raise QueryError(
            f"{text!r} is not a date or ISO time (2026-11-30 or 2026-11-30T17:00+07:00)"
        ) from None
    return value if value.utcoffset() is not None else value.replace(tzinfo=VN_TZ)


def summary(row: t.LogEntry) -> dict[str, Any]:
    """What a listing shows of an entry: never payload content, only who/what/when."""
    out: dict[str, Any] = {"seq": row.seq, "kind": row.kind, "at": row.at.isoformat()}
    for name in _COLUMNS:
        value = getattr(row, name)
        if value is not None:
            out[name] = value
    if row.kind != "message":
        try:
            fields = json.loads(row.record)
        except (ValueError, UnicodeDecodeError, RecursionError):
            fields = {}
        if isinstance(fields, dict):
            for name in ("actor", "action", "target", "subject", "for_seq", "outbox", "withdraws"):
                if isinstance(fields.get(name), str | int):
                    out[name] = fields[name]
    return out


def line(item: dict[str, Any]) -> str:
    """One listing line for a :func:`summary`, its time in Vietnam time (as ``--from`` and
    ``--to`` read a time without an offset)."""
    seq, kind = item["seq"], item["kind"]
    at = datetime.fromisoformat(item["at"]).astimezone(VN_TZ).strftime("%Y-%m-%d %H:%M:%S%z")
    if kind in ("message", "paper"):  # (a report received on paper: gateway.paper)
        what = " ".join(str(item.get(k) or "-") for k in ("status", "agency", "category", "period"))
        doc = item.get("document_id")
        withdraws = item.get("withdraws")
        return (
            f"{seq:>8}  {at}  {kind:<8} {what}"
            + (f"  doc {doc}" if doc else "")
            + (f"  withdraws {withdraws}" if withdraws is not None else "")
        )
    parts = [str(v) for k in ("status", "agency") if (v := item.get(k)) is not None]
    if item.get("for_seq") is not None:
        parts.append(f"for {item['for_seq']}")
    parts += [
        str(v)
        for k in ("outbox", "actor", "action", "target", "subject")
        if (v := item.get(k)) is not None
    ]
    return f"{seq:>8}  {at}  {kind:<8} {' '.join(parts)}".rstrip()


def newest_checkpoint(s: Session, *, size: int | None = None) -> t.Checkpoint | None:
    """The newest checkpoint (of exactly ``size`` entries, if given); not yet verified."""
    q = select(t.Checkpoint).order_by(t.Checkpoint.id.desc()).limit(1)
    return s.scalar(q.where(t.Checkpoint.size == size) if size is not None else q)


def receipt_entry(s: Session, seq: int) -> t.LogEntry | None:
    """The first receipt entry that answers message entry ``seq`` (receipts come after it).

    Receipt entries carry no search column for the entry they answer, so the receipts after
    ``seq`` are read in order; a column (and index) would make this one lookup.
    """
    rows = s.scalars(
        select(t.LogEntry)
        .where(t.LogEntry.kind == RECEIPT_KIND, t.LogEntry.seq > seq)
        .order_by(t.LogEntry.seq)
        .execution_options(yield_per=500)
    )
    for row in rows:
        try:
            fields = json.loads(row.record)
        except (ValueError, UnicodeDecodeError, RecursionError):
            continue
        if not isinstance(fields, dict) or fields.get(RECEIPT_FOR) != seq:
            continue  # (a record rewritten into something else answers no message)
        blobs = fields.get("blobs")
        if isinstance(blobs, dict) and RECEIPT_BLOB in blobs:
            return row
    return None
