"""``gateway outbox …``: what the hub owes and has sent, and sending again what failed.

A thin edge over :mod:`gateway.outbox_admin`; one database transaction per command.
"""

from __future__ import annotations

import click

from formats.errors import InputError
from gateway import outbox_admin
from gateway.cli import actor, db_session, emit_json, load_settings, now
from gateway.cli_types import COUNT, OUTBOX_ID
from gateway.loading import load_directory_merged
from gateway.outbound import KINDS
from gateway.outbox_admin import PENDING, STATES, Requeued

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@click.group()
def outbox() -> None:
    """Receipts, deliveries, reminders and alerts the hub owes: their state, and retries."""


@outbox.command("list")
@click.option(
    "--state",
    type=click.Choice([*STATES, "all"]),
    help="Only rows in this state (default: every state but sent).",
)
@click.option("--kind", type=click.Choice(KINDS))
@click.option("--agency", metavar="ORGAN_ID", help="Only rows to this agency.")
@click.option("--limit", type=COUNT, default=100, show_default=True)
@json_option
@click.pass_context
def list_cmd(
    ctx: click.Context,
    state: str | None,
    kind: str | None,
    agency: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """The newest rows, oldest first: state, attempts, next attempt and the last reply."""
    states = STATES if state == "all" else (state,) if state else PENDING
    with db_session(ctx) as s:
        rows = outbox_admin.listing(s, states=states, kind=kind, agency=agency, limit=limit)
    if as_json:
        emit_json([r.as_dict() for r in rows])
        return
    for r in rows:
        due = f" next {r.next_attempt_at:%Y-%m-%d %H:%M}Z" if r.state == "retry" else ""
        click.echo(
            f"{r.id:>7} {r.state:<8} {r.key:<32} {r.organ_id or '-':<14} "
            f"tries {r.attempts}{due}" + (f"  {r.last_reply}" if r.last_reply else "")
        )
    if not rows:
        click.echo("(none)")


@outbox.command("retry")
@click.argument("ids", nargs=-1, type=OUTBOX_ID)
@click.option("--failed", "every_failed", is_flag=True, help="Every failed row (see --agency).")
@click.option("--agency", metavar="ORGAN_ID", help="With --failed: only rows to this agency.")
@click.option(
    "--rebuild",
    is_flag=True,
    help="Build the messages again (after a new certificate or mailbox), not resend them.",
)
@json_option
@click.pass_context
def retry_cmd(
    ctx: click.Context,
    ids: tuple[int, ...],
    every_failed: bool,
    agency: str | None,
    rebuild: bool,
    as_json: bool,
) -> None:
    """Send failed rows IDS again (or --failed). A row never built, or --rebuild, is built
    anew for the agency's mailboxes and certificates of now; a row the relay refused is sent
    again, the same bytes, to the recipients that did not take it — of a delivery or reminder,
    only those still mailboxes of the agency (built anew if none is). Recorded as admin events.

    --json: one object a row: id, key, was (its last reply), now (new or retry) and
    left_agency (the recipients dropped for having left the agency)."""
    if ids and every_failed:
        raise InputError("name the rows to retry (IDS) or give --failed, not both")
    if not ids and not every_failed:
        raise InputError("name the rows to retry (IDS), or give --failed for every failed row")
    if agency is not None and not every_failed:
        raise InputError("--agency selects among --failed rows")
    settings = load_settings(ctx)
    with db_session(ctx) as s:
        chosen = list(ids) or outbox_admin.failed_ids(s, agency=agency)
        directory = load_directory_merged(settings, s)  # as the builder sees it
        done = outbox_admin.requeue(
            s, chosen, rebuild=rebuild, at=now(), actor=actor(), directory=directory
        )
    if as_json:
        emit_json([{"id": r.was.id, "key": r.was.key, "was": r.was.last_reply, "now": r.state,
                    "left_agency": list(r.left_agency)} for r in done])  # fmt: skip
        return
    for r in done:
        click.echo(f"{r.was.id:>7} {r.was.key}: {_how(r)} (was: {r.was.last_reply or 'failed'})")
    if not done:
        click.echo("no failed row" + (f" to {agency}" if agency else ""))


def _how(r: Requeued) -> str:
    """What becomes of a requeued row, and of the recipients that left its agency."""
    how = "to be built again" if r.state == "new" else "to be sent again"
    if not r.left_agency:
        return how
    left = ", ".join(r.left_agency)
    gone = "is no longer a mailbox" if len(r.left_agency) == 1 else "are no longer mailboxes"
    how += f", not to {left}, which {gone} of {r.was.organ_id}"
    if r.state == "new":  # built again: gateway.builder.nothing_left may find nobody left
        how += " (to nobody, if every mailbox it has now took it: the row then ends sent)"
    return how
