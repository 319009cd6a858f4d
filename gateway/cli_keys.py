"""``gateway keys …``: certificates, trust anchors, the hub's keys, expiry (the CA commands are in
``gateway.cli_ca``, revocation evidence in ``gateway.cli_evidence``).

Every command works in one database transaction: a refused import or change leaves nothing
half-written, and every change is recorded as an admin event.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy.orm import Session

from formats.errors import ConfigError, DatabaseDamaged, GatewayError, InputError
from formats.vntime import VN_TZ
from gateway.cli import actor as who
from gateway.cli import db_session, emit_json, load_settings, now, parse_time
from gateway.cli_ca import ca, crl_cmd, issue_cmd, revoke_cmd
from gateway.cli_evidence import crls, ocsp_group
from gateway.loading import passphrase as settings_passphrase
from gateway.loading import stored_trust, usable_hub_certificates
from gateway.settings import Settings
from keys import directory, files, inspect, issuing, store
from keys.store import StoredCertificate
from keys.trust import TrustStore, emails_of

_P12 = (".p12", ".pfx")


@click.group()
def keys() -> None:
    """Manage certificates, trust anchors, the hub's keys and revocation evidence."""


keys.add_command(ca)
keys.add_command(issue_cmd)
keys.add_command(revoke_cmd)
keys.add_command(crl_cmd)
keys.add_command(crls)
keys.add_command(ocsp_group)


# --- helpers -------------------------------------------------------------------------------------


def _instant(text: str | None, name: str) -> datetime | None:
    if text is None:
        return None
    return parse_time(text, option=name, naive=VN_TZ)  # no offset: Vietnam time


#: The farthest horizon ``--within`` takes: 100 years, beyond any certificate's end.
MAX_HORIZON = timedelta(days=36500)
_UNITS = {"d": timedelta(days=1), "w": timedelta(weeks=1), "h": timedelta(hours=1)}


def _duration(text: str, option: str = "--within") -> timedelta:
    match = re.fullmatch(r"\s*(\d+)\s*([dwh])\s*", text)
    if not match:
        raise InputError(f"{option} {text!r} is not a duration like 60d, 8w or 12h")
    n, letter = int(match.group(1)), match.group(2)
    most = MAX_HORIZON // _UNITS[letter]
    if n > most:  # before any timedelta arithmetic, which overflows
        also = "" if letter == "d" else f" ({most}{letter})"
        raise InputError(f"{option} {text.strip()}: give at most {MAX_HORIZON.days} days{also}")
    return n * _UNITS[letter]


def _p12_passphrase(passphrase_file: Path | None) -> bytes | None:
    if passphrase_file is not None:
        try:
            return passphrase_file.read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise InputError(f"cannot read {passphrase_file}: {exc.strerror}") from None
    value = os.environ.get("GATEWAY_P12_PASSPHRASE")
    if value:
        return value.encode()
    if sys.stdin.isatty():
        return (
            click.prompt(
                "PKCS#12 passphrase", hide_input=True, default="", show_default=False
            ).encode()
            or None
        )
    return None


def key_passphrase(ctx: click.Context) -> bytes:
    """The passphrase that protects the hub's and CA's private keys at rest."""
    settings = load_settings(ctx)
    secret = settings_passphrase(settings)
    if secret:
        return secret
    if sys.stdin.isatty():
        return click.prompt("key store passphrase", hide_input=True).encode()
    raise ConfigError(
        f"no key passphrase: set ${settings.hub.passphrase_env} or [hub] passphrase_file in "
        f"{settings.config_file}"
    )


def _read_certificates(path: Path, passphrase_file: Path | None) -> list[x509.Certificate]:
    if path.suffix.lower() in _P12:
        bundle = files.load_pkcs12(path, _p12_passphrase(passphrase_file))
        return [bundle.cert, *bundle.chain]
    return files.load_certificates(path)


def _show(certs: list[StoredCertificate], as_json: bool) -> None:
    if as_json:
        emit_json([c.as_dict() for c in certs])
        return
    if not certs:
        click.echo("(none)")
    for c in certs:
        end = min(c.not_after, c.use_until or c.not_after)
        state = "retired" if c.retired_at else f"until {end:%Y-%m-%d}"
        holder = c.organ_id or "-"
        click.echo(f"{c.sha256[:16]}  {c.role:<12} {holder:<10} {state:<17} {c.subject}")


# --- agency certificates -------------------------------------------------------------------------


@keys.command("import")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--agency", "organ_id", required=True, help="OrganId the certificate belongs to.")
@click.option("--from", "use_from", metavar="TIME", help="Do not accept it before this time.")
@click.option("--until", "use_until", metavar="TIME", help="Do not accept it after this time.")
@click.option("--passphrase-file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def import_cmd(
    ctx: click.Context,
    file: Path,
    organ_id: str,
    use_from: str | None,
    use_until: str | None,
    passphrase_file: Path | None,
    as_json: bool,
) -> None:
    """Enrol an agency's certificate (PEM, DER, PKCS#7 or PKCS#12; only the certificate is kept).

    Several certificates may be enrolled at once: old and new overlap during a rollover; end
    the old one's use with `gateway keys window REF --until TIME`.
    """
    certs = _read_certificates(file, passphrase_file)
    at = now()
    with db_session(ctx) as s:
        agency = store.get_agency(s, organ_id)
        leaf = _leaf(certs, file)
        inspect.require(
            inspect.agency_problems(leaf, agency, at), leaf, f"a certificate of {organ_id}"
        )
        stored = store.add_certificate(
            s,
            leaf,
            role="agency",
            organ_id=organ_id,
            use_from=_instant(use_from, "--from"),
            use_until=_instant(use_until, "--until"),
            source=f"import {file.name}",
            at=at,
            actor=who(),
        )
    _show([stored], as_json)


def _leaf(certs: list[x509.Certificate], file: Path) -> x509.Certificate:
    """The one end-entity certificate of a file or bundle (its CA certificates are ignored:
    import those with `gateway keys anchors import`)."""
    leaves = [c for c in certs if not inspect.is_ca(c)]
    if len(leaves) != 1:
        found = ", ".join(inspect.describe(c) for c in leaves) or "only CA certificates"
        raise InputError(
            f"{file.name}: expected exactly one agency (end-entity) certificate, found {found}; "
            "import one certificate at a time"
        )
    return leaves[0]


@keys.command("list")
@click.option("--agency", "organ_id", help="Only this agency's certificates.")
@click.option("--role", type=click.Choice(store.ROLES), help="Only certificates of this role.")
@click.option("--all", "include_retired", is_flag=True, help="Include retired certificates.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_cmd(
    ctx: click.Context, organ_id: str | None, role: str | None, include_retired: bool, as_json: bool
) -> None:
    """List stored certificates."""
    with db_session(ctx) as s:
        certs = store.certificates(s, role=role, organ_id=organ_id, include_retired=include_retired)
    _show(certs, as_json)


@keys.command("window")
@click.argument("ref")
@click.option("--from", "use_from", metavar="TIME")
@click.option("--until", "use_until", metavar="TIME")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def window_cmd(
    ctx: click.Context, ref: str, use_from: str | None, use_until: str | None, as_json: bool
) -> None:
    """Set when certificate REF (fingerprint prefix or serial) may be used."""
    if use_from is None and use_until is None:
        raise InputError("give --from and/or --until")
    with db_session(ctx) as s:
        stored = store.set_window(
            s,
            ref,
            use_from=_instant(use_from, "--from"),
            use_until=_instant(use_until, "--until"),
            at=now(),
            actor=who(),
        )
    _show([stored], as_json)


@keys.command("retire")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def retire_cmd(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Stop using certificate REF now (its row and history stay)."""
    with db_session(ctx) as s:
        stored = store.retire_certificate(s, ref, at=now(), actor=who())
    _show([stored], as_json)


@keys.command("expiring")
@click.option("--within", default="60d", show_default=True, help="Horizon: 60d, 8w, 12h.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def expiring_cmd(ctx: click.Context, within: str, as_json: bool) -> None:
    """Certificates whose use ends within the horizon (and those already ended), soonest first."""
    at = now()
    with db_session(ctx) as s:
        certs = store.expiring(s, at=at, until=at + _duration(within))
    if as_json:
        emit_json(
            [
                {**c.as_dict(), "ends": _end(c).isoformat(), "days_left": (_end(c) - at).days}
                for c in certs
            ]
        )
        return
    for c in certs:
        days = (_end(c) - at).days
        when = f"ended {-days} days ago" if days < 0 else f"{days} days left"
        click.echo(
            f"{_end(c):%Y-%m-%d}  {when:<16} {c.role:<12} {c.organ_id or '-':<10} {c.subject}"
        )
    if not certs:
        click.echo(f"nothing ends within {within}")


def _end(c: StoredCertificate) -> datetime:
    return min(c.not_after, c.use_until or c.not_after)


# --- trust anchors -------------------------------------------------------------------------------


@keys.group()
def anchors() -> None:
    """Trust anchors (CA roots) and intermediates that agency certificates chain to."""


@anchors.command("import")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--intermediate", is_flag=True, help="Import as intermediate(s), not anchors.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def anchors_import(ctx: click.Context, file: Path, intermediate: bool, as_json: bool) -> None:
    """Import CA certificates (PEM, DER or PKCS#7 bundle) — all of them or none."""
    role = "intermediate" if intermediate else "anchor"
    certs = files.load_certificates(file)
    at = now()
    with db_session(ctx) as s:
        for cert in certs:
            inspect.require(inspect.ca_problems(cert, at), cert, f"a trust {role}")
        stored = [
            store.add_certificate(s, c, role=role, source=f"import {file.name}", at=at, actor=who())
            for c in certs
        ]
    _show(stored, as_json)


@anchors.command("list")
@click.option("--all", "include_retired", is_flag=True, help="Include retired ones.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def anchors_list(ctx: click.Context, include_retired: bool, as_json: bool) -> None:
    """List trust anchors and intermediates."""
    with db_session(ctx) as s:
        certs = store.certificates(
            s, role=("anchor", "intermediate"), include_retired=include_retired
        )
    _show(certs, as_json)


@anchors.command("retire")
@click.argument("ref")
@click.pass_context
def anchors_retire(ctx: click.Context, ref: str) -> None:
    """Stop trusting anchor or intermediate REF."""
    with db_session(ctx) as s:
        row = store.find_certificate(s, ref)
        if row.role not in ("anchor", "intermediate"):
            raise InputError(f"{ref} is a {row.role} certificate, not a trust anchor")
        store.retire_certificate(s, ref, at=now(), actor=who())
    click.echo(f"retired {row.sha256[:16]} {row.subject}")


# --- the hub's own keys --------------------------------------------------------------------------


@keys.group()
def hub() -> None:
    """The hub's decryption and signing keys. Every unretired key inside its window decrypts;
    the newest signs."""


#: Longest a hub certificate from the built-in CA may run (as `keys issue` for agencies).
MAX_HUB_DAYS = 3650


def _hub_problems(
    cert: x509.Certificate,
    chain: Sequence[x509.Certificate],
    *,
    address: str,
    trust: TrustStore | None,
    at: datetime,
) -> list[str]:
    """Everything that stops ``cert`` from being the hub's certificate at ``at``: an S/MIME
    certificate (:func:`keys.inspect.agency_problems`) that names the hub's ``address`` in its
    subjectAltName, that agencies can encrypt to (RSA, keyEncipherment), and whose path
    validates to one of the hub's trust anchors for e-mail signing (:mod:`keys.trust`, with
    the stored revocation evidence, soft-fail; ``None``: the hub has no anchor). ``chain`` may
    supply intermediates."""
    problems = inspect.agency_problems(cert, None, at)
    profile_ok = not problems  # else validating the path would repeat what is said already
    named = emails_of(cert)
    if named and address not in named:
        problems.append(
            f"its subjectAltName names {', '.join(named)}, not the hub's address {address} "
            "([hub] address in gateway.toml)"
        )
    usage = _key_usage(cert)
    if usage is not None and not usage.key_encipherment:
        problems.append(
            "its key usage does not allow keyEncipherment, so agencies cannot encrypt to it"
        )
    if trust is None:
        problems.append(
            "the hub has no trust anchor to validate its path to; import its CA first with "
            "`gateway keys anchors import`"
        )
    elif profile_ok:
        try:
            trust.validate_signer(cert, carried=chain, at=at)
        except GatewayError as err:
            problems.append(
                f"its path does not validate to a trust anchor of the hub: {err.message}"
            )
    return problems


def _key_usage(cert: x509.Certificate) -> x509.KeyUsage | None:
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None


def _hub_trust(ctx: click.Context, s: Session) -> TrustStore | None:
    """The anchors a hub certificate must chain to: the key store's (and those named in
    ``[trust]``), with the stored revocation evidence, soft-fail (no evidence: let through);
    ``None`` if there is no anchor at all."""
    try:
        trust = stored_trust(load_settings(ctx), s)
    except DatabaseDamaged:
        raise  # said as it is, not as a missing anchor
    except ConfigError:  # no trust anchor (the only other ConfigError load_trust raises)
        return None
    return dataclasses.replace(trust, revocation_mode="soft-fail")


def _hub_address(ctx: click.Context) -> str:
    address = load_settings(ctx).hub.address
    try:
        return directory.normalize_email(address)
    except ValueError:
        raise ConfigError(
            f"[hub] address {address!r} is not an e-mail address; set it in gateway.toml"
        ) from None


@hub.command("new")
@click.option("--email", help="The hub's address (default: [hub] address in settings).")
@click.option("--days", type=int, default=730, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def hub_new(ctx: click.Context, email: str | None, days: int, as_json: bool) -> None:
    """Issue a new hub key pair from the built-in CA. Older hub keys keep decrypting until
    retired with `gateway keys hub retire REF` (rotation with overlap)."""
    if not 1 <= days <= MAX_HUB_DAYS:
        raise InputError(f"--days {days}: give a number of days between 1 and {MAX_HUB_DAYS}")
    address = _hub_address(ctx)
    if email is not None and directory.comparable([email]) != {address}:
        raise InputError(
            f"--email {email}: the hub's certificate must name its address {address} ([hub] "
            "address in gateway.toml); change that setting first to give the hub another one"
        )
    secret = key_passphrase(ctx)
    at = now()
    with db_session(ctx) as s:
        cas = store.private_keys(s, role="ca", passphrase=secret, at=at)
        if not cas:
            raise ConfigError(
                "there is no built-in CA to issue the hub certificate; run `gateway keys ca "
                "init`, or import a hub key pair with `gateway keys hub import FILE.p12`"
            )
        ca_cert, ca_key = cas[0]
        if at + timedelta(days=days) > ca_cert.not_after:
            raise InputError(
                f"a {days}-day certificate would outlive the CA ({ca_cert.subject}, valid until "
                f"{ca_cert.not_after:%Y-%m-%d}); use fewer --days or rotate the CA with "
                "`gateway keys ca init --rotate`"
            )
        issued = issuing.issue_hub(
            issuing.Issued(ca_cert.certificate, ca_key), email=address, at=at, days=days
        )
        problems = _hub_problems(issued.cert, (), address=address, trust=_hub_trust(ctx, s), at=at)
        inspect.require(problems, issued.cert, "the hub's certificate")
        stored = store.add_private_key(
            s,
            issued.cert,
            issued.key,
            role="hub",
            passphrase=secret,
            at=at,
            actor=who(),
            source="built-in CA",
        )
    _show([stored], as_json)


@hub.command("import")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--passphrase-file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def hub_import(ctx: click.Context, file: Path, passphrase_file: Path | None, as_json: bool) -> None:
    """Import a hub key pair from PKCS#12; the key is stored encrypted with the key passphrase.

    The certificate must name the hub's address ([hub] address) and validate, for S/MIME, to
    one of the hub's trust anchors (import its CA first with `gateway keys anchors import`)."""
    if file.suffix.lower() not in _P12:
        raise InputError(f"{file.name}: the hub key pair must be a PKCS#12 file (.p12 or .pfx)")
    bundle = files.load_pkcs12(file, _p12_passphrase(passphrase_file))
    if not isinstance(bundle.key, rsa.RSAPrivateKey):
        raise InputError(f"{file.name}: the hub key must be RSA (agencies encrypt to it)")
    address = _hub_address(ctx)
    secret = key_passphrase(ctx)
    at = now()
    with db_session(ctx) as s:
        problems = _hub_problems(
            bundle.cert, bundle.chain, address=address, trust=_hub_trust(ctx, s), at=at
        )
        inspect.require(problems, bundle.cert, "the hub's certificate")
        stored = store.add_private_key(
            s,
            bundle.cert,
            bundle.key,
            role="hub",
            passphrase=secret,
            at=at,
            actor=who(),
            source=f"import {file.name}",
        )
    _show([stored], as_json)


@hub.command("list")
@click.option("--all", "include_retired", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def hub_list(ctx: click.Context, include_retired: bool, as_json: bool) -> None:
    """The hub's certificates, newest last."""
    with db_session(ctx) as s:
        certs = store.certificates(s, role="hub", include_retired=include_retired)
    _show(certs, as_json)


@hub.command("retire")
@click.argument("ref")
@click.pass_context
def hub_retire(ctx: click.Context, ref: str) -> None:
    """Retire hub key REF: messages encrypted to it no longer open, and it signs nothing more,
    whether it is held in the key store or (also) in the files named in [hub]."""
    settings = load_settings(ctx)
    at = now()
    with db_session(ctx) as s:
        row = store.find_certificate(s, ref)
        if row.role != "hub":
            raise InputError(f"{ref} is a {row.role} certificate, not one of the hub's")
        left = set(usable_hub_certificates(settings, s, at)) - {row.sha256}
        if not left:
            raise InputError(
                "this is the hub's last key usable now; create its successor first (`gateway "
                "keys hub new`)"
            )
        store.retire_certificate(s, ref, at=at, actor=who())
    click.echo(f"retired hub key {row.sha256[:16]}; {len(left)} key(s) remain")
    if in_files := _in_hub_files(settings, row.sha256):
        click.echo(
            f"note: {in_files} (named in [hub]) holds the same certificate; it is not used any "
            "more: remove it from [hub] certificates and private_keys, and delete the key file",
            err=True,
        )


def _in_hub_files(settings: Settings, sha256: str) -> str | None:
    """The [hub] certificate file that holds the certificate ``sha256``, if one does."""
    for cert_path in settings.hub.certificates:
        path = settings.path(cert_path)
        try:
            if path.exists() and store.fingerprint(files.load_certificates(path)[0]) == sha256:
                return str(path)
        except GatewayError:  # an unreadable file holds nothing we can name
            continue
    return None
