"""``gateway send PAYLOAD.xml --as AGENCY``: submit for an agency that has no S/MIME mail client.

A thin adapter: it reads the payload, the agency's key, the directory and the hub's
certificates, builds the message with :func:`formats.smime.build_message` and hands it to the
relay (:mod:`gateway.relay`). Whatever the hub would refuse and can be known here is refused
first, in one line naming the mismatch. Plan:

1. the payload parses and validates (:meth:`Payload.from_xml`);
2. its ``From/OrganId`` is ``--as``; with ``--to``, its ``To`` OrganIds are exactly those;
   each is an agency of the directory, active today (else the hub rejects it:
   ``unknown-recipient``);
3. the key opens (PKCS#12, or a PEM key with ``--cert``) and belongs to the certificate;
4. the certificate is valid now, names ``--as`` if it names an OrganId, and its e-mail is one of
   the agency's mailboxes — that address becomes ``From`` (DESIGN §5 rule 2); when the hub has
   certificates enrolled for the agency, it is one of them, usable now; and it validates with
   the home's trust store as the hub would: a trusted CA, not revoked by the evidence held
   (no fresh evidence: a warning, since the hub checks again before it decides);
5. the files given with ``--attach`` are exactly the payload's attachment manifest;
6. sign (carrying the key file's CA chain), encrypt to every current hub certificate; the
   message is within the home's ``[limits]`` as the hub checks them (MIME parts, size);
7. send to ``[hub] address`` via ``[relay]``.

Exit status: 0 sent (or written), 2 a problem found before sending, 1 the relay refused the
message, 75 (EX_TEMPFAIL) the relay could not take it now: try again later.
"""

from __future__ import annotations

import hashlib
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from cryptography import x509
from sqlalchemy.orm import Session

from formats.errors import (
    ConfigError,
    GatewayError,
    InputError,
    LimitExceeded,
    RevocationUnavailable,
    TrustError,
)
from formats.payload import Payload
from formats.smime import Attachment, build_message
from formats.vntime import local_day
from gateway.cli import db_session, emit_json, load_settings, now
from gateway.loading import load_directory, stored_trust, usable_hub_certificates
from gateway.relay import Relay, deliver
from gateway.settings import Settings
from keys import files, store
from keys.binding import Registered
from keys.directory import Directory, normalize_email
from keys.issuing import ORGAN_ID_ATTRIBUTE
from keys.trust import TrustStore, describe

PASSPHRASE_ENV = "GATEWAY_SEND_PASSPHRASE"  # noqa: S105 — a variable name
_T = TypeVar("_T")
_file = click.Path(dir_okay=False, path_type=Path)


class Refused(click.ClickException):
    """The relay refused the message."""

    exit_code = 1


class TryLater(click.ClickException):
    """The relay could not take the message now (EX_TEMPFAIL, sysexits.h)."""

    exit_code = 75


@click.command()
@click.argument("payload_file", metavar="PAYLOAD.xml", type=_file)
@click.option("--as", "organ_id", required=True, metavar="ORGAN_ID", help="The sending agency.")
@click.option(
    "--to",
    "to_ids",
    multiple=True,
    metavar="ORGAN_ID",
    help="The payload's To must be exactly these (repeat).",
)
@click.option(
    "--key", "key_file", required=True, type=_file, help="PKCS#12 (.p12/.pfx) or PEM key."
)
@click.option("--cert", "cert_file", type=_file, help="The certificate of a PEM --key.")
@click.option(
    "--passphrase-file",
    type=_file,
    help=f"The key's passphrase (default: ${PASSPHRASE_ENV}, else asked on a terminal).",
)
@click.option(
    "--attach",
    "attached",
    multiple=True,
    type=_file,
    help="A file the payload's manifest lists (repeat).",
)
@click.option("--dry-run", is_flag=True, help="Build and check everything; send nothing.")
@click.option("--output", type=_file, help="Write the message (.eml) here instead of sending.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def send(
    ctx: click.Context,
    payload_file: Path,
    organ_id: str,
    to_ids: tuple[str, ...],
    key_file: Path,
    cert_file: Path | None,
    passphrase_file: Path | None,
    attached: tuple[Path, ...],
    dry_run: bool,
    output: Path | None,
    as_json: bool,
) -> None:
    """Sign PAYLOAD.xml as agency ORGAN_ID, encrypt it to the hub and send it via [relay].

    Exit status: 0 sent, 1 refused by the relay, 75 not taken now (try again later),
    2 a problem found before sending.
    """
    settings = load_settings(ctx)
    at = now()
    relay = None if dry_run or output else Relay.from_settings(settings)
    xml = _read(payload_file)
    payload = _payload(payload_file, xml, settings)
    _check_parties(payload_file.name, payload, organ_id, to_ids)
    bundle = _signer(key_file, cert_file, passphrase_file)
    with db_session(ctx) as s:
        directory = _directory(s, settings)
        enrolled = store.enrolled(s).get(organ_id, ())
        # The hub's certificates it decrypts with now (keys.store.hub_key_usable): a [hub] file
        # whose certificate is retired in the key store is not encrypted to.
        hub_certs = usable_hub_certificates(settings, s, at)
        trust = stored_trust(settings, s)
    from_addr = _sender(bundle.cert, organ_id, directory, enrolled, at)
    organ_ids = [organ.organ_id for organ in payload.header.recipients]
    if problems := directory.not_deliverable(organ_ids, local_day(at)):
        raise InputError(
            f"{payload_file.name}: recipient agency (To) {'; '.join(problems)}: the hub would "
            "refuse it (unknown-recipient); address it to the agencies of today"
        )
    _trusted(trust, bundle, at)
    attachments = _attachments(payload, attached)
    if not hub_certs:
        raise ConfigError(
            "no current hub certificate to encrypt to: `gateway keys hub list` shows the hub's "
            f"certificates; or name one in [hub] certificates of {settings.config_file}"
        )
    hub = settings.hub.address
    message_id = f"<{uuid.uuid4()}@{from_addr.rpartition('@')[2]}>"
    try:
        raw = build_message(
            xml,
            signer_cert=bundle.cert,
            signer_key=bundle.key,
            # The issuers it was validated with (step 4): the hub may hold only the root.
            signer_chain=bundle.chain,
            recipients=list(hub_certs.values()),
            from_addr=from_addr,
            to_addrs=[hub],
            message_id=message_id,
            date=at,
            attachments=attachments,
            limits=settings.limits,
        )
    except LimitExceeded as exc:
        raise InputError(
            f"the hub would refuse this message: {exc.message} ([limits] of {settings.config_file})"
        ) from None
    info: dict[str, Any] = {
        "message_id": message_id,
        "agency": organ_id,
        "from": from_addr,
        "to": hub,
        "document_id": str(payload.header.document_id),
        "payload_message_id": str(payload.header.message_id),
        "bytes": len(raw),
    }
    if relay is None:
        if output is not None:
            _write(output, raw)
        info |= {"outcome": "not sent", "output": str(output) if output else None}
        where = f"written to {output}" if output else "dry run"
        _say(as_json, info, f"built {message_id} from {organ_id} to {hub}: not sent ({where})")
        return
    attempt = deliver(relay, raw, mail_from=from_addr, rcpt_to=[hub])
    info |= {"outcome": attempt.outcome, "reply": attempt.reply}
    if attempt.outcome == "sent":
        _say(as_json, info, f"sent {message_id} from {organ_id} to {hub}: {attempt.reply}")
        return
    if as_json:
        emit_json(info)
    if attempt.outcome == "retry":
        raise TryLater(f"not sent; the relay cannot take it now, try later: {attempt.reply}")
    raise Refused(f"not sent; the relay refused it: {attempt.reply}")


def _say(as_json: bool, info: dict[str, Any], line: str) -> None:
    if as_json:
        emit_json(info)
    else:
        click.echo(line)


# --- steps 1 and 2: the payload -----------------------------------------------------------------


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror}") from None


def _payload(path: Path, xml: bytes, settings: Settings) -> Payload:
    try:
        return Payload.from_xml(xml, limits=settings.limits)
    except GatewayError as err:
        raise InputError(f"{path.name}: {err.message}", detail=err.detail) from None


def _check_parties(name: str, payload: Payload, organ_id: str, to_ids: Sequence[str]) -> None:
    sender = payload.header.sender.organ_id
    if sender != organ_id:
        raise InputError(
            f"{name}: the payload's From/OrganId is {sender}, not {organ_id} (--as); send it "
            f"as {sender} or correct the payload"
        )
    if not to_ids:
        return
    got, wanted = {o.organ_id for o in payload.header.recipients}, set(to_ids)
    if got != wanted:
        problems = []
        if missing := sorted(wanted - got):
            problems.append(f"--to names {', '.join(missing)}, the payload does not")
        if extra := sorted(got - wanted):
            problems.append(f"the payload also goes to {', '.join(extra)}")
        raise InputError(
            f"{name}: the payload's To ({', '.join(sorted(got))}) differs from --to: "
            + "; ".join(problems)
        )


# --- steps 3 and 4: the signer ------------------------------------------------------------------


def _signer(key_file: Path, cert_file: Path | None, secret_file: Path | None) -> files.KeyBundle:
    if key_file.suffix.lower() in (".p12", ".pfx"):
        if cert_file is not None:
            raise InputError("--cert goes with a PEM --key; a PKCS#12 file holds its certificate")
        return _unlock(lambda secret: files.load_pkcs12(key_file, secret), secret_file)
    if cert_file is None:
        raise InputError(f"{key_file.name}: a PEM key needs its certificate: give --cert FILE")
    key = _unlock(lambda secret: files.load_private_key(key_file, secret), secret_file)
    cert = files.load_certificates(cert_file)[0]
    if cert.public_key() != key.public_key():
        raise InputError(f"{cert_file.name}: the certificate does not belong to {key_file.name}")
    return files.KeyBundle(key=key, cert=cert, chain=())


def _unlock(load: Callable[[bytes | None], _T], secret_file: Path | None) -> _T:
    """``load`` with the passphrase from the file or environment; else without one, and if
    that fails, with one asked for on a terminal."""
    if secret_file is not None:
        return load(_read(secret_file).rstrip(b"\r\n"))
    if value := os.environ.get(PASSPHRASE_ENV):
        return load(value.encode())
    try:
        return load(None)
    except InputError as err:
        if not sys.stdin.isatty():
            raise InputError(
                f"{err.message} (no passphrase: give --passphrase-file or set ${PASSPHRASE_ENV})"
            ) from None
    return load(str(click.prompt("Key passphrase", hide_input=True, err=True)).encode())


def _directory(s: Session, settings: Settings) -> Directory:
    """The stored directory plus file entries for codes it lacks (as the pipeline sees it)."""
    stored = store.agencies(s)
    codes = {a.organ_id for a in stored}
    from_file = load_directory(settings.path(settings.directory.file))
    return Directory.of([*stored, *(a for a in from_file if a.organ_id not in codes)])


def _sender(
    cert: x509.Certificate,
    organ_id: str,
    directory: Directory,
    enrolled: Sequence[Registered],
    at: datetime,
) -> str:
    """The From address: the certificate's e-mail that is one of the agency's mailboxes."""
    agency = directory.get(organ_id)
    if agency is None:
        raise InputError(
            f"no agency {organ_id} in the directory; `gateway agencies list` shows them"
        )
    if not agency.active_on(local_day(at)):
        raise InputError(f"agency {organ_id} is not active on {local_day(at)}")
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if not start <= at <= end:
        raise InputError(f"{describe(cert)} is valid only {start:%Y-%m-%d} – {end:%Y-%m-%d}")
    named = cert.subject.get_attributes_for_oid(ORGAN_ID_ATTRIBUTE)
    if named and str(named[0].value) != organ_id:
        raise InputError(
            f"{describe(cert)} belongs to OrganId {named[0].value!s}, not {organ_id}; sign with "
            f"{organ_id}'s certificate"
        )
    emails = store.san_emails(cert)
    mine = [normalize_email(e) for e in emails if directory.by_email(e, local_day(at)) == agency]
    if not mine:
        raise InputError(
            f"the certificate's e-mail <{', '.join(emails) or 'none'}> is not a mailbox of "
            f"{organ_id} ({', '.join(sorted(agency.emails)) or 'none in the directory'}); sign "
            f"with {organ_id}'s certificate or add the address to the directory"
        )
    sha = store.fingerprint(cert)
    if enrolled and not any(r.sha256 == sha and r.covers(at) for r in enrolled):
        raise InputError(
            f"{describe(cert)} is not enrolled for {organ_id} (or not usable now), so the hub "
            f"would refuse it; sign with an enrolled certificate or enrol it with "
            f"`gateway keys import --agency {organ_id}`"
        )
    return sorted(mine)[0]


def _trusted(trust: TrustStore, bundle: files.KeyBundle, at: datetime) -> None:
    """The certificate validates now as the hub would validate it (its chain as carried)."""
    try:
        trust.validate_signer(bundle.cert, carried=bundle.chain, at=at)
    except RevocationUnavailable as exc:
        click.echo(f"gateway: warning: {exc.message}; the hub checks it before deciding", err=True)
    except TrustError as exc:
        raise InputError(f"the hub would refuse this signature: {exc.message}") from None


# --- step 5: attachments ------------------------------------------------------------------------


def _attachments(payload: Payload, paths: Sequence[Path]) -> list[Attachment]:
    listed = {a.name: a for a in payload.attachments}
    out = []
    for path in paths:
        data = _read(path)
        entry = listed.get(path.name)
        if entry is None:
            names = ", ".join(sorted(listed)) or "it lists none"
            raise InputError(f"{path.name} is not in the payload's attachment manifest ({names})")
        if (len(data), hashlib.sha256(data).hexdigest()) != (entry.size, entry.sha256):
            raise InputError(
                f"{path.name} is not the file the payload's manifest describes (size or SHA-256 "
                "differ); attach that file or rebuild the payload"
            )
        out.append(Attachment(path.name, entry.media_type, data))
    if missing := sorted(set(listed) - {p.name for p in paths}):
        raise InputError(
            f"the payload lists attachment(s) {', '.join(missing)}: give each with --attach FILE"
        )
    return out
