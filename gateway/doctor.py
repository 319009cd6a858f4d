"""``gateway doctor``: is this home ready to serve? Each check returns :class:`Result` values
(``OK``, ``WARN`` or ``FAIL`` and one line saying what was found and what to do); nothing here
changes the home, the database or a peer. The CLI reads the settings (check 1) and passes them
in with the time, so every date is judged at ``at``.

The plan (later steps use what earlier ones found):

1. config — ``gateway.toml`` parses (in the CLI: without settings nothing else can be checked);
2. permissions — private keys, passphrase, password, TLS key and archive master key files are
   their owner's alone (0600; FAIL when world-accessible, WARN when group-accessible); no
   secret sits in a world-writable directory; the home is not open to every local user;
3. database — reachable; durable (:meth:`Database.check_durability`: WAL + ``synchronous=FULL``,
   or PostgreSQL ``synchronous_commit`` and ``fsync`` on); schema at the Alembic head;
4. archive key — the master key is there and opens a stored blob;
5. hub keys — the hub keys usable at ``at`` (:func:`gateway.loading.hub_keys`: not retired,
   inside their validity and ``keys window``) decrypt with the configured passphrase;
6. hub certificate — one is usable at ``at`` (else FAIL), for 30 more days (else WARN);
7. trust anchors — at least one, valid at ``at``;
8. context — :func:`gateway.loading.load_context`, what ``gateway serve`` loads at start;
9. certificates — agency, anchor and intermediate certificates ending within 60 days (WARN),
   unless the agency already has a successor;
10. CRLs — the newest CRL of each issuer is not past its nextUpdate (FAIL under hard-fail);
11. listeners — SMTP, LMTP and metrics addresses can be bound, or the gateway already answers
    there (a foreign process there is a FAIL); the STARTTLS certificate loads and is in date;
12. relay — connect, EHLO, STARTTLS and AUTH as configured, QUIT;
13. IMAP — connect, STARTTLS as configured, CAPABILITY (when ``[imap] host`` is set);
14. deliveries — every recipient of an obligation in force has a mailbox in the directory and
    a usable certificate (WARN, naming those that lack one: their deliveries would fail);
15. directory — every mailbox stored for an agency is one the current rules accept (WARN for
    each that is not, e.g. a non-ASCII one an earlier version stored: it is left out of the
    directory the gateway uses; the line names the agency, the mailbox, why, and the command
    that fixes it).

Steps 11–13 are in :mod:`gateway.doctor_net`.
"""

from __future__ import annotations

import os
import smtplib
import stat
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from cryptography import x509
from sqlalchemy import make_url, select
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from archive import tables as t
from archive.blobs import BlobDamaged, BlobStore, load_master_key
from archive.db import MIGRATIONS, Database, shown_url
from formats.cms_envelope import RecipientKey
from formats.errors import GatewayError
from formats.vntime import local_day
from gateway import loading, obligation_store
from gateway.settings import Settings
from keys import evidence, store
from keys.trust import TrustStore

Status = Literal["OK", "WARN", "FAIL"]
HUB_WARN = timedelta(days=30)
CERT_WARN = timedelta(days=60)


@dataclass(frozen=True)
class Result:
    check: str
    status: Status
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status, "message": self.message}


def run(settings: Settings, *, at: datetime, timeout: float = 5.0) -> list[Result]:
    """Checks 2–13 of the plan, in order."""
    out = permissions(settings)
    db_results, db = database(settings)
    out += db_results
    if db is not None:
        try:
            out += _with_database(settings, db, at)
        except (GatewayError, SQLAlchemyError) as exc:  # e.g. a schema behind the code's
            out.append(fail("database", f"cannot read the key store: {one_line(exc)}"))
        finally:
            db.dispose()
    from gateway import doctor_net  # it imports Result from here

    out += doctor_net.listeners(settings, at=at, timeout=timeout)
    out.append(doctor_net.relay(settings, timeout=timeout))
    out.extend(doctor_net.imap(settings, timeout=timeout))
    return out


def _with_database(settings: Settings, db: Database, at: datetime) -> list[Result]:
    out = [archive_key(settings, db)]
    keys_result, keys = hub_keys(settings, db, at)
    trust_result, trust = trust_anchors(settings, db, at)
    out += [keys_result]
    certificate = hub_certificate(settings, db, at)
    if certificate is not None:
        out.append(certificate)
    out.append(trust_result)
    if keys and trust is not None:
        out.append(context(settings, db, at))
    out += certificates(db, at)
    if trust is not None:
        out += crls(trust, at, hard_fail=settings.trust.revocation == "hard-fail")
    out.append(deliveries(settings, db, at))
    out += directory(settings, db)
    return out


# --- 2. permissions -------------------------------------------------------------------------


def secret_files(settings: Settings) -> list[Path]:
    """Files named by the settings that hold a secret (those that exist)."""
    s = settings
    named = [
        *s.hub.private_keys,
        s.hub.passphrase_file,
        s.archive.master_key_file,
        s.listen.tls_key,
        s.listen.auth_file,
        s.relay.password_file,
        s.imap.password_file,
    ]
    return [s.path(p) for p in named if p is not None and s.path(p).is_file()]


def permissions(settings: Settings) -> list[Result]:
    out: list[Result] = []
    home_mode = _mode(settings.home)
    if home_mode is not None and home_mode & stat.S_IWOTH:
        out.append(fail("permissions", f"{settings.home} is world-writable: chmod 700"))
    elif home_mode is not None and home_mode & stat.S_IROTH:
        out.append(
            warn(
                "permissions",
                f"{settings.home} is readable by every local user ({home_mode:04o}): chmod 700 "
                "(the database and archive metadata live there)",
            )
        )
    secrets = secret_files(settings)
    for path in secrets:
        mode = _mode(path) or 0
        if mode & 0o007:
            out.append(
                fail(
                    "permissions",
                    f"{path} is open to every local user ({mode:04o}): "
                    f"chmod 600 {path}, and replace the secret if it may have leaked",
                )
            )
        elif mode & 0o070:
            out.append(warn("permissions", f"{path} is open to its group ({mode:04o}): chmod 600"))
        parent = _mode(path.parent) or 0
        if parent & stat.S_IWOTH and not parent & stat.S_ISVTX:
            out.append(
                fail(
                    "permissions",
                    f"{path.parent} (holding {path.name}) is world-writable: anyone may "
                    "replace the file; chmod 700",
                )
            )
    if not out:
        where = f"home {home_mode:04o}" if home_mode is not None else "no home directory yet"
        out.append(ok("permissions", f"{len(secrets)} secret file(s) private; {where}"))
    return out


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None


# --- 3. database ------------------------------------------------------------------------------


def database(settings: Settings) -> tuple[list[Result], Database | None]:
    url = settings.database_url
    try:
        parsed = make_url(url)
    except ArgumentError:
        return [fail("database", f"[database] url {shown_url(url)!r} is not a database URL")], None
    shown = shown_url(url)
    file = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if file not in (None, "", ":memory:") and not Path(str(file)).exists():  # not created here
        return [
            warn(
                "database",
                f"no database yet at {file} (the first `gateway` command that needs it "
                "creates it); key, trust and certificate checks skipped",
            )
        ], None
    try:
        db = Database.open(url, migrate=False, busy_timeout_ms=settings.database.busy_timeout_ms)
    except GatewayError as err:  # one that names the database already is not prefixed
        message = err.message if shown in err.message else f"{shown}: {err.message}"
        return [fail("database", message)], None
    except (SQLAlchemyError, OSError) as exc:
        return [fail("database", f"{shown} is not reachable: {one_line(exc)}")], None
    durable = "WAL, synchronous=FULL" if db.dialect == "sqlite" else "synchronous_commit, fsync on"
    out = [ok("database", f"{shown} reachable; commits are durable ({durable})")]
    schema_result = schema(db)
    out.append(schema_result)
    if schema_result.status == "FAIL":
        db.dispose()
        return out, None
    return out, db


def schema(db: Database) -> Result:
    """The database's Alembic revision against the newest this code knows."""
    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    script = ScriptDirectory.from_config(config)
    heads = set(script.get_heads())
    known = {r.revision for r in script.walk_revisions()}
    try:
        with db.session(read_only=True) as s:
            current = set(MigrationContext.configure(s.connection()).get_current_heads())
    except (GatewayError, SQLAlchemyError) as exc:
        return fail("schema", f"cannot read the schema revision: {one_line(exc)}")
    if current == heads:
        return ok("schema", f"at revision {', '.join(sorted(heads))} (the newest)")
    if not current:
        return fail(
            "schema",
            "the database has no gateway schema: run `gateway init` or any "
            "`gateway keys …` command, which creates it",
        )
    if current - known:
        return fail(
            "schema",
            f"revision {', '.join(sorted(current))} is newer than this "
            "gateway knows: upgrade the gateway package, never the other way",
        )
    return warn(
        "schema",
        f"at revision {', '.join(sorted(current))}, this gateway expects "
        f"{', '.join(sorted(heads))}: `gateway serve` upgrades it at start",
    )


# --- 4–10. keys, trust and evidence -----------------------------------------------------------


def archive_key(settings: Settings, db: Database) -> Result:
    path = settings.path(settings.archive.master_key_file)
    where = "$GATEWAY_ARCHIVE_KEY" if os.environ.get("GATEWAY_ARCHIVE_KEY") else str(path)
    with db.session(read_only=True) as s:
        blob = s.scalar(select(t.Blob).limit(1))
        has_keys = s.scalar(select(t.DataKey.id).limit(1)) is not None
        if where == str(path) and not path.exists():
            if not has_keys:
                return ok(
                    "archive key",
                    f"{path} is created at the first start (nothing is encrypted yet): "
                    "back it up then",
                )
            return fail(
                "archive key",
                f"{path} is missing and the archive holds encrypted blobs: restore it "
                "from the key backup; without it no payload can be read",
            )
        try:
            key = load_master_key(path)
            if blob is not None:
                BlobStore(key).open(s, blob)
        except GatewayError as err:
            return fail("archive key", err.message)
        except BlobDamaged as exc:
            return fail(
                "archive key", f"a stored blob does not open ({exc}): run `gateway archive verify`"
            )
    return ok("archive key", f"{where} opens the archive" if blob else f"{where} is readable")


def hub_keys(
    settings: Settings, db: Database, at: datetime
) -> tuple[Result, tuple[RecipientKey, ...]]:
    """As :func:`gateway.loading.load_context` loads them at ``at``: the store's, then the
    files' (:func:`gateway.loading.hub_keys`)."""
    hub = settings.hub
    source = (
        str(settings.path(hub.passphrase_file)) if hub.passphrase_file else f"${hub.passphrase_env}"
    )
    try:
        secret = loading.passphrase(settings)
        with db.session(read_only=True) as s:
            keys = loading.hub_keys(settings, s, secret, at=at)
    except GatewayError as err:
        hint = ""
        if hub.passphrase_file and not settings.path(hub.passphrase_file).exists():
            hint = "; outside the service, give it with `--passphrase-file -` (docs/deploy.md)"
        where = "" if source in err.message else f" (passphrase from {source})"
        return fail("hub keys", f"{err.message}{where}{hint}"), ()
    return ok("hub keys", f"{len(keys)} hub key pair(s) decrypt (passphrase from {source})"), keys


def hub_certificate(settings: Settings, db: Database, at: datetime) -> Result | None:
    """When the hub's certificates may be used (:func:`keys.store.hub_key_usable`); None when
    there is none to judge (the hub keys line says why)."""
    try:
        with db.session(read_only=True) as s:
            candidates = [
                (cert, row)
                for cert, row in loading.hub_certificates(settings, s)
                if row is None or row.retired_at is None
            ]
    except GatewayError:  # an unreadable [hub] file: the hub keys line names it
        return None
    if not candidates:
        return None
    windows = [
        (row.window() if row else (cert.not_valid_before_utc, cert.not_valid_after_utc))
        for cert, row in candidates
    ]
    usable = [
        w for w, (c, r) in zip(windows, candidates, strict=True) if store.hub_key_usable(c, r, at)
    ]
    if not usable:
        start, end = max(windows, key=lambda w: w[1])
        when = f"starts on {start:%Y-%m-%d}" if start > at else f"ended on {end:%Y-%m-%d}"
        return fail(
            "hub certificate",
            f"none is usable now (the newest {when}): receipts "
            "cannot be signed; `gateway keys hub new` or `keys hub import`",
        )
    end = max(end for _, end in usable)
    left = f"ends on {end:%Y-%m-%d}, {(end - at).days} days left"
    if end - at <= HUB_WARN:
        return warn(
            "hub certificate",
            f"{left}: rotate now (`gateway keys hub new`, keep the "
            "old key until agencies use the new certificate)",
        )
    return ok("hub certificate", left)


def trust_anchors(
    settings: Settings, db: Database, at: datetime
) -> tuple[Result, TrustStore | None]:
    """The trust store as :func:`gateway.loading.load_context` builds it."""
    try:
        with db.session(read_only=True) as s:
            anchors = store.certificates(s, role="anchor", include_retired=False)
            inter = store.certificates(s, role="intermediate", include_retired=False)
            crl_ders, ocsps = evidence.latest_crls(s), evidence.latest_ocsps(s)
        trust = loading.load_trust(
            settings,
            [c.certificate for c in anchors],
            [c.certificate for c in inter],
            crl_ders,
            ocsps,
        )
    except GatewayError as err:
        return fail("trust anchors", err.message), None
    valid = [a for a in trust.anchors if a.not_valid_before_utc <= at <= a.not_valid_after_utc]
    if not valid:
        message = (
            f"none of the {len(trust.anchors)} anchor(s) is valid now: every signer is "
            "refused; import the CA's current root"
        )
        return fail("trust anchors", message), trust
    return ok("trust anchors", f"{len(valid)} valid anchor(s)"), trust


def context(settings: Settings, db: Database, at: datetime) -> Result:
    try:
        ctx = loading.load_context(settings, db, at=at, warn=False)  # directory(): them
    except GatewayError as err:
        return fail("context", err.message)
    return ok(
        "context",
        f"`gateway serve` can start: {len(ctx.keys)} hub key(s), "
        f"{len(ctx.trust.anchors)} anchor(s), {len(list(ctx.directory))} agencies",
    )


def certificates(db: Database, at: datetime) -> list[Result]:
    """Certificates whose use ends within 60 days, unless their agency has a successor."""
    until = at + CERT_WARN
    with db.session(read_only=True) as s:
        ending = [c for c in store.expiring(s, at=at, until=until) if c.role != "hub"]
        agency = store.certificates(s, role="agency", include_retired=False)
    covered = {
        c.organ_id for c in agency if c.usable_at(at) and _end(c.not_after, c.use_until) > until
    }
    out = []
    for c in ending:
        if c.role == "agency" and c.organ_id in covered:
            continue
        end = _end(c.not_after, c.use_until)
        when = f"ended on {end:%Y-%m-%d}" if end < at else f"ends on {end:%Y-%m-%d}"
        who = f"of {c.organ_id}" if c.organ_id else c.subject
        out.append(
            warn(
                "certificates",
                f"{c.role} certificate {who} ({c.sha256[:12]}) {when}: import its successor, "
                f"or retire it with `gateway keys retire {c.sha256[:12]}`",
            )
        )
    return out or [ok("certificates", "no agency or CA certificate ends within 60 days")]


def deliveries(settings: Settings, db: Database, at: datetime) -> Result:
    """Recipients of obligations in force that could not be sent a delivery today."""
    with db.session(read_only=True) as s:
        owed = obligation_store.obligations(s, at=local_day(at))
        try:
            directory = loading.load_directory_merged(settings, s, warn=False)
        except GatewayError:
            return warn(
                "deliveries",
                "not checked: the directory file cannot be read (the directory check says why)",
            )
        lacking: dict[str, str] = {}
        for organ_id in sorted({r for ob in owed for r in ob.recipients}):
            agency = directory.get(organ_id)
            if agency is None or not agency.emails:
                lacking[organ_id] = "no mailbox"
            elif not store.encryption_certificates(s, organ_id, at, trust=None).usable:
                lacking[organ_id] = "no certificate the hub can encrypt to"
    if not lacking:
        return ok(
            "deliveries",
            f"every recipient of the {len(owed)} obligation(s) in force can be sent its deliveries",
        )
    named = [f"{organ_id} ({why})" for organ_id, why in lacking.items()]
    more = f" and {len(named) - 8} more" if len(named) > 8 else ""
    return warn(
        "deliveries",
        f"{len(named)} recipient(s) of obligations in force cannot be sent deliveries, which "
        f"will fail and alert: {', '.join(named[:8])}{more}; add mailboxes with `gateway "
        "agencies`, certificates with `gateway keys import`",
    )


def directory(settings: Settings, db: Database) -> list[Result]:
    """Mailboxes the current rules refuse, stored (:class:`keys.store.Unusable`) or in the
    directory file (:class:`gateway.loading.RefusedInFile`): the gateway starts without them,
    but no mail goes to them and no sender is matched to them. A directory file that cannot be
    read is a FAIL: the gateway does not start with it."""
    with db.session(read_only=True) as s:
        unusable = store.unusable_mailboxes(s)
        codes = {a.organ_id for a in store.agencies(s)}
    path = settings.path(settings.directory.file)
    try:
        from_file, in_file = loading.read_directory_file(path)
    except GatewayError as err:
        return [fail("directory", err.message)]
    out = [
        warn(
            "directory",
            f"agency {u.organ_id}: its stored mailbox {u.why}; it is left out of the "
            f"directory (no mail goes to it, no sender is matched to it): `{u.fix}`",
        )
        for u in unusable
    ]
    out += [warn("directory", r.line) for r in in_file]
    if out:
        return out
    count = len(codes | {a.organ_id for a in from_file})
    return [ok("directory", f"every mailbox of the {count} agencies can be used")]


def _end(not_after: datetime, use_until: datetime | None) -> datetime:
    return min(not_after, use_until or not_after)


def crls(trust: TrustStore, at: datetime, *, hard_fail: bool) -> list[Result]:
    """The newest CRL of each issuer (from the store and ``[trust] crls``) against ``at``."""
    newest: dict[str, x509.CertificateRevocationList] = {}
    for item in trust.crls:
        crl = x509.load_der_x509_crl(item) if isinstance(item, bytes) else item
        issuer = crl.issuer.rfc4514_string()
        if issuer not in newest or crl.last_update_utc > newest[issuer].last_update_utc:
            newest[issuer] = crl
    if not newest:
        return [
            warn(
                "crls",
                "no CRL: revocation can be checked only by OCSP; "
                "`gateway keys crls fetch` or `keys crls import`",
            )
        ]
    stale = [
        (issuer, crl.next_update_utc)
        for issuer, crl in sorted(newest.items())
        if crl.next_update_utc is not None and crl.next_update_utc < at
    ]
    mean = "every signer it covers is refused" if hard_fail else "revocation is not checked"
    out = [
        (fail if hard_fail else warn)(
            "crls",
            f"the CRL of {issuer} is stale since {nu:%Y-%m-%d %H:%M} UTC: {mean}; "
            "`gateway keys crls fetch` or `keys crls import`",
        )
        for issuer, nu in stale
    ]
    return out or [ok("crls", f"{len(newest)} issuer(s), every CRL fresh")]


# --- helpers ----------------------------------------------------------------------------------


def ok(check: str, message: str) -> Result:
    return Result(check, "OK", message)


def warn(check: str, message: str) -> Result:
    return Result(check, "WARN", message)


def fail(check: str, message: str) -> Result:
    return Result(check, "FAIL", message)


def text_of(text: bytes | str) -> str:
    return " ".join((text.decode("utf-8", "replace") if isinstance(text, bytes) else text).split())


def one_line(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPResponseException):
        return f"{exc.smtp_code} {text_of(exc.smtp_error)}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "no answer (timed out)"
    if isinstance(exc, GatewayError):
        return exc.message
    text = " ".join(str(getattr(exc, "orig", None) or exc).split())
    return (text or type(exc).__name__)[:300]
