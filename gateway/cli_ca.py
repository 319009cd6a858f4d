"""``gateway keys ca …`` and ``gateway keys issue|revoke|crl``: the built-in CA.

A thin adapter over :mod:`keys.ca`: read settings and secrets, open one database session per
command (so a refused or failed command writes nothing), print the result. The CA key's
passphrase is the hub's (``[hub] passphrase_file`` or ``passphrase_env``), prompted for on a
terminal when neither is set. An issued agency key leaves the hub only inside a PKCS#12 file
whose passphrase comes from ``--passphrase-file``, ``$GATEWAY_P12_PASSPHRASE`` or is generated
and printed once.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from formats.errors import ConfigError, InputError
from gateway.cli import actor, emit_json, load_settings, now, parse_time
from gateway.cli import db_session as _session
from gateway.loading import passphrase as configured_passphrase
from keys import ca as ca_mod
from keys.issuing import pkcs12_bundle

P12_ENV = "GATEWAY_P12_PASSPHRASE"
CRL_URL_ENV = "GATEWAY_CA_CRL_URL"

_json = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


@click.group()
def ca() -> None:
    """The built-in CA, for deployments without a national CA."""


def _ca_secret(ctx: click.Context, *, confirm: bool = False) -> bytes:
    settings = load_settings(ctx)
    secret = configured_passphrase(settings)
    if secret:
        return secret
    if not sys.stdin.isatty():
        raise ConfigError(
            "no passphrase for the CA key: set the environment variable "
            f"{settings.hub.passphrase_env} or [hub] passphrase_file in {settings.config_file}"
        )
    value = click.prompt(
        "CA key passphrase", hide_input=True, confirmation_prompt=confirm, err=True
    )
    if not value:
        raise ConfigError("an empty passphrase cannot protect the CA key")
    return str(value).encode()


@ca.command("init")
@click.option("--name", default="Official-Mail Gateway Root CA", show_default=True)
@click.option("--days", type=int, default=3650, show_default=True, help="Root validity.")
@click.option(
    "--key",
    "key_kind",
    type=click.Choice(ca_mod.CA_KEY_KINDS),
    default="rsa4096",
    show_default=True,
)
@click.option("--rotate", is_flag=True, help="Create a new root beside the existing one(s).")
@click.option("--crl-days", type=int, default=7, show_default=True, help="First CRL's lifetime.")
@_json
@click.pass_context
def init_cmd(
    ctx: click.Context,
    name: str,
    days: int,
    key_kind: ca_mod.CAKeyKind,
    rotate: bool,
    crl_days: int,
    as_json: bool,
) -> None:
    """Create the built-in root CA (key encrypted at rest) and trust it as an anchor."""
    secret = _ca_secret(ctx, confirm=True)
    with _session(ctx) as s:
        authority, crl = ca_mod.init(
            s,
            name=name,
            days=days,
            passphrase=secret,
            at=now(),
            actor=actor(),
            rotate=rotate,
            key_kind=key_kind,
            crl_days=crl_days,
        )
    out = {**ca_mod.describe(authority), "rotated": rotate, "crl": _crl_info(crl)}
    if as_json:
        emit_json(out)
        return
    click.echo(f"{'new root' if rotate else 'built-in CA'}: {out['subject']}")
    click.echo(f"serial {out['serial']}, valid until {out['not_after']}")
    click.echo(f"sha256 {out['sha256']}")
    click.echo(f"first CRL #{out['crl']['number']} valid until {out['crl']['next_update']}")
    click.echo("run `gateway keys crl` (e.g. daily from cron) before that: revocation is hard-fail")


@click.command("issue")
@click.argument("organ_id")
@click.option("--email", help="The agency mailbox to certify (needed if it has several).")
@click.option("--days", type=int, default=730, show_default=True)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(),
    help="Directory for ORGAN_ID.p12, ORGAN_ID.pem and ORGAN_ID-chain.pem (default: .).",
)
@click.option(
    "--key",
    "key_kind",
    type=click.Choice(ca_mod.AGENCY_KEY_KINDS),
    default="rsa3072",
    show_default=True,
)
@click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"PKCS#12 passphrase (default: ${P12_ENV}, else one is generated and shown once).",
)
@click.option("--crl-url", envvar=CRL_URL_ENV, help="CRL distribution point URL to embed.")
@_json
@click.pass_context
def issue_cmd(
    ctx: click.Context,
    organ_id: str,
    email: str | None,
    days: int,
    out: Path,
    key_kind: ca_mod.AgencyKeyKind,
    passphrase_file: Path | None,
    crl_url: str | None,
    as_json: bool,
) -> None:
    """Issue an S/MIME certificate to agency ORGAN_ID and register it to the agency."""
    p12_secret, generated = _p12_secret(passphrase_file)
    if len(p12_secret) < 8:
        raise InputError("the PKCS#12 passphrase must have at least 8 characters")
    secret = _ca_secret(ctx)
    base = re.sub(r"[^A-Za-z0-9._-]", "_", organ_id).lstrip(".") or "agency"
    paths = {k: out / f"{base}{k}" for k in (".p12", ".pem", "-chain.pem")}
    if existing := [str(p) for p in paths.values() if p.exists()]:
        raise InputError(f"{', '.join(existing)} already exist(s); move them away or use --out")
    written: list[Path] = []
    try:
        with _session(ctx) as s:
            issued, stored, authority = ca_mod.issue(
                s,
                organ_id,
                passphrase=secret,
                at=now(),
                actor=actor(),
                email=email,
                days=days,
                key_kind=key_kind,
                crl_url=crl_url,
            )
            chain = [authority.issued.cert]
            try:
                bundle = pkcs12_bundle(
                    issued, chain, passphrase=p12_secret, name=f"{organ_id} {stored.emails[0]}"
                )
            except ValueError as exc:
                raise InputError(str(exc)) from None
            out.mkdir(parents=True, exist_ok=True)
            _write(paths[".p12"], bundle, written, private=True)
            _write(paths[".pem"], issued.cert_pem(), written)
            _write(paths["-chain.pem"], _pem(*chain), written)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    info: dict[str, Any] = {
        "organ_id": organ_id,
        **ca_mod.describe(stored),
        "email": stored.emails[0],
        "issuer": authority.name,
        "files": {k.strip(".-").replace(".", "_"): str(p) for k, p in paths.items()},
        "p12_passphrase": p12_secret.decode() if generated else None,
    }
    if as_json:
        emit_json(info)
        return
    click.echo(f"issued to {organ_id} <{info['email']}>: serial {info['serial']}")
    click.echo(f"valid {info['not_before']} → {info['not_after']}")
    for path in paths.values():
        click.echo(f"wrote {path}")
    if generated:
        click.echo(
            f"PKCS#12 passphrase (shown only now; send it separately): {p12_secret.decode()}"
        )


@click.command("revoke")
@click.argument("serial")
@click.option("--reason", required=True, type=click.Choice(list(ca_mod.REASONS)))
@click.option("--at", "at_text", metavar="ISO-TIME", help="When it was revoked (default: now).")
@click.option("--crl-days", type=int, default=7, show_default=True, help="New CRL's lifetime.")
@_json
@click.pass_context
def revoke_cmd(
    ctx: click.Context, serial: str, reason: str, at_text: str | None, crl_days: int, as_json: bool
) -> None:
    """Revoke a certificate the built-in CA issued (SERIAL in hex) and publish a fresh CRL."""
    when = parse_time(at_text) if at_text else None
    secret = _ca_secret(ctx)
    with _session(ctx) as s:
        done = ca_mod.revoke(
            s,
            serial,
            reason=reason,
            passphrase=secret,
            at=now(),
            actor=actor(),
            revoked_at=when,
            crl_days=crl_days,
        )
    info = {
        **ca_mod.describe(done.stored),
        "organ_id": done.stored.organ_id,
        "reason": done.reason,
        "revoked_at": done.revoked_at.isoformat(),
        "crls": [_crl_info(c) for c in done.crls],
    }
    if as_json:
        emit_json(info)
        return
    holder = f" ({done.stored.organ_id})" if done.stored.organ_id else ""
    click.echo(f"revoked serial {info['serial']}{holder}: {done.reason}, {info['revoked_at']}")
    for crl in info["crls"]:
        click.echo(f"published CRL #{crl['number']} ({crl['entries']} entries)")


@click.command("crl")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the PEM here.")
@click.option("--days", type=int, default=7, show_default=True, help="Until nextUpdate.")
@_json
@click.pass_context
def crl_cmd(ctx: click.Context, out: Path | None, days: int, as_json: bool) -> None:
    """Sign a fresh CRL from the built-in CA (each root), kept as revocation evidence."""
    secret = _ca_secret(ctx)
    with _session(ctx) as s:
        crls = ca_mod.publish_crls(s, passphrase=secret, at=now(), actor=actor(), days=days)
    if out is not None:  # after the commit: the stored CRL is the evidence, the file a copy
        _write(out, _pem(*crls), [], replace=True)
    info = [_crl_info(c) for c in crls]
    if as_json:
        emit_json({"crls": info, "out": str(out) if out else None})
        return
    for c in info:
        click.echo(
            f"CRL #{c['number']} by {c['issuer']}: {c['entries']} revoked, until {c['next_update']}"
        )
    if out is not None:
        click.echo(f"wrote {out}")


for _cmd in (issue_cmd, revoke_cmd, crl_cmd):
    ca.add_command(_cmd)


# --- helpers -------------------------------------------------------------------------------------


def _p12_secret(path: Path | None) -> tuple[bytes, bool]:
    if path is not None:
        try:
            return path.read_bytes().rstrip(b"\r\n"), False
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror}") from None
    if value := os.environ.get(P12_ENV):
        return value.encode(), False
    return secrets.token_urlsafe(18).encode(), True


def _write(
    path: Path, data: bytes, written: list[Path], *, private: bool = False, replace: bool = False
) -> None:
    """Create ``path`` (never over an existing file unless ``replace``), 0600 if ``private``."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600 if private else 0o644)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror}") from None
    written.append(path)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _pem(*items: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    return b"".join(i.public_bytes(Encoding.PEM) for i in items)


def _crl_info(crl: x509.CertificateRevocationList) -> dict[str, Any]:
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    return {
        "issuer": crl.issuer.rfc4514_string(),
        "number": number,
        "this_update": crl.last_update_utc.isoformat(),
        "next_update": crl.next_update_utc.isoformat() if crl.next_update_utc else None,
        "entries": len(list(crl)),
        "serials": [f"{r.serial_number:x}" for r in crl],
    }
