"""`archive verify`: recompute everything from the rows and blobs, and say what differs, where.

Nothing stored is believed: each record is re-hashed and the columns copied from it compared,
the whole tree is rebuilt from those hashes, every stored tree node is compared with the
rebuilt one, every checkpoint's signature is checked (against the hub certificates, or only
those whose path to a given anchor validates at the checkpoint's time) and its root compared with the rebuilt tree at its size, every
admin_events row is matched with its admin entry, the key store and the agency directory are
compared with what the admin events made them, and every data key is unwrapped and every
blob decrypted and re-hashed. A problem names the entry (sequence number), node, checkpoint,
event, certificate, agency or blob. What it cannot see without something kept outside the
database: docs/archive.md.

Memory is a few dozen bytes per entry (the rebuilt levels); entries and blobs are streamed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import LargeBinary, String, TypeDecorator, cast, func, select, type_coerce
from sqlalchemy.orm import Session

from archive import checkpoint as cp
from archive import merkle
from archive import tables as t
from archive.blobs import BlobDamaged, BlobStore
from archive.log import SEARCH_FIELDS, iso, search_value
from formats.errors import ConfigError, GatewayError
from keys.directory import comparable
from keys.trust import TrustStore, emails_of

Progress = Callable[[str, int, int], None]
_BATCH = 5000
_MAX_PER_KIND = 50


@dataclass(frozen=True)
class Kept:
    """A tree head kept outside the database (``gateway archive checkpoint --json`` saved
    off-host, a bundle's checkpoint.txt): the log must still hold its entries and hash to its
    root at its size. ``name`` says where it came from, in the report."""

    size: int
    root: bytes
    name: str


@dataclass
class Report:
    entries: int = 0
    checkpoints: int = 0
    #: Entries the newest checkpoint that verifies covers (the rest are proven by none yet).
    covered: int = 0
    kept: int = 0
    blobs: int = 0
    root: bytes = merkle.EMPTY_ROOT
    problems: list[str] = field(default_factory=list)
    #: Entry ranges already reported as missing (not reported again as changed nodes).
    holes: list[tuple[int, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "checkpoints": self.checkpoints,
            "covered": self.covered,
            "kept": self.kept,
            "blobs": self.blobs,
            "root": self.root.hex(),
            "problems": self.problems,
        }


def verify(
    s: Session,
    blobs: BlobStore,
    signers: list[x509.Certificate],
    *,
    check_blobs: bool = True,
    progress: Progress = lambda _stage, _done, _total: None,
    trust: TrustStore | None = None,
    hub_addresses: Sequence[str] = (),
    kept: Sequence[Kept] = (),
    unreadable: Sequence[int] = (),
) -> Report:
    """``signers``: the hub's certificates (as stored). With ``trust`` (its anchors given from
    outside the database; stored CA certificates are path-building candidates only), a
    checkpoint counts only if its signer's path validates at the checkpoint's signed time
    (RFC 5280, :mod:`keys.trust`: each link a CA allowed to sign certificates within its path
    length, every certificate valid then, not revoked by the evidence ``trust`` holds). With
    ``hub_addresses``, a hub certificate must also name one of them (an agency's certificate
    under the same root is not the hub's). Each of ``kept`` is compared with the rebuilt tree:
    the one thing that shows deleted newest entries and checkpoints, or an older copy of the
    database put back."""
    with _lenient_text(s):
        return _verify(
            s, blobs, signers, check_blobs, progress, trust, hub_addresses, kept, unreadable
        )


def _verify(
    s: Session,
    blobs: BlobStore,
    signers: list[x509.Certificate],
    check_blobs: bool,
    progress: Progress,
    trust: TrustStore | None,
    hub_addresses: Sequence[str],
    kept: Sequence[Kept],
    unreadable: Sequence[int],
) -> Report:
    report = Report()
    admin: dict[int, tuple[int, dict[str, Any]]] = {}
    leaves = _entries(s, report, progress, admin)
    levels = _levels(leaves)
    report.entries = len(leaves) // merkle.HASH_SIZE
    report.root = _root(levels, report.entries)
    _nodes(s, levels, report, progress)
    _head(s, report)
    for number in unreadable:
        _add(report, f"hub certificate row {number} is no certificate (damaged or rewritten)")
    if hub_addresses:
        signers = _naming(signers, hub_addresses, report)
    _checkpoints(s, levels, signers, report, trust)
    _kept(levels, kept, report)
    _admin_events(s, admin, report)
    _key_store(s, admin, report)
    _directory(s, admin, report)
    if check_blobs:
        _blobs(s, blobs, report, progress)
    return report


def _who(cert: x509.Certificate) -> str:
    fp = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()[:16]
    return f"hub certificate {fp}… ({cert.subject.rfc4514_string()})"


def _naming(
    signers: list[x509.Certificate], hub_addresses: Sequence[str], report: Report
) -> list[x509.Certificate]:
    """The hub certificates that name one of ``hub_addresses``: a certificate someone added to
    the database (an agency's, issued under the same root) does not sign checkpoints as the
    hub."""
    wanted = comparable(hub_addresses)
    kept = []
    for cert in signers:
        if wanted & set(emails_of(cert)):
            kept.append(cert)
        else:
            _add(
                report,
                f"{_who(cert)} does not name the hub's address ({', '.join(hub_addresses)}): "
                "checkpoints it signs are not trusted (the hub's address was another then? "
                "give it too with --hub-address)",
            )
    return kept


def untrusted(trust: TrustStore, cert: x509.Certificate, at: datetime) -> str | None:
    """Why ``cert``'s path does not validate at ``at`` (None: it does)."""
    try:
        trust.validate_signer(cert, at=at)
    except GatewayError as err:
        return err.message
    return None


def _add(report: Report, text: str) -> None:
    if len(report.problems) < 10 * _MAX_PER_KIND:
        report.problems.append(text)


def _rows(s: Session, query: Any) -> Iterator[tuple[Any, ...]]:
    for row in s.execute(query, execution_options={"yield_per": _BATCH}):
        yield tuple(row)


@contextmanager
def _lenient_text(s: Session) -> Iterator[None]:
    """On SQLite, text that is not UTF-8 (an edit such as ``X'00' || sealed`` stores text in a
    binary column) is read with its bad bytes escaped, not refused by the driver: verify then
    reports the value as rewritten instead of stopping."""
    if s.get_bind().dialect.name != "sqlite":
        yield
        return
    raw = s.connection().connection.dbapi_connection
    assert raw is not None
    before = raw.text_factory
    raw.text_factory = lambda data: data.decode("utf-8", "surrogateescape")
    try:
        yield
    finally:
        raw.text_factory = before


@dataclass(frozen=True)
class _CheckpointRow:
    id: Any
    size: Any
    root: Any
    at: datetime | None
    body: Any
    signature: Any


class _Stored(TypeDecorator[Any]):
    """A column read as the database holds it (no conversion that an edit could make fail)."""

    impl = String
    cache_ok = True


def _as_stored(column: Any) -> Any:
    return type_coerce(column, _Stored())


def _instant(value: object) -> datetime | None:
    """A stored time, however the driver gives it (a datetime, or SQLite's text), in UTC; None
    if it is no time."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _json(value: object) -> object:
    """A stored JSON value (text, or what the driver decoded); text that is no JSON as is."""
    if isinstance(value, str | bytes):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            return value
    return value


def _bytes(value: object, report: Report, what: str) -> bytes:
    """A stored binary value; an edit may have left text or NULL there instead."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    _add(report, f"{what} is not binary any more ({type(value).__name__}): it was rewritten")
    return str(value).encode() if value is not None else b""


def _entries(
    s: Session, report: Report, progress: Progress, admin: dict[int, tuple[int, dict[str, Any]]]
) -> bytearray:
    """Re-hash every record in order; returns the recomputed leaf hashes, concatenated.
    ``admin``: filled with each admin entry's event number → (seq, its fields)."""
    total = s.scalar(select(func.count()).select_from(t.LogEntry)) or 0
    leaves = bytearray()
    expected = 0
    referenced: set[str] = set()
    columns = [getattr(t.LogEntry, f) for f in SEARCH_FIELDS]
    query = select(
        t.LogEntry.seq,
        t.LogEntry.kind,
        _as_stored(t.LogEntry.at),
        cast(t.LogEntry.record, LargeBinary),
        t.LogEntry.leaf_hash,
        *columns,
    ).order_by(t.LogEntry.seq)
    for n, row in enumerate(_rows(s, query)):
        seq, kind, stored_at, raw_record, stored_leaf, *searchable = row
        if not isinstance(seq, int):
            _add(report, f"an entry row's sequence number is {seq!r}, not a number: rewritten")
            continue
        record = _bytes(raw_record, report, f"entry {seq}: its record")
        at = _instant(stored_at)
        if seq != expected:
            if seq > expected:
                _add(report, f"{_which(expected, seq - 1, 'is', 'are')} missing (deleted rows)")
                report.holes.append((expected, seq - 1))
            else:
                _add(report, f"entry {seq} appears out of order")
            # Keep the rebuilt tree aligned with sequence numbers: a hole is a zero leaf.
            leaves += bytes(merkle.HASH_SIZE) * max(0, seq - expected)
            expected = seq
        leaf = merkle.leaf_hash(record)
        leaves += leaf
        expected += 1
        if leaf != stored_leaf:
            _add(report, f"entry {seq}: its record was changed (it no longer hashes to its leaf)")
        try:
            fields = json.loads(record)
        except (ValueError, UnicodeDecodeError, RecursionError):
            _add(report, f"entry {seq}: its record is not valid JSON")
            continue
        if not isinstance(fields, dict):
            _add(report, f"entry {seq}: its record is not a JSON object")
            continue
        if fields.get("seq") != seq:
            _add(
                report,
                f"entry {seq}: holds the record of entry {fields.get('seq')} (rows moved or swapped)",
            )
        if fields.get("kind") != kind:
            _add(
                report, f"entry {seq}: kind column says {kind!r}, the record {fields.get('kind')!r}"
            )
        if at is None or iso(at) != fields.get("at"):
            _add(
                report,
                f"entry {seq}: time column says {at or repr(stored_at)}, the record "
                f"{fields.get('at')!r}",
            )
        if kind == "admin" and isinstance(fields.get("event"), int):
            admin[fields["event"]] = (seq, fields)
        for name, value in zip(SEARCH_FIELDS, searchable, strict=True):
            want = fields.get(name)
            if search_value(name, want) != value:
                _add(
                    report, f"entry {seq}: search column {name} says {value!r}, the record {want!r}"
                )
        named = fields.get("blobs", {})
        if isinstance(named, dict):
            referenced.update(a for a in named.values() if isinstance(a, str))
        else:
            _add(report, f"entry {seq}: its record's blobs are not a mapping of names")
        if len(referenced) >= _BATCH:
            _missing_blobs(s, referenced, report)
            referenced.clear()
        if n % _BATCH == 0:
            progress("entries", n, total)
    _missing_blobs(s, referenced, report)
    progress("entries", total, total)
    return leaves


def _missing_blobs(s: Session, addresses: set[str], report: Report) -> None:
    if not addresses:
        return
    wanted = sorted(addresses)
    present: set[str] = set()
    for i in range(0, len(wanted), 500):
        present.update(
            s.scalars(select(t.Blob.sha256).where(t.Blob.sha256.in_(wanted[i : i + 500])))
        )
    for address in sorted(addresses - present):
        _add(report, f"blob {address} is referenced by the log but missing")


def _levels(leaves: bytearray) -> list[bytearray]:
    """Every complete level of the tree built from ``leaves`` (level 0 = the leaves)."""
    levels = [leaves]
    size = merkle.HASH_SIZE
    while len(levels[-1]) >= 2 * size:
        below, above = levels[-1], bytearray()
        for i in range(0, len(below) - size, 2 * size):
            above += merkle.node_hash(below[i : i + size], below[i + size : i + 2 * size])
        levels.append(above)
    return levels


def _lookup(levels: list[bytearray]) -> merkle.NodeLookup:
    def node(key: merkle.Node) -> bytes:
        level, idx = key
        return bytes(levels[level][idx * merkle.HASH_SIZE : (idx + 1) * merkle.HASH_SIZE])

    return node


def _root(levels: list[bytearray], size: int) -> bytes:
    return merkle.tree_head(size, _lookup(levels))


def _nodes(s: Session, levels: list[bytearray], report: Report, progress: Progress) -> None:
    """Every stored node must equal the rebuilt one, and none may be missing. A difference is
    reported once, at the lowest level that shows it, as the range of entries it covers."""
    size = merkle.HASH_SIZE
    explained = list(report.holes)  # entry ranges already reported
    for level, rebuilt in enumerate(levels):
        progress(f"tree level {level}", level, len(levels))
        count = len(rebuilt) // size
        expected = 0
        query = (
            select(t.LogNode.idx, t.LogNode.hash)
            .where(t.LogNode.level == level)
            .order_by(t.LogNode.idx)
        )
        for idx, raw in _rows(s, query):
            stored = _bytes(raw, report, f"tree node ({level}, {idx})")
            if not isinstance(idx, int):
                _add(report, f"a tree node of level {level} has index {idx!r}: rewritten")
                continue
            if idx >= count:
                _add(report, f"tree node ({level}, {idx}) is beyond the log's {count} entries")
                continue
            if idx != expected:
                _add(report, f"tree nodes ({level}, {_span(expected, idx - 1)}) are missing")
            expected = idx + 1
            if stored != rebuilt[idx * size : (idx + 1) * size]:
                first, last = idx << level, ((idx + 1) << level) - 1
                if not any(a <= last and first <= b for a, b in explained):
                    explained.append((first, last))
                    _add(
                        report,
                        f"tree node ({level}, {idx}) differs: {_which(first, last, 'was', 'were')} changed after being logged",
                    )
        if expected < count:
            _add(report, f"tree nodes ({level}, {_span(expected, count - 1)}) are missing")


def _head(s: Session, report: Report) -> None:
    head = s.get(t.LogHead, 1)
    size = head.size if head else 0
    if size != report.entries:
        _add(report, f"the log head says {size} entries but {report.entries} are stored")


def _checkpoints(
    s: Session,
    levels: list[bytearray],
    signers: list[x509.Certificate],
    report: Report,
    trust: TrustStore | None,
) -> None:
    """Each checkpoint's signature and root; none missing between the first and the last, and
    the sizes never going down. (Deleting the newest ones leaves no gap: only a checkpoint kept
    outside the database shows that; see docs/archive.md.)"""
    last_id, last_size = 0, 0
    c = t.Checkpoint
    query = select(
        c.id, c.size, c.root, _as_stored(c.at), cast(c.body, LargeBinary),
        cast(c.signature, LargeBinary),
    ).order_by(c.id)  # fmt: skip
    for number, size, root, stored_at, body, signature in _rows(s, query):
        report.checkpoints += 1
        row = _CheckpointRow(number, size, root, _instant(stored_at), body, signature)
        when = f"{row.at:%Y-%m-%d %H:%M} UTC" if row.at else f"time {stored_at!r}"
        where = f"checkpoint #{row.id} (size {row.size}, {when})"
        if not isinstance(row.id, int) or not isinstance(row.size, int):
            _add(report, f"{where}: its number or size was rewritten")
            continue
        if row.id != last_id + 1:
            _add(report, f"checkpoint {_span(last_id + 1, row.id - 1)} missing (deleted rows)")
        if row.size < last_size:
            _add(report, f"{where}: covers fewer entries than the one before it ({last_size})")
        last_id, last_size = row.id, max(last_size, row.size)
        try:
            signed, signer = cp.verify_signer(
                _bytes(row.body, report, f"{where}: its body"),
                _bytes(row.signature, report, f"{where}: its signature"),
                signers,
            )
        except cp.CheckpointError as err:
            _add(report, f"{where}: {err} (forged or altered)")
            continue
        if trust is not None and (why := untrusted(trust, signer, signed.at)):
            _add(
                report,
                f"{where}: signed by {_who(signer)}, whose path does not validate at its "
                f"signed time {signed.at:%Y-%m-%d %H:%M} UTC: {why}",
            )
            continue
        if (signed.size, signed.root, signed.at) != (row.size, row.root, row.at):
            _add(report, f"{where}: its columns differ from its signed body")
        if signed.size > report.entries:
            _add(
                report,
                f"{where}: signed {signed.size} entries but only {report.entries} remain (the log was truncated)",
            )
            continue
        if signed.size and _root(levels, signed.size) != signed.root:
            _add(report, f"{where}: the entries it covers no longer hash to its signed root")
            continue
        report.covered = max(report.covered, signed.size)


def _kept(levels: list[bytearray], kept: Sequence[Kept], report: Report) -> None:
    for k in kept:
        report.kept += 1
        if k.size > report.entries:
            _add(
                report,
                f"{k.name}: a tree head kept outside the database covers {k.size} entries, but "
                f"the log holds {report.entries} (the newest were deleted, or an older copy of "
                "the database was put back)",
            )
        elif _root(levels, k.size) != k.root:
            _add(
                report,
                f"{k.name}: the first {k.size} entries no longer hash to the root of a tree "
                "head kept outside the database (entries were rewritten)",
            )


def _admin_events(
    s: Session, logged: dict[int, tuple[int, dict[str, Any]]], report: Report
) -> None:
    """Every admin_events row is its admin entry in the log, field for field, and the other way
    round: the rows that `agencies show` and the key history read were not edited."""
    seen: set[int] = set()
    e = t.AdminEvent
    query = select(
        e.seq, _as_stored(e.at), e.actor, e.action, e.subject, _as_stored(e.detail)
    ).order_by(e.seq)
    for number, stored_at, actor, action, subject, raw_detail in _rows(s, query):
        seen.add(number)
        entry = logged.get(number)
        if entry is None:
            _add(report, f"admin event {number} ({action} {subject}) is not in the log")
            continue
        seq, fields = entry
        at = _instant(stored_at)
        stored = (iso(at) if at else stored_at, actor, action, subject, _json(raw_detail))
        if stored != tuple(fields.get(k) for k in ("at", "actor", "action", "subject", "detail")):
            _add(report, f"admin event {number} differs from its log entry {seq}: it was edited")
    for event in sorted(set(logged) - seen):
        _add(report, f"admin event {event} of log entry {logged[event][0]} is missing (deleted)")


@dataclass
class _Enrolled:
    """A certificate as the admin events made it: added, windowed, retired."""

    event: int
    role: str
    holder: object
    use_from: datetime | None = None
    use_until: datetime | None = None
    retired: datetime | None = None


def _key_store(s: Session, logged: dict[int, tuple[int, dict[str, Any]]], report: Report) -> None:
    """Every certificate in the key store (trust anchors and intermediates included) is one an
    admin event added, with the role, holder, window and retirement the events give it: a row
    written straight into the database (a rogue trust anchor, another agency's certificate in
    a row) is found, and so is one deleted."""
    made: dict[str, _Enrolled] = {}
    for number in sorted(logged):
        fields = logged[number][1]
        action, detail = fields.get("action"), fields.get("detail")
        if not isinstance(action, str) or not isinstance(detail, dict):
            continue
        sha = detail.get("sha256")
        if not isinstance(sha, str):  # an edited record (reported as such by _entries)
            continue
        if action.startswith("certificate.add."):
            role = action.removeprefix("certificate.add.")
            made[sha] = _Enrolled(number, role, fields.get("subject"))
        elif (c := made.get(sha)) is None:
            continue
        elif action == "certificate.window":
            c.use_from, c.use_until = (
                _instant(detail.get("use_from")),
                _instant(detail.get("use_until")),
            )
        elif action.startswith("certificate.retire."):
            c.retired = _instant(fields.get("at"))
    k = t.Certificate
    query = select(
        k.sha256, k.role, k.organ_id, k.subject, _as_stored(k.use_from), _as_stored(k.use_until),
        _as_stored(k.retired_at), cast(k.der, LargeBinary),
    ).order_by(k.id)  # fmt: skip
    seen = set()
    for sha, role, organ_id, subject, use_from, use_until, retired, der in _rows(s, query):
        seen.add(sha)
        who = f"certificate {str(sha)[:16]}… ({role}, {subject})"
        if hashlib.sha256(_bytes(der, report, f"{who}: its DER")).hexdigest() != sha:
            _add(report, f"{who}: its DER is another certificate than its fingerprint names")
        c = made.get(sha)
        if c is None:
            _add(report, f"{who} is in the key store, but no admin event added it: written in")
            continue
        held = (role, organ_id or subject, _instant(use_from), _instant(use_until))
        if held != (c.role, c.holder, c.use_from, c.use_until) or _instant(retired) != c.retired:
            _add(
                report,
                f"{who} differs from what admin events made it (event {c.event} and after): "
                "its role, holder, window or retirement was edited",
            )
    for sha in made.keys() - seen:
        _add(
            report,
            f"certificate {str(sha)[:16]}… added by admin event {made[sha].event} is missing "
            "from the key store (deleted)",
        )


#: The directory fields each ``agency.add`` event records in full (:func:`keys.store._detail`)
#: and each ``agency.update`` event records as ``changed: {field: [from, to]}``; ``emails`` is
#: the agency's ``agency_emails`` rows, the others are columns of its ``agencies`` row.
_AGENCY_FIELDS = ("name_vi", "name_en", "emails", "supervisor", "contact", "valid_from", "valid_to")
#: A field the event that added an agency does not record: not compared.
_UNRECORDED = object()


@dataclass
class _Listed:
    """An agency as the admin events made it: ``added`` by one, ``event`` the last that changed
    it; ``created``/``updated``: the times of the two."""

    added: int
    event: int
    fields: dict[str, object]
    created: datetime | None
    updated: datetime | None


def _replay_directory(
    logged: dict[int, tuple[int, dict[str, Any]]], report: Report
) -> dict[str, _Listed]:
    """The directory as the admin events build it, in order: ``agency.add`` gives every field,
    ``agency.update`` the ones it changed (from → to), ``agency.retire`` the last valid day.
    ``agency.import`` only sums up the adds and updates it was made of. An update that starts
    from another value than the events before it left shows an edit the admin's change then
    carried on (a mailbox written in, then kept by an update of the e-mails)."""
    made: dict[str, _Listed] = {}
    for number in sorted(logged):
        fields = logged[number][1]
        action, organ, detail = fields.get("action"), fields.get("subject"), fields.get("detail")
        if not (isinstance(action, str) and isinstance(organ, str) and isinstance(detail, dict)):
            continue  # an edited record (reported as such by _entries) or not an agency's
        at = _instant(fields.get("at"))
        if action == "agency.add":
            recorded = {k: detail.get(k, _UNRECORDED) for k in _AGENCY_FIELDS}
            made[organ] = _Listed(number, number, recorded, at, at)
            continue
        listed = made.get(organ)
        if listed is None:  # no event added it: its row (if any) is reported as written in
            continue
        if action == "agency.update":
            changed = detail.get("changed")
            for name, pair in changed.items() if isinstance(changed, dict) else ():
                if name not in _AGENCY_FIELDS or not (isinstance(pair, list) and len(pair) == 2):
                    continue
                before, after = pair
                if (had := listed.fields[name]) is not _UNRECORDED and had != before:
                    _add(
                        report,
                        f"agency {organ}: admin event {number} changed its {name} from "
                        f"{_shown(before)}, but the events before it left {_shown(had)}: the "
                        "row had been edited in the database before that change",
                    )
                listed.fields[name] = after
        elif action == "agency.retire":
            listed.fields["valid_to"] = detail.get("last_day", _UNRECORDED)
        else:
            continue
        listed.event, listed.updated = number, at
    return made


def _shown(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]" if value else "none"
    return "none" if value is None else repr(value)


def _day(value: object) -> object:
    """A stored calendar date as the events write it (``YYYY-MM-DD``): the driver gives a
    date (PostgreSQL) or SQLite's text, compared as it is stored."""
    if isinstance(value, date) and not isinstance(value, datetime):
        return value.isoformat()
    return value


def _directory(s: Session, logged: dict[int, tuple[int, dict[str, Any]]], report: Report) -> None:
    """Every agency in the directory is one an admin event added, with the names, mailboxes,
    supervisor, contact, validity and times the events give it: a mailbox written straight
    into the database (receipts and deliveries would go to it), a validity widened, a name
    changed, an agency written in or deleted is found. The events record every field, so
    every column is compared (the mailbox rows' ids only number them)."""
    made = _replay_directory(logged, report)
    e = t.AgencyEmail
    mailboxes: dict[object, list[str]] = {}
    for organ, address in _rows(s, select(e.organ_id, e.address).order_by(e.id)):
        mailboxes.setdefault(organ, []).append(
            address if isinstance(address, str) else repr(address)
        )
    a = t.Agency
    query = select(
        a.organ_id, a.name_vi, a.name_en, a.supervisor, a.contact, _as_stored(a.valid_from),
        _as_stored(a.valid_to), _as_stored(a.created_at), _as_stored(a.updated_at),
    ).order_by(a.organ_id)  # fmt: skip
    seen: set[object] = set()
    for organ, name_vi, name_en, supervisor, contact, start, end, created, updated in _rows(
        s, query
    ):
        seen.add(organ)
        who = f"agency {organ}" if isinstance(organ, str) else f"agency {organ!r}"
        stored: dict[str, object] = {
            "name_vi": name_vi, "name_en": name_en, "emails": sorted(mailboxes.pop(organ, [])),
            "supervisor": supervisor, "contact": contact, "valid_from": _day(start),
            "valid_to": _day(end),
        }  # fmt: skip
        listed = made.get(organ) if isinstance(organ, str) else None
        if listed is None:
            _add(
                report,
                f"{who} ({_shown(name_vi)}, e-mail {_shown(stored['emails'])}) is in the "
                "directory, but no admin event added it: written in",
            )
            continue
        since = f"the admin events (the last: event {listed.event})"
        for name in _AGENCY_FIELDS:
            want, have = listed.fields[name], stored[name]
            if want is _UNRECORDED or want == have:
                continue
            if name == "emails" and isinstance(want, list):
                _mailboxes(report, who, since, want, stored["emails"])
                continue
            _add(
                report,
                f"{who}: its {name} is {_shown(have)}, but {since} made it {_shown(want)}: "
                "edited in the database",
            )
        for name, value, when in (
            ("created_at", created, listed.created),
            ("updated_at", updated, listed.updated),
        ):
            if _instant(value) != when:
                _add(
                    report,
                    f"{who}: its {name} is {_shown(value)}, but {since} made it "
                    f"{iso(when) if when else 'none'}: edited in the database",
                )
    for organ in sorted(made.keys() - seen, key=str):
        _add(
            report,
            f"agency {organ} added by admin event {made[organ].added} is missing from the "
            "directory (deleted)",
        )
    for organ, addresses in mailboxes.items():
        _add(
            report,
            f"agency {organ}: e-mail {_shown(sorted(addresses))} is stored for it, but it has no "
            "directory row (written in, or left when its row was deleted)",
        )


def _mailboxes(report: Report, who: str, since: str, want: list[Any], have: object) -> None:
    """One line per mailbox added or removed behind the admin's back."""
    given = {str(x) for x in want}
    held = set(have) if isinstance(have, list) else set()
    for address in sorted(held - given):
        _add(
            report,
            f"{who}: its e-mail {address} was given to it by none of {since}: written in; "
            "mail the hub sends the agency (receipts, deliveries) would go to it",
        )
    for address in sorted(given - held):
        _add(report, f"{who}: its e-mail {address}, given by {since}, is missing (deleted)")
    if held == given:  # the same mailboxes, stored twice
        _add(report, f"{who}: its e-mails are {_shown(have)}, but {since} made them {_shown(want)}")


def _blobs(s: Session, blobs: BlobStore, report: Report, progress: Progress) -> None:
    total = s.scalar(select(func.count()).select_from(t.Blob)) or 0
    unopened: set[int] = set()
    blobs.forget()  # each data key is unwrapped again from its row, not taken from a cache
    for key_id in s.scalars(select(t.DataKey.id).order_by(t.DataKey.id)):
        try:
            blobs.key(s, key_id)
        except (ConfigError, BlobDamaged, TypeError, ValueError):
            unopened.add(key_id)
            _add(
                report,
                f"data key {key_id} does not open under the master key (altered, or the wrong "
                "master key): its blobs cannot be checked",
            )
    for n, row in enumerate(s.scalars(select(t.Blob).execution_options(yield_per=500))):
        report.blobs += 1
        if row.key_id in unopened:
            continue
        try:
            blobs.open(s, row)
        except BlobDamaged as err:
            _add(report, str(err))
        except (TypeError, ValueError):  # a column rewritten into something else
            _add(report, f"blob {row.sha256!r} cannot be read: its sealed bytes were rewritten")
        if n % 500 == 0:
            progress("blobs", n, total)


def _which(first: int, last: int, one: str, many: str) -> str:
    return f"entry {first} {one}" if first == last else f"entries {first}–{last} {many}"


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}–{last}"
