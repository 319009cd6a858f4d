"""The edge that turns settings into a pipeline :class:`~gateway.pipeline.Context`.

Reads key, certificate, CRL and directory files named by the settings. Private keys are loaded
once here (an RSA-3072 PEM costs ~90 ms to load), never per message.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from archive import tables as t
from archive.blobs import BlobStore
from archive.db import Database, shown_url
from archive.service import Archive, SigningKey, master_key
from formats.cms_envelope import RecipientKey
from formats.errors import ConfigError, InputError
from gateway.pipeline import Context
from gateway.settings import Settings
from keys import evidence, files, store
from keys.directory import Agency, Directory, ascii_form, split_mailboxes
from keys.trust import TrustStore

log = logging.getLogger("gateway.loading")

_CERT_SUFFIXES = (".pem", ".crt", ".cer", ".der", ".p7b", ".p7c")
_CRL_SUFFIXES = (".crl", ".pem", ".der")


def open_database(settings: Settings, *, migrate: bool = True, existing: bool = False) -> Database:
    """The database the settings name, with their busy timeout (migrated unless told not to).

    ``existing``: it must hold an archive already (commands that read one): a mistyped
    ``--home`` or ``[database] url`` must not become a new, empty archive that "verifies"."""
    url = make_url(settings.database_url)
    path = url.database if url.get_backend_name() == "sqlite" else None
    if existing and path not in (None, "", ":memory:") and not Path(str(path)).exists():
        raise ConfigError(
            f"no archive at {path} (a mistyped --home or [database] url? a home's archive is "
            "made when the gateway first files in it: `gateway serve`)"
        )
    if existing:
        probe = Database.open(
            settings.database_url,
            migrate=False,
            busy_timeout_ms=settings.database.busy_timeout_ms,
        )
        try:
            archived = t.LogHead.__tablename__ in probe.tables()
        finally:
            probe.dispose()
        if not archived:
            raise ConfigError(
                f"the database {shown_url(settings.database_url)} holds no archive (a mistyped "
                "[database] url? a home's archive is made when the gateway first files in it: "
                "`gateway serve`)"
            )
    return Database.open(
        settings.database_url,
        migrate=migrate,
        busy_timeout_ms=settings.database.busy_timeout_ms,
    )


def open_archive(settings: Settings, db: Database, signer: SigningKey | None = None) -> Archive:
    """The archive on ``db``: its master key (created on first use), origin and cadence."""
    key = master_key(settings.path(settings.archive.master_key_file), db)
    return Archive(
        db,
        BlobStore(key),
        origin=settings.archive.origin or settings.hub.address,
        signer=signer,
        checkpoint_every=settings.archive.checkpoint_every,
    )


def load_context(
    settings: Settings,
    db: Database | None = None,
    *,
    at: datetime | None = None,
    warn: bool = True,
) -> Context:
    """The pipeline context from the key store (the database) plus any files the settings name,
    with the hub keys usable at ``at`` (default: now; :func:`hub_keys`).

    Files are read in addition to the store, so a national CA bundle or a hub key managed by
    configuration management can live outside the database. A mailbox of the directory (stored
    or in its file) that the current rules refuse is left out and, unless ``warn`` is false
    (``gateway doctor`` reports them itself), logged as a warning.
    """
    db = db or open_database(settings)
    at = at or datetime.now(UTC)
    secret = passphrase(settings)
    with db.session() as s:
        keys = hub_keys(settings, s, secret, at=at)
        stored = _stored_agencies(s, warn=warn)
        agency_certs = [c.certificate for c in store.certificates(s, role="agency")]
        enrolled = store.enrolled(s)
    directory = _merged(stored, _file_agencies(settings, warn=warn))  # outside the transaction
    with db.session(read_only=True) as s:  # after the keys: a missing key pair is said first
        trust = stored_trust(settings, s)
    return Context(
        keys=keys,
        trust=trust,
        directory=directory,
        limits=settings.limits,
        known_certs=tuple(agency_certs),
        enrolled=MappingProxyType(enrolled),
    )


def load_directory_merged(settings: Settings, s: Session, *, warn: bool = True) -> Directory:
    """The directory as the pipeline sees it: the stored one (:func:`keys.store.load_agencies`),
    plus file entries it lacks. ``warn``: as for :func:`load_context`."""
    return _merged(_stored_agencies(s, warn=warn), _file_agencies(settings, warn=warn))


def _stored_agencies(s: Session, *, warn: bool) -> list[Agency]:
    """The stored directory; a stored mailbox the rules refuse is left out (and logged)."""
    return store.load_agencies(s) if warn else store.agencies(s)


def _file_agencies(settings: Settings, *, warn: bool) -> Directory:
    """The directory file's; a mailbox the rules refuse is left out (and logged)."""
    path = settings.path(settings.directory.file)
    return load_directory(path) if warn else read_directory_file(path)[0]


def _merged(stored: Sequence[Agency], from_file: Iterable[Agency]) -> Directory:
    """The stored directory plus file entries for codes the store does not have: once a file
    has been imported (`gateway agencies import`), the database entry is the one that counts."""
    codes = {a.organ_id for a in stored}
    return Directory.of([*stored, *(a for a in from_file if a.organ_id not in codes)])


def secret(settings: Settings, file: Path | None, env: str, what: str) -> str | None:
    """A password from ``file`` (relative to the home), else from ``$env``; None if neither.
    One line of ConfigError naming the file if it cannot be read."""
    if file is not None:
        path = settings.path(file)
        try:
            return path.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise ConfigError(f"cannot read the {what} file {path}: {why}") from None
    return os.environ.get(env) or None


def passphrase(settings: Settings) -> bytes | None:
    hub = settings.hub
    if hub.passphrase_file is not None:
        path = settings.path(hub.passphrase_file)
        try:
            return path.read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise ConfigError(f"cannot read passphrase file {path}: {exc.strerror}") from None
    value = os.environ.get(hub.passphrase_env)
    return value.encode() if value else None


def hub_keys(
    settings: Settings, s: Session, secret: bytes | None, *, at: datetime
) -> tuple[RecipientKey, ...]:
    """The hub key pairs usable at ``at``, newest first: they decrypt, and the first whose
    certificate is valid signs (:func:`gateway.worker_process.hub_signer`).

    One rule (:func:`keys.store.hub_key_usable`) for the key store's pairs and the ``[hub]``
    files' alike: a pair whose certificate the store holds is usable only while that row allows
    it (not retired, inside its validity and the admin's window), so ``keys hub retire`` and
    ``keys window`` end a key the files also hold; a pair only in the files, while its
    certificate is valid. The store's pairs come first (newest first, as `gateway archive
    checkpoint` picks its signer), then the files' (newest certificate first).
    """
    stored = store.hub_recipient_keys(s, secret, at=at)
    from_files = load_hub_keys(settings, secret, required=False)
    seen = {store.fingerprint(k.cert) for k in stored}
    usable = [
        k
        for k in from_files
        if store.fingerprint(k.cert) not in seen
        and store.hub_key_usable(k.cert, store.certificate_row(s, k.cert), at)
    ]
    usable.sort(key=lambda k: k.cert.not_valid_before_utc, reverse=True)
    keys = stored + tuple(usable)
    if not keys and not from_files and not store.certificates(s, role="hub", include_retired=False):
        raise _no_key_pair(settings)
    if not keys:
        raise ConfigError(
            f"no hub key pair is usable at {at:%Y-%m-%d %H:%M} UTC (each is retired, outside "
            "its `keys window` or its certificate's validity): create one with `gateway keys "
            "hub new` or `gateway keys hub import FILE.p12`; `gateway keys hub list --all` "
            "shows them"
        )
    return keys


def hub_certificates(
    settings: Settings, s: Session
) -> list[tuple[x509.Certificate, store.StoredCertificate | None]]:
    """Every hub certificate a key pair may still be used with, without decrypting a key: the
    key store's unretired ones, then those of the ``[hub]`` files the store does not list among
    them, each with its stored row if there is one (a retired row: never usable)."""
    out: list[tuple[x509.Certificate, store.StoredCertificate | None]] = [
        (c.certificate, c) for c in store.certificates(s, role="hub", include_retired=False)
    ]
    seen = {row.sha256 for _, row in out if row is not None}
    for cert_path, key_path in zip(
        settings.hub.certificates, settings.hub.private_keys, strict=True
    ):
        cert_file, key_file = settings.path(cert_path), settings.path(key_path)
        if cert_file.exists() and key_file.exists():
            cert = files.load_certificates(cert_file)[0]
            if store.fingerprint(cert) not in seen:
                seen.add(store.fingerprint(cert))
                out.append((cert, store.certificate_row(s, cert)))
    return out


def usable_hub_certificates(
    settings: Settings, s: Session, at: datetime
) -> dict[str, x509.Certificate]:
    """The hub certificates :func:`hub_keys` would use at ``at``, by SHA-256 fingerprint (what
    `gateway send` encrypts to), without decrypting a key."""
    return {
        store.fingerprint(cert): cert
        for cert, row in hub_certificates(settings, s)
        if store.hub_key_usable(cert, row, at)
    }


def usable_hub_fingerprints(settings: Settings, s: Session, at: datetime) -> frozenset[str]:
    """:func:`usable_hub_certificates`' fingerprints: what a running worker compares to see
    when a key's window, validity or retirement changes the keys it holds."""
    return frozenset(usable_hub_certificates(settings, s, at))


def load_hub_keys(
    settings: Settings, secret: bytes | None = None, *, required: bool = True
) -> tuple[RecipientKey, ...]:
    """Hub key pairs from the files named in ``[hub]`` (those that exist), whatever the key
    store says of them: :func:`hub_keys` decides which are usable."""
    out = []
    for cert_path, key_path in zip(
        settings.hub.certificates, settings.hub.private_keys, strict=True
    ):
        cert_file, key_file = settings.path(cert_path), settings.path(key_path)
        if not cert_file.exists() or not key_file.exists():
            continue
        certs = files.load_certificates(cert_file)
        key = files.load_private_key(key_file, secret)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError(f"{key_file}: the hub decryption key must be RSA")
        out.append(RecipientKey(certs[0], key))
    if required and not out:
        raise _no_key_pair(settings)
    return tuple(out)


def _no_key_pair(settings: Settings) -> ConfigError:
    return ConfigError(
        "the hub has no key pair: create one with `gateway keys hub new` (built-in CA) or "
        "`gateway keys hub import FILE.p12`, or name key files in [hub] of "
        f"{settings.config_file}; `gateway demo --dir DIR` shows a complete home"
    )


def stored_trust(settings: Settings, s: Session) -> TrustStore:
    """The trust store the pipeline decides with: the key store's anchors, intermediates and
    latest CRL and OCSP evidence, plus the files named in ``[trust]``."""
    return load_trust(
        settings,
        [c.certificate for c in store.certificates(s, role="anchor", include_retired=False)],
        [c.certificate for c in store.certificates(s, role="intermediate", include_retired=False)],
        evidence.latest_crls(s),
        evidence.latest_ocsps(s),
    )


def load_trust(
    settings: Settings,
    anchors: Sequence[x509.Certificate] = (),
    intermediates: Sequence[x509.Certificate] = (),
    crls: Sequence[bytes] = (),
    ocsps: Sequence[bytes] = (),
) -> TrustStore:
    """The trust store: what the key store holds plus the files named in ``[trust]``."""
    all_anchors = [*anchors, *_certs(settings, settings.trust.anchors)]
    if not all_anchors:
        raise ConfigError(
            "no trust anchors: import the CA certificate(s) that issue agency certificates "
            "with `gateway keys anchors import FILE`, create the built-in CA with "
            "`gateway keys ca init`, or name anchor files in [trust] of "
            f"{settings.config_file}"
        )
    file_crls = [
        files.load_crl(p).public_bytes(Encoding.DER)
        for p in _expand(settings, settings.trust.crls, _CRL_SUFFIXES)
    ]
    return TrustStore(
        anchors=tuple(all_anchors),
        intermediates=(*intermediates, *_certs(settings, settings.trust.intermediates)),
        crls=(*crls, *file_crls),
        ocsps=tuple(ocsps),
        revocation_mode="soft-fail" if settings.trust.revocation == "soft-fail" else "hard-fail",
    )


def _certs(settings: Settings, paths: Iterable[Path]) -> Iterator[x509.Certificate]:
    for path in _expand(settings, paths, _CERT_SUFFIXES):
        yield from files.load_certificates(path)


def _expand(settings: Settings, paths: Iterable[Path], suffixes: tuple[str, ...]) -> Iterator[Path]:
    for p in paths:
        path = settings.path(p)
        if path.is_dir():
            yield from sorted(c for c in path.iterdir() if c.suffix.lower() in suffixes)
        elif path.exists():
            yield path


@dataclass(frozen=True)
class RefusedInFile:
    """A mailbox in the directory file that the current rules refuse (not ASCII, not a bare
    address: :func:`keys.directory.normalize_email`); a file written for an earlier version may
    hold one. It is left out of its agency, which loads without it, as a stored one is
    (:class:`keys.store.Unusable`)."""

    path: Path
    organ_id: str
    address: str  # as written
    why: str

    @property
    def fix(self) -> str:
        """What to change in the file: the address's ASCII form when it has one."""
        if (ace := ascii_form(self.address)) is not None:
            return f"write {ace} instead of it in {self.path}"
        return f"give an ASCII mailbox instead of it in {self.path}, or remove it"

    @property
    def line(self) -> str:
        return (
            f"agency {self.organ_id}: its mailbox in the directory file {self.why}; it is left "
            f"out of the directory (no mail goes to it, no sender is matched to it): {self.fix}"
        )


def load_directory(path: Path) -> Directory:
    """The agency directory from a TOML file of ``[[agency]]`` tables (empty if absent); each
    mailbox it holds that the rules refuse is left out and logged (:class:`RefusedInFile`)."""
    directory, refused = read_directory_file(path)
    for r in refused:
        log.warning("%s", r.line)
    return directory


def read_directory_file(path: Path) -> tuple[Directory, list[RefusedInFile]]:
    """The directory file's agencies, and the mailboxes left out of them. A file that is not
    TOML, or an entry with a field missing or wrong, is an error naming the file and the entry."""
    if not path.exists():
        return Directory.of(()), []
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the directory file {path}: {exc.strerror}") from None
    agencies: list[Agency] = []
    refused: list[RefusedInFile] = []
    for n, entry in enumerate(data.get("agency", []), start=1):
        try:
            agency, left_out = _agency(entry)
        except (KeyError, TypeError) as exc:
            raise InputError(f"{path}: agency #{n} is missing or has a bad field ({exc})") from None
        except InputError as exc:
            raise InputError(f"{path}: agency #{n}: {exc.message}") from None
        agencies.append(agency)
        refused += [RefusedInFile(path, agency.organ_id, a, why) for a, why in left_out]
    try:
        return Directory.of(agencies), refused
    except InputError as exc:  # two entries clash (one OrganId, one mailbox)
        raise InputError(f"{path}: {exc.message}") from None


def _agency(entry: dict[str, Any]) -> tuple[Agency, list[tuple[str, str]]]:
    def day(name: str) -> date | None:
        value = entry.get(name)
        if value is None or isinstance(value, date):
            return value
        raise TypeError(f"{name} must be a date (YYYY-MM-DD)")

    emails = entry["emails"]
    if isinstance(emails, str) or not all(isinstance(e, str) for e in emails):
        raise TypeError("emails must be a list of strings")
    usable, left_out = split_mailboxes(emails)
    agency = Agency(
        organ_id=str(entry["organ_id"]),
        name_vi=str(entry["name_vi"]),
        name_en=str(entry.get("name_en", "")),
        emails=usable,
        supervisor=entry.get("supervisor"),
        valid_from=day("valid_from"),
        valid_to=day("valid_to"),
    )
    return agency, left_out


def dump_directory(directory: Iterable[Agency]) -> str:
    """The TOML text :func:`load_directory` reads back."""
    lines: list[str] = []
    for a in directory:
        lines.append("[[agency]]")
        lines.append(f"organ_id = {_q(a.organ_id)}")
        lines.append(f"name_vi = {_q(a.name_vi)}")
        lines.append(f"name_en = {_q(a.name_en)}")
        lines.append("emails = [" + ", ".join(_q(e) for e in sorted(a.emails)) + "]")
        if a.supervisor:
            lines.append(f"supervisor = {_q(a.supervisor)}")
        if a.valid_from:
            lines.append(f"valid_from = {a.valid_from.isoformat()}")
        if a.valid_to:
            lines.append(f"valid_to = {a.valid_to.isoformat()}")
        lines.append("")
    return "\n".join(lines)


def _q(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
