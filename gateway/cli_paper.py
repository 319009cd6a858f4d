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
from formats.vntime import local_day
from gateway import obligation_store, paper
from gateway.cli import actor, emit_json, now
from gateway.cli import db_session as _session
from gateway.cli_compliance import _label
from gateway.compliance import month_bounds
from gateway.obligations import CADENCES, Obligation


def _obligation(s: Session, agency: str, category: str, cadence: str | None) -> Obligation:
    """The one obligation of ``agency`` for ``category`` (and ``cadence``)."""
    own = [o for o in obligation_store.obligations(s) if o.provider == agency]
    if not own:
        raise InputError(
            f"{agency} owes nothing: no obligation names it as provider (gateway obligations list)"
        )
    found = [o for o in own if o.category == category and cadence in (None, o.cadence)]
    if not found:
        owed = ", ".join(sorted({f"{o.category} ({o.cadence})" for o in own}))
        raise InputError(f"{agency} owes no {category} report{_cadence(cadence)}; it owes {owed}")
    if len({o.cadence for o in found}) > 1:
        cadences = ", ".join(sorted({o.cadence for o in found}))
        raise InputError(f"{agency} owes {category} as {cadences}: say which with --cadence")
    return found[0]


def _cadence(cadence: str | None) -> str:
    return f" ({cadence})" if cadence else ""


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise InputError(f"--received {text!r} is not a day; write it as YYYY-MM-DD") from None


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
    label = _label(period, "--period")
    first, last = month_bounds(label)
    at = now()
    with _session(ctx) as s:
        obligation = _obligation(s, agency, category, cadence)
        owed = paper.period_of(obligation, label, first, last)
        item = paper.paper_item(
            obligation, owed, received_on=_day(received), reference=reference, note=note,
            actor=actor(), at=at,
        )  # fmt: skip
        [entry] = Log().append_many(s, [item])
    fields = json.loads(entry.record)
    if as_json:
        emit_json({"seq": entry.seq, **fields})
        return
    click.echo(
        f"recorded as archive entry {entry.seq}: {agency} {category} ({obligation.cadence}) for "
        f"{owed.first} – {owed.last}, received on paper {received}, {fields['document_id']}"
    )


@click.command("withdraw-paper")
@click.argument("seq", type=click.IntRange(min=0))
@click.option("--reason", required=True, help="Why the record was a mistake.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def withdraw_paper(ctx: click.Context, seq: int, reason: str, as_json: bool) -> None:
    """Withdraw the paper record in archive entry SEQ (recorded by mistake): from now on the
    status no longer counts it. Nothing is deleted; the withdrawal is an entry of its own."""
    at = now()
    with _session(ctx) as s:
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
        [entry] = Log().append_many(s, [item])
    if as_json:
        emit_json({"seq": entry.seq, **json.loads(entry.record)})
        return
    click.echo(
        f"withdrew the paper record in entry {seq} (entry {entry.seq}); from "
        f"{local_day(at)} the status no longer counts it"
    )
