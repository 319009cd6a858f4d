"""``gateway compliance …``: the working-day calendar, the status of every obligation per
period, one agency's history, and ad-hoc requests with deemed consent (DESIGN §6).

A thin edge over :mod:`gateway.workdays`, :mod:`gateway.compliance`, :mod:`gateway.adhoc` and
:mod:`gateway.ledger` (which reads the archive and logs the read); the printable HTML matrix is
:mod:`gateway.compliance_html`. Described in ``docs/compliance.md``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from formats.errors import InputError
from formats.vntime import VN_TZ, local_day
from gateway import compliance_html, ledger, obligation_store
from gateway import settings as settings_mod
from gateway.adhoc import REQUEST_STATES, RequestStatus, requests_status
from gateway.cli import actor, emit_json, in_calendar, load_settings, now, parse_time
from gateway.cli import db_session as _session
from gateway.compliance import Cell, Report, history, matrix, month_bounds, month_labels
from gateway.remind import calendar_of
from gateway.workdays import MAX_YEAR, MIN_YEAR, Calendar, Day

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@click.group()
def compliance() -> None:
    """Compliance: working days, obligation status per period, requests and deemed consent."""


def _line(day: Day) -> str:
    state = "working" if day.working else "off"
    head = f"{day.date:%a %Y-%m-%d}  {state:<8} {day.reason}"
    tail = day.source if day.entry is None else f"{day.source} · {day.status} · {day.entry}"
    if not day.applied:
        tail += " · not applied: an ordinary day"
    return f"{head}\n{'':25}{tail}"


def _home_settings(ctx: click.Context) -> settings_mod.Settings:
    """The home's settings, or the defaults where there is no home yet (the calendar needs
    none: it can be looked at before `gateway init`)."""
    root = ctx.find_root()
    home: Path = root.obj["home"]
    if not (home / settings_mod.CONFIG_NAME).exists():
        if root.params.get("home") is not None:  # a home was named (--home, GATEWAY_HOME)
            click.echo(f"(no {settings_mod.CONFIG_NAME} in {home}: the shipped calendar)", err=True)
        return settings_mod.Settings(home=home)
    return load_settings(ctx)


@compliance.command("calendar")
@click.argument("year", type=click.IntRange(MIN_YEAR, MAX_YEAR))
@click.option(
    "--without-proposed",
    is_flag=True,
    help="Leave out changes that are only proposed (e.g. the 2026 National Day swap).",
)
@click.option(
    "--include",
    multiple=True,
    metavar="ID",
    help="Put an overlay entry in force even if not yet law (e.g. vn-culture-day). Repeatable.",
)
@click.option(
    "--exclude", multiple=True, metavar="ID", help="Leave out an overlay entry. Repeatable."
)
@click.option(
    "--overlay",
    type=click.Path(dir_okay=False, path_type=Path),
    help="An extra overlay TOML file; its entries replace shipped entries with the same id.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def calendar_cmd(
    ctx: click.Context,
    year: int,
    without_proposed: bool,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    overlay: Path | None,
    as_json: bool,
) -> None:
    """Days off on weekdays and working weekend days of YEAR, with their reason and source,
    and the number of working days in each month: the calendar the home's [compliance]
    settings choose (what deadlines and reminders count with), the options on top."""
    settings = _home_settings(ctx)
    c = settings.compliance
    cal = Calendar.load(
        include_proposed=c.include_proposed and not without_proposed,
        include=(*c.ids("include"), *include),
        exclude=(*c.ids("exclude"), *exclude),
        extra_overlay=overlay or (settings.path(c.overlay) if c.overlay else None),
    )
    table = cal.year_table(year)
    if as_json:
        emit_json(table.as_dict())
        return
    click.echo(f"Working days {year} — calendar {table.version}")
    click.echo(table.label)
    click.echo()
    for day in table.days:
        click.echo(_line(day))
    click.echo()
    counts = "  ".join(f"{m} {n}" for m, n in zip(_MONTHS, table.working_days, strict=True))
    click.echo(f"Working days: {counts}  (total {sum(table.working_days)})")


# --- status, history ------------------------------------------------------------------------------

_EN = {
    "on-time": "on time",
    "late": "late {n} working days",
    "corrected": "corrected",
    "rejected-only": "rejected only",
    "missing": "missing",
    "not-due-yet": "not due yet",
}
CSV_COLUMNS = (
    "period", "provider", "provider_name", "category", "obligation", "cadence", "period_label",
    "period_first", "period_last", "due", "deadline", "calendar_version", "status", "late_days",
    "received_at", "document_id", "corrections", "rejected", "withdrawn", "early",
    "ignored_corrections", "paper",
)  # fmt: skip
#: The note beside the status of a cell whose report in force came before its period could be
#: complete (``Cell.early``): a flag, not a status.
EARLY_NOTE = "sent before the period ended: it cannot cover the period's last days"
#: The months a status can be asked for: the years the working-day calendar covers.
FIRST_MONTH, LAST_MONTH = f"{MIN_YEAR}-01", f"{MAX_YEAR}-12"


def status_text(cell: Cell) -> str:
    text = _EN[cell.status].format(n=cell.late_days)
    if cell.status == "corrected" and cell.late_days:
        text += f" (first sent {cell.late_days} working days late)"
    if cell.early:
        text += f" ({EARLY_NOTE})"
    if cell.withdrawn:
        text += " (revoked)"
    if cell.paper:
        text += " (received on paper)"
    if cell.ignored:
        text += f" (ignored: {', '.join(cell.ignored)} names no report in force)"
    return text


def _at(text: str | None) -> datetime:
    if text:
        return in_calendar(parse_time(text, naive=VN_TZ), f"--at {text!r}")
    return in_calendar(now(), "the current time")


def month_option(text: str, option: str) -> str:
    """``text``, a month given as ``option`` (YYYY-MM), checked: one the working-day calendar
    covers, or one clear line saying what is wrong with it."""
    try:
        first, _ = month_bounds(text)
    except ValueError:
        raise InputError(
            f"{option} {text!r} is not a month; write it as YYYY-MM (e.g. 2026-10)"
        ) from None
    if not MIN_YEAR <= first.year <= MAX_YEAR:
        raise InputError(
            f"{option} {text} is outside {FIRST_MONTH} – {LAST_MONTH}, the months the "
            "working-day calendar covers"
        )
    return text


html_option = click.option(
    "--html",
    "html_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the printable page (in Vietnamese) to FILE.",
)


def _one_format(as_json: bool, as_csv: bool, html_file: Path | None) -> None:
    if as_json + as_csv + (html_file is not None) > 1:
        raise InputError("choose one of --json, --csv and --html")


def _write(path: Path, page: str) -> None:
    try:
        path.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror}") from None


def _csv_safe(value: Any) -> str:
    """A CSV field that a spreadsheet shows as text, never runs as a formula."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def report_csv(reports: Iterable[Report], names: dict[str, str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for report in reports:
        for cell in report.cells:
            d = cell.as_dict(report.calendar_version)
            period = d.pop("period")
            row = {
                **d,
                "period": report.period,
                "provider_name": names.get(cell.obligation.provider, ""),
                "obligation": cell.obligation.id,
                "period_label": period["label"],
                "period_first": period["first"],
                "period_last": period["last"],
                "ignored_corrections": " ".join(d["ignored_corrections"]),
            }
            writer.writerow([_csv_safe(row[c]) for c in CSV_COLUMNS])
    return out.getvalue()


def _minute(at: datetime) -> str:
    return at.astimezone(VN_TZ).isoformat(sep=" ", timespec="minutes")[:16]


def _text(report: Report) -> None:
    counts = ", ".join(f"{k.replace('-', ' ')} {v}" for k, v in report.counts().items() if v)
    click.echo(
        f"Period {report.period} as at {_minute(report.at)} (UTC+7) — "
        f"calendar {report.calendar_version}"
    )
    click.echo(counts or "no obligation has a period ending in this month")
    for cell in sorted(report.cells, key=lambda c: (c.obligation.provider, c.obligation.category)):
        ob = cell.obligation
        doc = f"  {cell.document_id}" if cell.document_id else ""
        click.echo(
            f"{ob.provider:<18} {ob.category:<20} {cell.period.label:<8} due {cell.due}  "
            f"{status_text(cell)}{doc}"
        )


@compliance.command("status")
@click.option("--period", required=True, metavar="YYYY-MM", help="The month periods end in.")
@click.option("--at", "at_text", metavar="TIME", help="Status as at TIME (default: now).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV, one row per obligation.")
@html_option
@click.pass_context
def status_cmd(
    ctx: click.Context,
    period: str,
    at_text: str | None,
    as_json: bool,
    as_csv: bool,
    html_file: Path | None,
) -> None:
    """The status of every obligation whose period ends in month PERIOD: on time, late (by how
    many working days), corrected, rejected only, missing, or not due yet; a report sent before
    its period ended is noted beside its status."""
    _one_format(as_json, as_csv, html_file)
    period, at = month_option(period, "--period"), _at(at_text)
    cal = calendar_of(load_settings(ctx))
    with _session(ctx) as s:
        obligations = obligation_store.obligations(s)
        submissions = ledger.submissions(s, [period])
        names = ledger.agency_names(s)
        ledger.log_read(
            s, at=now(), actor=actor(), action="compliance.status", target=f"period={period}"
        )
    report = matrix(obligations, submissions, cal, period, at)
    if as_json:
        emit_json(report.as_dict())
    elif as_csv:
        click.echo(report_csv([report], names), nl=False)
    elif html_file is not None:
        _write(html_file, compliance_html.render(report, names, generated=now()))
        click.echo(f"wrote {html_file}: {len(report.cells)} obligations, period {period}")
    else:
        _text(report)


@compliance.command("history")
@click.option("--agency", required=True, metavar="ORGAN_ID", help="The providing agency.")
@click.option("--from", "first", metavar="YYYY-MM", help="First month (default: 11 before --to).")
@click.option("--to", "last", metavar="YYYY-MM", help="Last month (default: this month).")
@click.option("--at", "at_text", metavar="TIME", help="Status as at TIME (default: now).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV, one row per obligation.")
@html_option
@click.pass_context
def history_cmd(
    ctx: click.Context,
    agency: str,
    first: str | None,
    last: str | None,
    at_text: str | None,
    as_json: bool,
    as_csv: bool,
    html_file: Path | None,
) -> None:
    """One agency's status month by month (months × categories in the HTML)."""
    _one_format(as_json, as_csv, html_file)
    at = _at(at_text)
    if last is None:
        day = local_day(at)
        last = f"{day.year:04}-{day.month:02}"
    last = month_option(last, "--to")
    if first is None:
        end = month_bounds(last)[0]
        index = max(end.year * 12 + end.month - 1 - 11, MIN_YEAR * 12)  # 11 months before
        first = f"{index // 12:04}-{index % 12 + 1:02}"
    try:
        labels = month_labels(month_option(first, "--from"), last)
    except ValueError as exc:
        raise InputError(f"--from/--to: {exc}") from None
    with _session(ctx) as s:
        names = ledger.agency_names(s)
        if agency not in names:
            raise InputError(f"no agency {agency!r}; `gateway agencies list` shows them")
        obligations = obligation_store.obligations(s, provider=agency)
        submissions = ledger.submissions(s, labels, agency=agency)
        target = f"agency={agency} from={labels[0]} to={labels[-1]}"
        ledger.log_read(s, at=now(), actor=actor(), action="compliance.history", target=target)
    reports = history(
        obligations, submissions, calendar_of(load_settings(ctx)), labels, at, provider=agency
    )
    if as_json:
        emit_json(
            {"agency": agency, "name": names[agency], "months": [r.as_dict() for r in reports]}
        )
        return
    if as_csv:
        click.echo(report_csv(reports, names), nl=False)
        return
    if html_file is not None:
        page = compliance_html.render_history(agency, names[agency], reports, generated=now())
        _write(html_file, page)
        click.echo(f"wrote {html_file}: {agency}, {labels[0]} to {labels[-1]}")
        return
    click.echo(f"{agency} — {names[agency]}: {labels[0]} to {labels[-1]}")
    for report in reports:
        for cell in report.cells:
            click.echo(
                f"{report.period}  {cell.obligation.category:<20} {cell.period.label:<8} "
                f"due {cell.due}  {status_text(cell)}"
            )
        if not report.cells:
            click.echo(f"{report.period}  (nothing due)")


# --- requests and deemed consent --------------------------------------------------------------


def _request_line(st: RequestStatus) -> str:
    r = st.request
    state = st.state.replace("-", " ")
    if st.state == "answered-late":
        state += f" ({st.late_days} working days)"
    if st.reply is not None:
        state += f" by {st.reply.document_id}"
    return (
        f"{r.document_id}  {r.requester} → {st.addressee}  deadline {st.deadline}  {state}"
        f"\n{'':4}{st.rule}; calendar {st.calendar_version}"
    )


@compliance.command("requests")
@click.option("--at", "at_text", metavar="TIME", help="State as at TIME (default: now).")
@click.option("--state", type=click.Choice(REQUEST_STATES), help="Only requests in this state.")
@click.option(
    "--chair", is_flag=True, help="Only what the chair's report lists: deemed consent, late."
)
@click.option(
    "--record",
    is_flag=True,
    help="File a deemed-consent entry in the archive for each new one (once each).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def requests_cmd(
    ctx: click.Context,
    at_text: str | None,
    state: str | None,
    chair: bool,
    record: bool,
    as_json: bool,
) -> None:
    """Ad-hoc requests per addressee: open, answered, answered late, or deemed consent (no
    reply by the deadline: QĐ 1342/QĐ-UBND 2023 Điều 7.3.a)."""
    at = _at(at_text)
    if record and at > now():
        raise InputError(
            "--record files what is true now, and the archive keeps it for good: not with a "
            f"--at in the future ({at_text}); look ahead without --record"
        )
    with _session(ctx) as s:
        requests, replies = ledger.requests_and_replies(s)
        statuses = requests_status(requests, replies, calendar_of(load_settings(ctx)), at)
        recorded = ledger.record_deemed_consent(s, statuses, at=now()) if record else []
        ledger.log_read(s, at=now(), actor=actor(), action="compliance.requests", target="all")
    shown = [
        st
        for st in statuses
        if (state is None or st.state == state) and (not chair or st.for_chair)
    ]
    if as_json:
        emit_json(
            {
                "at": at.isoformat(),
                "recorded": [e.seq for e in recorded],
                "requests": [st.as_dict() for st in shown],
            }
        )
        return
    for st in shown:
        click.echo(_request_line(st))
    if not shown:
        click.echo("(no requests)")
    if record:
        click.echo(f"recorded {len(recorded)} new deemed consent(s) in the archive")
