"""The archive as the rest of the gateway uses it: file entries, sign checkpoints, verify.

An edge that holds the database, the blob store (master key) and the hub's signing key, and
keeps the rule that every append is one durable transaction (DESIGN §5 rules 7–9)::

    archive = Archive(db, BlobStore(master_key), origin="hub@…", signer=(cert, key))
    entries = archive.file([message_item(verdict, raw, transport)])
    # committed: the entries are in the log (and a checkpoint was signed if one was due)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp
from sqlalchemy import select
from sqlalchemy.orm import Session

from archive import checkpoint as cp
from archive import tables as t
from archive.blobs import BlobStore, load_master_key
from archive.bundle import RECEIPT_BLOB
from archive.db import Database
from archive.log import Entry, Item, Log
from archive.records import read_item
from archive.search import receipt_entry
from archive.verify import Kept, Progress, untrusted, verify
from archive.verify_report import Report
from keys import evidence
from keys.directory import comparable
from keys.trust import TrustStore, emails_of

SigningKey = tuple[x509.Certificate, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey]


@dataclass
class Archive:
    db: Database
    blobs: BlobStore
    origin: str
    signer: SigningKey | None = None
    checkpoint_every: int = 1000

    def __post_init__(self) -> None:
        self.log = Log(self.blobs)

    def file(self, items: Sequence[Item], *, at: datetime | None = None) -> list[Entry]:
        """Append ``items`` in one transaction; sign a checkpoint too if one is due."""
        with self.db.session() as s:
            return self.file_in(s, items, at=at)

    def prepare(self, items: Iterable[Item]) -> None:
        """Do the CPU work of filing ``items`` (compressing their blobs) before the transaction
        that files them; :meth:`file_in` is the same with or without it."""
        self.blobs.prepare(
            (data, name in item.dense) for item in items for name, data in item.blobs.items()
        )

    def file_in(
        self, s: Session, items: Sequence[Item], *, at: datetime | None = None
    ) -> list[Entry]:
        """:meth:`file` inside the caller's transaction (to commit other rows with it)."""
        entries = self.log.append_many(s, items)
        if self.signer is not None and entries:
            size = entries[-1].seq + 1
            if size - _last_checkpoint_size(s) >= self.checkpoint_every:
                self._sign(s, at or entries[-1].at)
        return entries

    def checkpoint(self, at: datetime) -> t.Checkpoint:
        """Sign the current tree head now (also done automatically every N entries)."""
        if self.signer is None:
            raise cp.CheckpointError("no hub signing key: checkpoints cannot be signed")
        with self.db.session() as s:
            return self._sign(s, at)

    def _sign(self, s: Session, at: datetime) -> t.Checkpoint:
        assert self.signer is not None
        cert, key = self.signer
        size = self.log.size(s)
        checkpoint = cp.Checkpoint(self.origin, size, self.log.root(s, size), at)
        row = t.Checkpoint(
            size=size,
            root=checkpoint.root,
            at=at,
            body=checkpoint.body(),
            signature=cp.sign(checkpoint, cert, key),
        )
        s.add(row)
        s.flush()
        return row

    def read(self, s: Session, *, at: datetime, actor: str, action: str, target: str) -> None:
        """Log that a person read the archive (in the caller's transaction)."""
        self.log.append_many(s, [read_item(at, actor, action, target)])

    def receipt_for(
        self, s: Session, seq: int, size: int
    ) -> tuple[bytes | None, bytes | None, list[bytes] | None]:
        """The receipt entry answering message entry ``seq`` (its record), the receipt sent,
        and its audit path in the log of ``size`` entries (None when that does not hold it
        yet): what an evidence bundle carries of it."""
        row = receipt_entry(s, seq)
        if row is None:
            return None, None, None
        receipt = self.blobs.get(s, json.loads(row.record)["blobs"][RECEIPT_BLOB])
        path = self.log.inclusion(s, row.seq, size) if row.seq < size else None
        return row.record, receipt, path

    def verify(
        self,
        *,
        check_blobs: bool = True,
        progress: Progress | None = None,
        anchors: Sequence[x509.Certificate] = (),
        hub_addresses: Sequence[str] = (),
        kept: Sequence[Kept] = (),
    ) -> Report:
        with self.db.session(read_only=True) as s:
            signers, unreadable = _certificates(s, ("hub",))
            return verify(
                s,
                self.blobs,
                signers,
                unreadable=unreadable,
                check_blobs=check_blobs,
                progress=progress or (lambda _a, _b, _c: None),
                trust=outside_trust(s, anchors) if anchors else None,
                hub_addresses=hub_addresses,
                kept=kept,
            )


def master_key(path: Path, db: Database) -> bytes:
    """The archive master key: created on first use (no data key exists yet); otherwise it
    must be there, since without it no blob can be read."""
    with db.session(read_only=True) as s:
        fresh = s.scalar(select(t.DataKey.id).limit(1)) is None
    return load_master_key(path, create=fresh)


def hub_certificates(s: Session) -> list[x509.Certificate]:
    """Every certificate the hub has ever had (checkpoints stay verifiable after rotation)."""
    rows = s.scalars(select(t.Certificate).where(t.Certificate.role == "hub"))
    return [x509.load_der_x509_certificate(r.der) for r in rows]


def outside_trust(s: Session, anchors: Sequence[x509.Certificate]) -> TrustStore:
    """``anchors`` given from outside the database, with what it stores as path-building
    candidates (:func:`issuer_certificates`) and the newest revocation evidence, soft-fail: a
    stored CA certificate proves nothing its anchor did not sign, and evidence that is missing
    (or was deleted) lets a certificate through rather than condemn the log."""
    return TrustStore(
        tuple(anchors),
        tuple(_certificates(s, ("anchor", "intermediate", "ca"))[0]),
        crls=tuple(_readable(evidence.latest_crls(s), x509.load_der_x509_crl)),
        ocsps=tuple(_readable(evidence.latest_ocsps(s), ocsp.load_der_ocsp_response)),
        revocation_mode="soft-fail",
    )


def hub_signer(
    trust: TrustStore, cert: x509.Certificate, *, at: datetime, hub_addresses: Sequence[str]
) -> str:
    """Check ``cert``, the signer of a checkpoint signed at ``at``, as `archive verify --ca`
    does: it names one of ``hub_addresses`` (an agency's certificate under the same root is not
    the hub's), and its path to ``trust``'s anchors validates at ``at`` (:mod:`keys.trust`).
    The hub address it names; :class:`~archive.checkpoint.CheckpointError` saying why not."""
    named = sorted(comparable(hub_addresses) & set(emails_of(cert)))
    if not named:
        shown = ", ".join(emails_of(cert)) or "no address"
        raise cp.CheckpointError(
            f"it names {shown}, not the hub's address ({', '.join(hub_addresses)}): it signs no "
            "checkpoint as the hub (the hub's address was another then? give it too with "
            "--hub-address)"
        )
    if why := untrusted(trust, cert, at):
        raise cp.CheckpointError(
            f"its path to the CA you gave does not validate at {at.isoformat()}, the "
            f"checkpoint's signed time: {why}"
        )
    return named[0]


def _certificates(s: Session, roles: Sequence[str]) -> tuple[list[x509.Certificate], list[int]]:
    """The stored certificates of ``roles`` that parse, and the row ids of those that do not
    (for `archive verify`, which reports a damaged row rather than stop on it)."""
    good, bad = [], []
    for number, der in s.execute(
        select(t.Certificate.id, t.Certificate.der).where(t.Certificate.role.in_(roles))
    ):
        try:
            good.append(x509.load_der_x509_certificate(der))
        except (ValueError, TypeError):
            bad.append(number)
    return good, bad


def _readable(ders: list[bytes], load: Callable[[bytes], object]) -> list[bytes]:
    """The items of ``ders`` that parse (a damaged row is no evidence either way)."""
    kept = []
    for der in ders:
        try:
            load(der)
        except ValueError:
            continue
        kept.append(der)
    return kept


def _last_checkpoint_size(s: Session) -> int:
    """The size the last signed checkpoint covers (0 before the first); only the size is read:
    this runs for every filing."""
    size = s.scalar(select(t.Checkpoint.size).order_by(t.Checkpoint.id.desc()).limit(1))
    return size or 0
