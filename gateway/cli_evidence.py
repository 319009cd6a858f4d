"""``gateway keys crls …`` and ``gateway keys ocsp …``: the revocation evidence the hub checks
signers against: CRLs imported or fetched from distribution points, OCSP responses fetched from
responders. Each command works in one database transaction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from gateway.cli import actor as who
from gateway.cli import db_session, emit_json, load_settings, now
from keys import evidence, fetch, files, ocsp


@click.group()
def crls() -> None:
    """Certificate revocation lists the hub checks signers against."""


@crls.command("import")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.pass_context
def crls_import(ctx: click.Context, file: Path) -> None:
    """Import a CRL by hand (PEM or DER). Its signature is checked when it is used."""
    crl = files.load_crl(file)
    with db_session(ctx) as s:
        added = evidence.add_crl(s, crl, source=f"import {file.name}", at=now(), actor=who())
    click.echo(
        ("stored" if added else "already stored") + f": CRL of {crl.issuer.rfc4514_string()}"
    )


@crls.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def crls_list(ctx: click.Context, as_json: bool) -> None:
    """Stored CRLs, with their freshness."""
    at = now()
    with db_session(ctx) as s:
        rows = evidence.crl_rows(s)
    out: list[dict[str, Any]] = [
        {
            "issuer": r.issuer,
            "number": r.number,
            "this_update": r.this_update.isoformat(),
            "next_update": r.next_update.isoformat() if r.next_update else None,
            "fresh": r.next_update is None or at <= r.next_update,
            "source": r.source,
            "sha256": r.sha256,
        }
        for r in rows
    ]
    if as_json:
        emit_json(out)
        return
    for r in out:
        state = "fresh" if r["fresh"] else "STALE"
        click.echo(
            f"{state:<6} #{r['number'] or '-':<5} next {r['next_update'] or '-':<26} {r['issuer']}"
        )
    if not out:
        click.echo("(none)")


@crls.command("fetch")
@click.option("--force", is_flag=True, help="Fetch even lists that are still fresh.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def crls_fetch(ctx: click.Context, force: bool, as_json: bool) -> None:
    """Download CRLs from the distribution points of stored certificates.

    Exit status 1 if any distribution point failed (the others are still stored).
    """
    with db_session(ctx) as s:
        outcomes = fetch.refresh(s, at=now(), actor=who(), force=force)
    if as_json:
        emit_json([o.__dict__ for o in outcomes])
    else:
        for o in outcomes:
            click.echo(f"{o.status:<9} {o.url}" + (f": {o.detail}" if o.detail else ""))
        if not outcomes:
            click.echo("no stored certificate names a CRL distribution point")
    ctx.exit(1 if any(o.status == "failed" for o in outcomes) else 0)


@click.group("ocsp")
def ocsp_group() -> None:
    """OCSP responses about stored certificates, fetched from their responders."""


@ocsp_group.command("fetch")
@click.option("--force", is_flag=True, help="Fetch even where the stored response is fresh.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def ocsp_fetch(ctx: click.Context, force: bool, as_json: bool) -> None:
    """Ask the OCSP responder of every agency certificate and intermediate about it.

    The responder is `[trust] ocsp_responder` if set, else each certificate's AIA OCSP URL.
    Exit status 1 if any certificate failed (the others are still stored).
    """
    responder = load_settings(ctx).trust.ocsp_responder
    with db_session(ctx) as s:
        outcomes = ocsp.refresh(s, at=now(), actor=who(), responder=responder, force=force)
    if as_json:
        emit_json([o.__dict__ for o in outcomes])
    else:
        for o in outcomes:
            click.echo(
                f"{o.status:<9} {o.serial:<40} {o.subject}" + (f": {o.detail}" if o.detail else "")
            )
        if not outcomes:
            click.echo(
                "no stored certificate names an OCSP responder, and [trust] ocsp_responder is "
                "not set"
            )
    ctx.exit(1 if any(o.status == "failed" for o in outcomes) else 0)


@ocsp_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def ocsp_list(ctx: click.Context, as_json: bool) -> None:
    """Stored OCSP responses, with the status they give and their freshness."""
    at = now()
    with db_session(ctx) as s:
        rows = evidence.ocsp_rows(s)
    out: list[dict[str, Any]] = [
        {
            "issuer": r.issuer,
            "serial": r.number,
            "status": ocsp.status_of(r.der),
            "this_update": r.this_update.isoformat(),
            "next_update": r.next_update.isoformat() if r.next_update else None,
            "fresh": r.next_update is not None and at <= r.next_update,
            "source": r.source,
            "sha256": r.sha256,
        }
        for r in rows
    ]
    if as_json:
        emit_json(out)
        return
    for r in out:
        state = "fresh" if r["fresh"] else "STALE"
        click.echo(
            f"{state:<6} {r['serial']:<40} next {r['next_update'] or '-':<26} {r['status']} "
            f"({r['issuer']})"
        )
    if not out:
        click.echo("(none)")
