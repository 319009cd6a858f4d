"""``gateway compliance record-paper`` and ``withdraw-paper``: reports received outside the
gateway (QĐ 18/2017 Điều 8.4.a: "bằng văn bản"), recorded in the archive by an administrator.

A thin edge over :mod:`gateway.paper`; described in ``docs/compliance.md`` ("Reports received on
paper").
"""

from __future__ import annotations

import json
from datetime import date

import click
from sqlalchemy import select
from sqlalchemy.orm import Session

from archive import tables as t
from archive.log import Log
from formats.errors import InputError
from gateway import ledger, obligation_store, paper
from gateway.cli import actor, emit_json, load_settings, now
from gateway.cli import db_session as _session
from gateway.cli_compliance import month_option, status_text
from gateway.compliance import matrix, month_bounds
from gateway.obligations import CADENCES, Obligation, Period, periods
from gateway.remind import calendar_of
from keys.agency_io import parse_day


def _obligation(
    s: Session, agency: str, category: str, cadence: str | None, label: str
) -> tuple[Obligation, Period]:
    """The obligation of ``agency`` for ``category`` (and ``cadence``) that owes a report for
    a period ending in month ``label``, and that period. An agency may owe a category under
    several obligations in turn (one retired, its successor added): the one covering the month
    is meant."""
    own = [o for o in obligation_store.obligations(s) if o.provider == agency]
    if not own:
        raise InputError(
            f"{agency} owes nothing: no obligation names it as provider (gateway obligations list)"
        )
    found = [o for o in own if o.category == category and cadence in (None, o.cadence)]
    if not found:
        owed = ", ".join(sorted({f"{o.category} ({o.cadence})" for o in own}))
        raise InputError(f"{agency} owes no {category} report{_cadence(cadence)}; it owes {owed}")
    first, last = month_bounds(label)
    owing = [(o, ps[-1]) for o in found if (ps := periods(o, first, last))]
    if not owing:
        raise InputError(
            f"{agency} owes no {category} report{_cadence(cadence)} for a period ending in "
            f"{label}: " + "; ".join(paper.owes_when(o) for o in found)
        )
    if len({o.cadence for o, _ in owing}) > 1:
        cadences = ", ".join(sorted({o.cadence for o, _ in owing}))
        raise InputError(
            f"{agency} owes {category} for {label} as {cadences}: say which with --cadence"
        )
    return owing[0]


def _cadence(cadence: str | None) -> str:
    return f" ({cadence})" if cadence else ""


def _day(text: str) -> date:
    try:
        return parse_day(text, "--received")
    except ValueError as exc:
        raise InputError(str(exc)) from None


@click.command("record-paper")
@click.option("--agency", required=True, metavar="ORGAN_ID", help="The providing agency.")
@click.option("--category", required=True, help="The category of the report.")
@click.option("--period", required=True, metavar="YYYY-MM", help="The month its period ends in.")
@click.option("--cadence", type=click.Choice(CADENCES), help="When it owes several.")
@click.option("--received", required=True, metavar="YYYY-MM-DD", help="The day it came.")
@click.option("--reference", required=True, help="The paper's number and date, as written.")
@click.option("--note", default="", help="Anything else worth keeping with the record.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def record_paper(
    ctx: click.Context,
    agency: str,
    category: str,
    period: str,
    cadence: str | None,
    received: str,
    reference: str,
    note: str,
    as_json: bool,
) -> None:
    """Record that AGENCY's report for a period came on paper (or otherwise outside the
    gateway): the status then counts it as received that day, and no late notice is sent."""
    label = month_option(period, "--period")
    day = _day(received)
    calendar = calendar_of(load_settings(ctx))
    at = now()
    with _session(ctx) as s:
        obligation, owed = _obligation(s, agency, category, cadence, label)
        item = paper.paper_item(
            obligation, owed, received_on=day, reference=reference, note=note,
            actor=actor(), at=at,
        )  # fmt: skip
        [entry] = Log().append_many(s, [item])
        # What the status says now, with this record: it may still be that of an e-mailed
        # report (see docs/compliance.md).
        submissions = ledger.submissions(s, [label], agency=agency)
    [cell] = matrix([obligation], submissions, calendar, label, at).cells
    fields = json.loads(entry.record)
    # A second record of one period is kept (a corrected copy may come on paper too), but
    # never without a word: one of them may be a mistake, to withdraw.
    before = [
        other
        for other in submissions
        if other.via == "paper"
        and other.seq != entry.seq
        and (other.category, other.counts_for) == (category, obligation.cadence)
        and other.counted(at)
    ]
    if as_json:
        emit_json(
            {
                "seq": entry.seq,
                **fields,
                "cell": cell.as_dict(calendar.version),
                "also_on_paper": [other.seq for other in before],
            }
        )
        return
    click.echo(
        f"recorded as archive entry {entry.seq}: {agency} {category} ({obligation.cadence}) for "
        f"{owed.first} – {owed.last}, received on paper {day}, {fields['document_id']}"
    )
    click.echo(f"status now: {status_text(cell)}")
    for other in before:
        click.echo(
            f"note: entry {other.seq} records this period on paper already (received "
            f"{other.received_on}, {other.document_id}); both count: if one is a mistake, "
            f"withdraw it (gateway compliance withdraw-paper SEQ --reason …)",
            err=True,
        )


@click.command("withdraw-paper")
@click.argument("seq", type=click.IntRange(min=0, max=2**63 - 1))
@click.option("--reason", required=True, help="Why the record was a mistake.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def withdraw_paper(ctx: click.Context, seq: int, reason: str, as_json: bool) -> None:
    """Withdraw the paper record in archive entry SEQ (recorded by mistake): from now on the
    status no longer counts it. Nothing is deleted; the withdrawal is an entry of its own."""
    at = now()
    with _session(ctx) as s:
        # Under the log's append lock: two withdrawals of one record at once must not both
        # find it not yet withdrawn (PostgreSQL; SQLite writers are serialised already).
        log = Log()
        log.lock(s)
        row = s.get(t.LogEntry, seq)
        if row is None:
            raise InputError(f"there is no archive entry {seq}")
        recorded = json.loads(row.record)
        withdrawals = select(t.LogEntry.seq, t.LogEntry.record).where(
            t.LogEntry.kind == paper.KIND,
            t.LogEntry.status == paper.WITHDRAWAL,
            t.LogEntry.period == row.period,
            t.LogEntry.agency == row.agency,
        )
        for other, record in s.execute(withdrawals):
            if json.loads(record).get("withdraws") == seq:
                raise InputError(f"archive entry {seq} was withdrawn already, by entry {other}")
        item = paper.withdrawal_item(recorded, seq, reason=reason, actor=actor(), at=at)
        [entry] = log.append_many(s, [item])
    if as_json:
        emit_json({"seq": entry.seq, **json.loads(entry.record)})
        return
    click.echo(
        f"withdrew the paper record in entry {seq} (entry {entry.seq}); from now on the status "
        "no longer counts it"
    )
