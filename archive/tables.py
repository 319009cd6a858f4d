"""The database schema: every table the gateway keeps, in one place (SQLAlchemy 2 ORM).

Times are stored in UTC and always come back timezone-aware (:class:`UtcDateTime`); calendar
dates (an agency's validity) are plain dates in Vietnam local time. Migrations that create
these tables live in ``archive/migrations``; a test checks that the two agree.

Nothing is ever deleted from these tables by the gateway: a retired agency, certificate or key
keeps its row with ``valid_to``/``retired_at`` set, so that what was true at any past moment
can still be shown — and every change is an :class:`AdminEvent`, which the archive chains.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Date,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UtcDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out; naive datetimes are refused."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.utcoffset() is None:
            raise ValueError("naive datetime given to the database; pass an aware one")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UtcDateTime, dict[str, Any]: JSON}  # noqa: RUF012


# --- agency directory ----------------------------------------------------------------------------


class Agency(Base):
    __tablename__ = "agencies"

    organ_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name_vi: Mapped[str] = mapped_column(Text)
    name_en: Mapped[str] = mapped_column(Text, default="")
    supervisor: Mapped[str | None] = mapped_column(String(64))
    contact: Mapped[str | None] = mapped_column(Text)
    valid_from: Mapped[date | None] = mapped_column(Date)
    valid_to: Mapped[date | None] = mapped_column(Date)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    emails: Mapped[list[AgencyEmail]] = relationship(
        back_populates="agency", cascade="all, delete-orphan", order_by="AgencyEmail.address"
    )


class AgencyEmail(Base):
    __tablename__ = "agency_emails"
    __table_args__ = (UniqueConstraint("organ_id", "address"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    organ_id: Mapped[str] = mapped_column(ForeignKey("agencies.organ_id"), index=True)
    address: Mapped[str] = mapped_column(String(320), index=True)

    agency: Mapped[Agency] = relationship(back_populates="emails")


# --- certificates and keys -----------------------------------------------------------------------


class Certificate(Base):
    """A certificate the hub knows: an agency's, a trust anchor, an intermediate, the hub's own
    or the built-in CA's. ``use_from``/``use_until`` is the window the admin allows it to be
    used in (inside its own notBefore/notAfter), which is how rollovers overlap."""

    __tablename__ = "certificates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16), index=True)  # agency|anchor|intermediate|hub|ca
    organ_id: Mapped[str | None] = mapped_column(ForeignKey("agencies.organ_id"), index=True)
    subject: Mapped[str] = mapped_column(Text)
    issuer: Mapped[str] = mapped_column(Text)
    serial: Mapped[str] = mapped_column(String(64), index=True)  # lower-case hex
    emails: Mapped[str] = mapped_column(Text, default="")  # SAN rfc822Names, comma-separated
    not_before: Mapped[datetime]
    not_after: Mapped[datetime]
    use_from: Mapped[datetime | None]
    use_until: Mapped[datetime | None]
    der: Mapped[bytes] = mapped_column(LargeBinary)
    source: Mapped[str] = mapped_column(Text, default="")
    imported_at: Mapped[datetime]
    retired_at: Mapped[datetime | None]


class PrivateKey(Base):
    """A private key of the hub or of the built-in CA, encrypted (PKCS#8, passphrase)."""

    __tablename__ = "private_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    certificate_id: Mapped[int] = mapped_column(ForeignKey("certificates.id"), unique=True)
    role: Mapped[str] = mapped_column(String(16), index=True)  # hub|ca
    encrypted_pem: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]
    retired_at: Mapped[datetime | None]

    certificate: Mapped[Certificate] = relationship()


class Revocation(Base):
    """A certificate revoked by the built-in CA (what its next CRL lists)."""

    __tablename__ = "revocations"
    __table_args__ = (UniqueConstraint("ca_certificate_id", "serial"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ca_certificate_id: Mapped[int] = mapped_column(ForeignKey("certificates.id"))
    serial: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(32))
    revoked_at: Mapped[datetime]


class RevocationEvidence(Base):
    """A CRL or OCSP response, kept exactly as received, with where it came from."""

    __tablename__ = "revocation_evidence"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))  # crl|ocsp
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    issuer: Mapped[str] = mapped_column(Text, index=True)
    this_update: Mapped[datetime]
    next_update: Mapped[datetime | None]
    number: Mapped[str | None] = mapped_column(String(64))
    der: Mapped[bytes] = mapped_column(LargeBinary)
    source: Mapped[str] = mapped_column(Text)
    fetched_at: Mapped[datetime]


class Counter(Base):
    """Named monotonic counters (the built-in CA's CRL number, its next serial …)."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(Integer)


# --- events --------------------------------------------------------------------------------------


class AdminEvent(Base):
    """One administrative change, in order. The archive chains these into its log."""

    __tablename__ = "admin_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64), index=True)
    subject: Mapped[str] = mapped_column(Text)
    detail: Mapped[dict[str, Any]]


# --- the tamper-evident log ----------------------------------------------------------------------


class LogHead(Base):
    """One row: the log's size. Appenders lock it, so leaves get consecutive numbers."""

    __tablename__ = "log_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)


class LogEntry(Base):
    """One leaf of the Merkle log. ``record`` is the canonical JSON that is hashed; the other
    columns repeat some of its fields for search, and `archive verify` checks that they agree."""

    __tablename__ = "log_entries"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    at: Mapped[datetime] = mapped_column(index=True)
    record: Mapped[bytes] = mapped_column(LargeBinary)
    leaf_hash: Mapped[bytes] = mapped_column(LargeBinary)
    agency: Mapped[str | None] = mapped_column(String(64), index=True)
    category: Mapped[str | None] = mapped_column(String(32), index=True)
    period: Mapped[str | None] = mapped_column(String(7), index=True)
    status: Mapped[str | None] = mapped_column(String(16), index=True)
    document_id: Mapped[str | None] = mapped_column(String(256), index=True)
    message_id: Mapped[str | None] = mapped_column(String(998), index=True)
    digest: Mapped[str | None] = mapped_column(String(64), index=True)


class LogNode(Base):
    """A complete subtree of the log: MTH of leaves [index·2^level, (index+1)·2^level)."""

    __tablename__ = "log_nodes"

    level: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary)


class Checkpoint(Base):
    """A signed tree head: the log's size and root at a moment, signed by the hub (CMS)."""

    __tablename__ = "checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger, index=True)
    root: Mapped[bytes] = mapped_column(LargeBinary)
    at: Mapped[datetime]
    body: Mapped[bytes] = mapped_column(LargeBinary)
    signature: Mapped[bytes] = mapped_column(LargeBinary)


class DataKey(Base):
    """A blob data key, wrapped (AES-256-GCM) by the archive master key."""

    __tablename__ = "data_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]


class Blob(Base):
    """Content-addressed bytes (SHA-256 of the plaintext), compressed, then encrypted."""

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("data_keys.id"))
    size: Mapped[int] = mapped_column(BigInteger)
    sealed: Mapped[bytes] = mapped_column(LargeBinary)  # nonce || AES-GCM(zlib(plaintext))


# --- intake (the gateway's durable inbox) --------------------------------------------------------


class Intake(Base):
    """A received message, committed before the gateway answers 250, until a worker files it.

    ``state``: ``new`` (waiting), ``working`` (claimed by ``worker`` until ``lease_until``; an
    expired lease is claimed again, so work a crashed worker held resumes), ``done`` (filed in the
    archive as ``archive_seq``), ``retry`` (a transient failure; tried again from
    ``next_attempt_at``). The raw bytes are a working copy, emptied once filed: the evidence is
    the archive entry (whose blob is encrypted at rest). ``source_key`` names where a fetched
    message came from (an IMAP mailbox, UIDVALIDITY and UID), so fetching it again after a crash
    does not take it in twice.
    """

    __tablename__ = "intake"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[datetime]
    transport: Mapped[dict[str, Any]]
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    sha256: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(8), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    archive_seq: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime]
    size: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    worker: Mapped[str | None] = mapped_column(String(100))
    lease_until: Mapped[datetime | None]
    source_key: Mapped[str | None] = mapped_column(String(400))
    #: Claims in a row that ended without a decision (the worker died, or its lease ran out):
    #: such a message is claimed alone, and set aside after a few (gateway.worker).
    claims: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    __table_args__ = (UniqueConstraint("source_key", name="uq_intake_source_key"),)


class Seen(Base):
    """Replay keys (DESIGN §5 rule 3): the first archive entry for a key; duplicates get its
    receipt again and no second entry."""

    __tablename__ = "seen"

    key: Mapped[str] = mapped_column(
        String(128), primary_key=True
    )  # "sender:<addr> <msgid>" or "signed:<sha> <sha>"
    archive_seq: Mapped[int] = mapped_column(BigInteger)


class Outbox(Base):
    """A message the hub owes someone: a receipt, a delivery, an alert, a reminder.

    Created in the same transaction as the reason for it (the filed message), so nothing owed is
    ever forgotten. ``state``: ``new`` (to build), ``working`` (claimed, as for intake),
    ``ready`` (built and filed in the archive as ``entry_seq``; to send), ``retry`` (the relay
    answered 4xx or could not be reached; sent again from ``next_attempt_at``), ``sent`` (the
    relay answered 250), ``failed`` (5xx, no certificate, or retries exhausted; the admin is
    alerted). ``key`` makes each obligation unique: one receipt per message, one delivery per
    message and agency.
    """

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)
    for_seq: Mapped[int | None] = mapped_column(BigInteger)
    organ_id: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(String(8), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    worker: Mapped[str | None] = mapped_column(String(100))
    lease_until: Mapped[datetime | None]
    mail_from: Mapped[str | None] = mapped_column(String(320))
    rcpt_to: Mapped[list[str] | None] = mapped_column(JSON)
    message: Mapped[bytes | None] = mapped_column(LargeBinary)
    entry_seq: Mapped[int | None] = mapped_column(BigInteger)
    last_reply: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    #: Claims to build in a row that ended with nothing built (the worker died, or its lease
    #: ran out): such a row is claimed alone, and failed after a few (gateway.builder).
    claims: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class AgencyCapabilities(Base):
    """What an agency's signatures last advertised (SMIMECapabilities, RFC 8551 §2.5.2), for
    choosing how the hub encrypts to it (:func:`formats.algorithms.outbound_cipher`): taken
    from the newest message received whose signature verified and was bound to the agency,
    ``entry_seq`` in the archive, whose entry records the same list (``crypto.capabilities``).
    A working copy: rebuilt from the archive, it would say the same."""

    __tablename__ = "agency_capabilities"

    organ_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    advertised: Mapped[list[str]] = mapped_column(JSON)
    entry_seq: Mapped[int] = mapped_column(BigInteger)
    #: When that message was received (the newest received counts, not the last filed).
    received_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class MailboxState(Base):
    """Where the IMAP poller is in one mailbox: UIDVALIDITY and the highest UID taken in."""

    __tablename__ = "mailbox_state"

    mailbox: Mapped[str] = mapped_column(String(400), primary_key=True)  # user@host/INBOX
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    last_uid: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime]


# --- obligations ---------------------------------------------------------------------------------


class Obligation(Base):
    """One row of the obligation matrix (:class:`gateway.obligations.Obligation`): ``provider``
    owes ``category`` to ``recipients`` every period, within ``valid_from``/``valid_to``
    (inclusive local dates). Retiring sets ``valid_to``; nothing is deleted. ``due`` is the
    rule's JSON shape; ``source`` is ``preset NAME`` or ``admin``."""

    __tablename__ = "obligations"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    provider: Mapped[str] = mapped_column(String(64), index=True)
    recipients: Mapped[list[str]] = mapped_column(JSON)
    category: Mapped[str] = mapped_column(String(64))
    cadence: Mapped[str] = mapped_column(String(16))
    due: Mapped[dict[str, Any]]
    legal_basis: Mapped[str] = mapped_column(Text)
    valid_from: Mapped[date | None] = mapped_column(Date)
    valid_to: Mapped[date | None] = mapped_column(Date)
    note: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
