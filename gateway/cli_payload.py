"""``gateway payload``: build payloads from CSV, validate them, list the categories.

A thin adapter over :mod:`formats.payload` and :mod:`formats.csvimport`: it reads files, takes
the clock and a random ``MessageId`` (both overridable with options) and turns every
:class:`GatewayError` into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import uuid
from datetime import date
from pathlib import Path

import click

from formats.categories import CATEGORIES
from formats.csvimport import records_from_csv
from formats.errors import GatewayError
from formats.limits import DEFAULT_LIMITS
from formats.payload import Attachment, Business, Organ, Payload, Signer, build_payload

#: ``number/notation`` notation used when ``--document-number`` gives only a number
#: ("TTNNN": thông tin người nước ngoài, information about foreigners).
DEFAULT_NOTATION = "TTNNN"


def _organ(spec: str) -> Organ:
    """``ID`` or ``ID:email`` or ``ID:email:name``."""
    organ_id, _, rest = spec.partition(":")
    email, _, name = rest.partition(":")
    if not organ_id:
        raise click.BadParameter(f"{spec!r}: give the organ as ID, ID:email or ID:email:name")
    return Organ(organ_id, name or None, email or None)


def _date(value: str | None, option: str) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a date; write YYYY-MM-DD", param_hint=option
        ) from None


def _read(path: str, limit: int) -> bytes:
    try:
        with Path(path).open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as err:
        raise click.ClickException(f"cannot read {path}: {err.strerror}") from None
    if len(data) > limit:
        raise click.ClickException(f"{path} is larger than the limit of {limit} bytes")
    return data


def _attachment(path: str) -> Attachment:
    data = _read(path, DEFAULT_LIMITS.max_message_bytes)
    media_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return Attachment(Path(path).name, media_type, len(data), hashlib.sha256(data).hexdigest())


@click.group("payload")
def payload() -> None:
    """Build, validate and describe XML payloads (QĐ 18/2017 Điều 8 categories)."""


@payload.command("build")
@click.option("--category", required=True, type=click.Choice(list(CATEGORIES)))
@click.option("--period", help="Monthly period YYYY-MM (16th of the previous month to the 15th).")
@click.option("--from-csv", "csv_path", required=True, type=click.Path(dir_okay=False))
@click.option("--from", "sender", required=True, help="Sender organ: ID, ID:email or ID:email:name")
@click.option("--to", "recipients", required=True, multiple=True, help="Recipient organ (repeat).")
@click.option(
    "--document-number",
    default="1",
    show_default=True,
    help=f"edXML number/notation; a bare number gets /{DEFAULT_NOTATION}.",
)
@click.option("--issued-on", help="Document date YYYY-MM-DD (default: today).")
@click.option("--message-id", help="MessageId UUID (default: a random one).")
@click.option("--subject")
@click.option("--signer", help="Full name of the signer.")
@click.option("--signer-position")
@click.option("--due-date", help="Deadline YYYY-MM-DD (required for a request).")
@click.option("--response-for", help="DocumentId answered (required for reply and status).")
@click.option("--request-ref", help="Reference of the request this exchange answers.")
@click.option(
    "--attach",
    "attachments",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="File to list in the attachments manifest (repeat).",
)
@click.option("--out", type=click.Path(dir_okay=False), help="Output file (default: stdout).")
def build(
    category: str,
    period: str | None,
    csv_path: str,
    sender: str,
    recipients: tuple[str, ...],
    document_number: str,
    issued_on: str | None,
    message_id: str | None,
    subject: str | None,
    signer: str | None,
    signer_position: str | None,
    due_date: str | None,
    response_for: str | None,
    request_ref: str | None,
    attachments: tuple[str, ...],
    out: str | None,
) -> None:
    """Build a payload from a CSV file of records and write it as XML."""
    raw = _read(csv_path, DEFAULT_LIMITS.max_xml_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise click.ClickException(
            f"{csv_path} is not UTF-8 (byte {err.start}); save it as CSV UTF-8"
        ) from None
    try:
        mid = uuid.UUID(message_id) if message_id else uuid.uuid4()
    except ValueError:
        raise click.BadParameter(
            f"{message_id!r} is not a UUID", param_hint="--message-id"
        ) from None
    number = document_number if "/" in document_number else f"{document_number}/{DEFAULT_NOTATION}"
    try:
        built = build_payload(
            category,
            sender=_organ(sender),
            recipients=[_organ(r) for r in recipients],
            records=records_from_csv(category, text),
            document_number=number,
            issued_on=_date(issued_on, "--issued-on") or date.today(),
            message_id=mid,
            subject=subject,
            period=period,
            signer=Signer(signer, signer_position) if signer else None,
            due_date=_date(due_date, "--due-date"),
            response_for=response_for,
            request_ref=request_ref,
            business=Business.NEW,
            attachments=[_attachment(a) for a in attachments],
        )
    except GatewayError as err:
        raise click.ClickException(str(err)) from None
    xml = built.to_xml()
    if out is None:
        click.echo(xml, nl=False)
    else:
        try:
            Path(out).write_bytes(xml)
        except OSError as err:
            raise click.ClickException(f"cannot write {out}: {err.strerror}") from None
        click.echo(f"wrote {out}: {category}, {len(built.records)} records", err=True)


def _summary(p: Payload) -> dict[str, object]:
    x = p.exchange
    period = f"{x.period_start}..{x.period_end}" if x.period_start else None
    return {
        "ok": True,
        "category": x.category,
        "cadence": x.cadence,
        "period": period,
        "records": len(p.records),
        "message_id": str(p.header.message_id),
        "document_id": str(p.header.document_id),
    }


@payload.command("validate")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def validate(file: str, as_json: bool) -> None:
    """Validate FILE: print OK and a summary, or every error with line and column."""
    data = _read(file, DEFAULT_LIMITS.max_xml_bytes)
    try:
        parsed = Payload.from_xml(data)
    except GatewayError as err:
        if as_json:
            click.echo(json.dumps({"ok": False, "error": err.as_dict()}, ensure_ascii=False))
        else:
            click.echo(f"{file}: INVALID: {err.message}", err=True)
            for line in (err.detail or "").splitlines()[1:]:
                click.echo(f"  {line}", err=True)
        raise SystemExit(1) from None
    summary = _summary(parsed)
    if as_json:
        click.echo(json.dumps(summary, ensure_ascii=False))
    else:
        click.echo(
            f"OK {file}: category={summary['category']} period={summary['period'] or '-'} "
            f"records={summary['records']}"
        )


@payload.command("categories")
@click.option("--json", "as_json", is_flag=True, help="Print the categories as JSON.")
def categories(as_json: bool) -> None:
    """List the categories: code, Article 8 point, title and CSV columns."""
    if as_json:
        rows = [
            {
                "code": c.code,
                "point": c.point,
                "title_vi": c.title_vi,
                "title_en": c.title_en,
                "provider": c.provider,
                "xsd": c.xsd,
                "columns": list(c.columns),
                "required": [f.name for f in c.fields if f.required],
            }
            for c in CATEGORIES.values()
        ]
        click.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    for c in CATEGORIES.values():
        click.echo(f"{c.code:22} {c.point or '-':22} {c.title_en}")
