"""``gateway check MESSAGE.eml``: the offline verdict on one message."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import click

from formats.errors import InputError
from gateway.cli import emit_json, load_settings, parse_time
from gateway.loading import load_context
from gateway.pipeline import process
from gateway.verdict import Verdict


@click.command()
@click.argument("message", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
@click.option(
    "--at",
    "at_text",
    metavar="ISO-TIME",
    help="Judge certificates and revocation at this instant (default: now).",
)
@click.pass_context
def check(ctx: click.Context, message: Path, as_json: bool, at_text: str | None) -> None:
    """Decrypt, verify and validate MESSAGE offline; print the verdict and every reason.

    Exit status: 0 accepted, 1 refused (rejected, quarantined or to be retried).
    """
    at = _parse_at(at_text)
    try:
        raw = message.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {message}: {exc.strerror}") from None
    settings = load_settings(ctx)
    verdict = process(raw, load_context(settings), at=at)
    if as_json:
        emit_json(verdict.as_dict())
    else:
        click.echo(render(verdict))
    ctx.exit(0 if verdict.accepted else 1)


def _parse_at(text: str | None) -> datetime:
    if not text:
        return datetime.now(UTC)
    return parse_time(text)


def render(verdict: Verdict) -> str:
    d = verdict.as_dict()
    lines = [f"verdict:   {d['disposition'].upper()}"]
    lines.append(f"from:      {d['from'] or '-'}   message-id: {d['message_id'] or '-'}")
    if "signer" in d:
        s = d["signer"]
        trusted = "" if s.get("trusted", True) else "  (NOT trusted)"
        lines.append(f"signer:    {s['subject']} serial {s['serial']}{trusted}")
    if "agency" in d:
        lines.append(f"agency:    {d['agency']['organ_id']} {d['agency']['name']}")
    if "payload" in d:
        p = d["payload"]
        period = f"{p['period_start']} → {p['period_end']}" if p["period_start"] else "-"
        lines.append(f"category:  {p['category']} ({p['cadence']})   period: {period}")
        lines.append(f"document:  {p['document_id']}   records: {p['records']}")
    if "crypto" in d:
        c = d["crypto"]
        lines.append(
            f"crypto:    {c['cipher']} / {c['key_transport']} / {c['signature']} ({c['style']})"
        )
    lines.append("steps:     " + ", ".join(f"{k} {v}" for k, v in d["steps"].items()))
    for reason in d["reasons"]:
        lines.append(f"reason:    [{reason['code']}] {reason['message']}")
        vi = reason["reason_vi"]
        lines.append(
            f"           {vi}: {reason['message_vi']}"
            if "message_vi" in reason
            else f"           {vi}"
        )
    return "\n".join(lines)
