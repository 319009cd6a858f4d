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
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import LargeBinary, cast, func, select
from sqlalchemy.orm import Session

from archive import checkpoint as cp
from archive import merkle
from archive import tables as t
from archive.blobs import BlobDamaged, BlobStore
from archive.log import SEARCH_FIELDS, iso, search_value
from archive.verify_events import admin_events, directory, key_store
from archive.verify_report import (
    BATCH,
    Report,
    as_stored,
    binary,
    instant,
    rows,
)
from formats.errors import ConfigError, GatewayError
from keys.directory import comparable
from keys.trust import TrustStore, emails_of

Progress = Callable[[str, int, int], None]
#: Rows between two calls of ``progress`` within a stage (which shows at most one a second).
PROGRESS_EVERY = 10_000


@dataclass(frozen=True)
class Kept:
    """A tree head kept outside the database (``gateway archive checkpoint --json`` saved
    off-host, a bundle's checkpoint.txt): the log must still hold its entries and hash to its
    root at its size. ``name`` says where it came from, in the report."""

    size: int
    root: bytes
    name: str


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
    _head(s, report)
    _nodes(s, levels, report, progress)
    for number in unreadable:
        report.add(f"hub certificate row {number} is no certificate (damaged or rewritten)")
    if hub_addresses:
        signers = _naming(signers, hub_addresses, report)
    _checkpoints(s, levels, signers, report, trust)
    _kept(levels, kept, report)
    admin_events(s, admin, report)
    key_store(s, admin, report)
    directory(s, admin, report)
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
            report.add(
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
        as_stored(t.LogEntry.at),
        cast(t.LogEntry.record, LargeBinary),
        t.LogEntry.leaf_hash,
        *columns,
    ).order_by(t.LogEntry.seq)
    for n, row in enumerate(rows(s, query)):
        seq, kind, stored_at, raw_record, stored_leaf, *searchable = row
        if not isinstance(seq, int):
            report.add(f"an entry row's sequence number is {seq!r}, not a number: rewritten")
            continue
        record = binary(raw_record, report, f"entry {seq}: its record")
        at = instant(stored_at)
        if seq != expected:
            if seq > expected:
                report.add(f"{_which(expected, seq - 1, 'is', 'are')} missing (deleted rows)")
                report.holes.append((expected, seq - 1))
            else:
                report.add(f"entry {seq} appears out of order")
            # Keep the rebuilt tree aligned with sequence numbers: a hole is a zero leaf.
            leaves += bytes(merkle.HASH_SIZE) * max(0, seq - expected)
            expected = seq
        leaf = merkle.leaf_hash(record)
        leaves += leaf
        expected += 1
        if leaf != stored_leaf:
            report.add(f"entry {seq}: its record was changed (it no longer hashes to its leaf)")
        try:
            fields = json.loads(record)
        except (ValueError, UnicodeDecodeError, RecursionError):
            report.add(f"entry {seq}: its record is not valid JSON")
            continue
        if not isinstance(fields, dict):
            report.add(f"entry {seq}: its record is not a JSON object")
            continue
        if fields.get("seq") != seq:
            report.add(
                f"entry {seq}: holds the record of entry {fields.get('seq')} (rows moved or swapped)",
            )
        if fields.get("kind") != kind:
            report.add(f"entry {seq}: kind column says {kind!r}, the record {fields.get('kind')!r}")
        if at is None or iso(at) != fields.get("at"):
            report.add(
                f"entry {seq}: time column says {at or repr(stored_at)}, the record "
                f"{fields.get('at')!r}",
            )
        if kind == "admin" and isinstance(fields.get("event"), int):
            admin[fields["event"]] = (seq, fields)
        for name, value in zip(SEARCH_FIELDS, searchable, strict=True):
            want = fields.get(name)
            if search_value(name, want) != value:
                report.add(f"entry {seq}: search column {name} says {value!r}, the record {want!r}")
        named = fields.get("blobs", {})
        if isinstance(named, dict):
            referenced.update(a for a in named.values() if isinstance(a, str))
        else:
            report.add(f"entry {seq}: its record's blobs are not a mapping of names")
        if len(referenced) >= BATCH:
            _missing_blobs(s, referenced, report)
            referenced.clear()
        if n % BATCH == 0:
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
        report.add(f"blob {address} is referenced by the log but missing")


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
    reported once, where it begins: a leaf node that is not its entry's leaf hash (the entry
    changed); above, a node that is not the hash of the two stored nodes below it (it was
    rewritten, or they were, with the entries under them, consistently). A node that is the
    hash of its stored children differs only because something below does: not reported."""
    size = merkle.HASH_SIZE
    explained = list(report.holes)  # entry ranges already reported
    below: dict[int, bytes] = {}  # the stored nodes of the level below
    rebuilt_node = _lookup(levels)
    for level, rebuilt in enumerate(levels):
        count = len(rebuilt) // size
        stored_here: dict[int, bytes] = {}
        stage = f"tree level {level} of {len(levels)}, nodes"
        progress(stage, 0, count)
        expected = 0
        beyond: list[int] = []  # stored nodes past the rebuilt level: said as ranges
        query = (
            select(t.LogNode.idx, t.LogNode.hash)
            .where(t.LogNode.level == level)
            .order_by(t.LogNode.idx)
        )
        for n, (idx, raw) in enumerate(rows(s, query)):
            if n % PROGRESS_EVERY == 0:
                progress(stage, n, count)
            stored = binary(raw, report, f"tree node ({level}, {idx})")
            if not isinstance(idx, int):
                report.add(f"a tree node of level {level} has index {idx!r}: rewritten")
                continue
            if idx >= count:
                beyond.append(idx)
                continue
            if idx != expected:
                report.add(f"tree nodes ({level}, {_span(expected, idx - 1)}) are missing")
            expected = idx + 1
            stored_here[idx] = stored
            if stored == rebuilt[idx * size : (idx + 1) * size]:
                continue
            first, last = idx << level, ((idx + 1) << level) - 1
            if level == 0:
                if not any(a <= idx <= b for a, b in explained):  # (not an entry deleted)
                    explained.append((idx, idx))
                    report.add(_leaf_differs(s, levels, idx))
                continue
            # A child missing from the store stands for what its entries make (unless they
            # were deleted: said already): an entry changed with its leaf hash, its leaf node
            # deleted, is still found here, where the stored parent does not agree.
            pair = (2 * idx, 2 * idx + 1)
            if any(i not in below for i in pair) and any(
                a <= last and first <= b for a, b in report.holes
            ):
                continue
            left, right = (below.get(i) or rebuilt_node((level - 1, i)) for i in pair)
            if merkle.node_hash(left, right) == stored:
                continue  # true to the nodes below it: what differs is below, and said there
            explained.append((first, last))
            report.add(
                f"tree node ({level}, {idx}) is not the hash of the two stored nodes below it: "
                f"it was rewritten, or they were, with entr{'y' if first == last else 'ies'} "
                f"{_span(first, last)} under them"
            )
        below = stored_here
        if expected < count:
            report.add(f"tree nodes ({level}, {_span(expected, count - 1)}) are missing")
        for lo, hi in _runs(beyond):
            first, last = lo << level, ((hi + 1) << level) - 1
            if not any(a <= last and first <= b for a, b in explained):
                report.add(
                    f"tree nodes ({level}, {_span(lo, hi)}) are beyond the {count} node"
                    f"{'s' if count != 1 else ''} of level {level} the log's entries make "
                    "(entries deleted, or nodes written in)"
                )


def _leaf_differs(s: Session, levels: list[bytearray], idx: int) -> str:
    """What a leaf node that is not its entry's leaf hash says: the entry was changed, unless
    the stored node above it is what the entries make (then only this node was rewritten)."""
    size = merkle.HASH_SIZE
    if len(levels) > 1 and (idx // 2 + 1) * size <= len(levels[1]):
        parent = s.scalar(
            select(t.LogNode.hash).where(t.LogNode.level == 1, t.LogNode.idx == idx // 2)
        )
        at = idx // 2 * size
        if isinstance(parent, bytes | memoryview) and bytes(parent) == levels[1][at : at + size]:
            return (
                f"tree node (0, {idx}) was rewritten: it is not entry {idx}'s leaf hash, while "
                "the entry and the nodes above agree"
            )
    return f"tree node (0, {idx}) differs: entry {idx} was changed after being logged"


def _runs(numbers: list[int]) -> list[tuple[int, int]]:
    """Sorted ``numbers`` as runs of consecutive ones, (first, last)."""
    out: list[tuple[int, int]] = []
    for n in numbers:
        if out and n == out[-1][1] + 1:
            out[-1] = (out[-1][0], n)
        else:
            out.append((n, n))
    return out


def _head(s: Session, report: Report) -> None:
    head = s.get(t.LogHead, 1)
    size = head.size if head else 0
    if size > report.entries:  # the newest ones deleted: said once, as the entries they were
        report.holes.append((report.entries, size - 1))
        report.add(
            f"the log head says {size} entries but {report.entries} are stored: "
            f"{_which(report.entries, size - 1, 'is', 'are')} missing (deleted)"
        )
    elif size != report.entries:
        report.add(f"the log head says {size} entries but {report.entries} are stored")


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
        c.id, c.size, c.root, as_stored(c.at), cast(c.body, LargeBinary),
        cast(c.signature, LargeBinary),
    ).order_by(c.id)  # fmt: skip
    for number, size, root, stored_at, body, signature in rows(s, query):
        report.checkpoints += 1
        row = _CheckpointRow(number, size, root, instant(stored_at), body, signature)
        when = f"{row.at:%Y-%m-%d %H:%M} UTC" if row.at else f"time {stored_at!r}"
        where = f"checkpoint #{row.id} (size {row.size}, {when})"
        if not isinstance(row.id, int) or not isinstance(row.size, int):
            report.add(f"{where}: its number or size was rewritten")
            continue
        if row.id != last_id + 1:
            report.add(f"checkpoint {_span(last_id + 1, row.id - 1)} missing (deleted rows)")
        if row.size < last_size:
            report.add(f"{where}: covers fewer entries than the one before it ({last_size})")
        last_id, last_size = row.id, max(last_size, row.size)
        try:
            signed, signer = cp.verify_signer(
                binary(row.body, report, f"{where}: its body"),
                binary(row.signature, report, f"{where}: its signature"),
                signers,
            )
        except cp.CheckpointError as err:
            report.add(f"{where}: {err} (forged or altered)")
            continue
        if trust is not None and (why := untrusted(trust, signer, signed.at)):
            report.add(
                f"{where}: signed by {_who(signer)}, whose path does not validate at its "
                f"signed time {signed.at:%Y-%m-%d %H:%M} UTC: {why}",
            )
            continue
        if (signed.size, signed.root, signed.at) != (row.size, row.root, row.at):
            report.add(f"{where}: its columns differ from its signed body")
        if signed.size > report.entries:
            report.add(
                f"{where}: signed {signed.size} entries but only {report.entries} remain (the log was truncated)",
            )
            continue
        if signed.size and _root(levels, signed.size) != signed.root:
            report.add(f"{where}: the entries it covers no longer hash to its signed root")
            continue
        report.covered = max(report.covered, signed.size)


def _kept(levels: list[bytearray], kept: Sequence[Kept], report: Report) -> None:
    for k in kept:
        report.kept += 1
        if k.size > report.entries:
            report.add(
                f"{k.name}: a tree head kept outside the database covers {k.size} entries, but "
                f"the log holds {report.entries} (the newest were deleted, or an older copy of "
                "the database was put back)",
            )
        elif _root(levels, k.size) != k.root:
            report.add(
                f"{k.name}: the first {k.size} entries no longer hash to the root of a tree "
                "head kept outside the database (entries were rewritten)",
            )


def _blobs(s: Session, blobs: BlobStore, report: Report, progress: Progress) -> None:
    total = s.scalar(select(func.count()).select_from(t.Blob)) or 0
    unopened: set[int] = set()
    blobs.forget()  # each data key is unwrapped again from its row, not taken from a cache
    keys = list(s.scalars(select(t.DataKey.id).order_by(t.DataKey.id)))
    # A data key that is gone: said once, with its blobs' count (not once for each blob).
    for key_id, count in s.execute(
        select(t.Blob.key_id, func.count())
        .where(t.Blob.key_id.not_in(keys))
        .group_by(t.Blob.key_id)
    ):
        unopened.add(key_id)
        report.add(
            f"data key {key_id} is missing (deleted): its {count} blob"
            f"{'s' if count != 1 else ''} cannot be opened"
        )
    for key_id in keys:
        try:
            blobs.key(s, key_id)
        except (ConfigError, BlobDamaged, TypeError, ValueError):
            unopened.add(key_id)
            report.add(
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
            report.add(str(err))
        except (TypeError, ValueError):  # a column rewritten into something else
            report.add(f"blob {row.sha256!r} cannot be read: its sealed bytes were rewritten")
        if n % 500 == 0:
            progress("blobs", n, total)


def _which(first: int, last: int, one: str, many: str) -> str:
    return f"entry {first} {one}" if first == last else f"entries {first}–{last} {many}"


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}–{last}"
