"""The archive's append-only Merkle log over the database (an edge; the hashing is pure).

Every entry — a received message with its verdict, a receipt, a delivery, a reminder, an admin
change, a person's read — is one leaf. Its *record* is canonical JSON (sorted keys, no
insignificant space, UTF-8) holding its sequence number, kind, time and fields, and the
addresses of its blobs; the leaf hash is RFC 6962's hash of those bytes, so changing, moving or
removing an entry changes the tree. Signed checkpoints (:mod:`archive.checkpoint`) fix the tree
head at moments; `verify` recomputes everything from the rows and blobs::

    log = Log(blob_store)
    with db.session() as s:
        seq = log.append(s, "message", at, {"status": "accepted", ...}, {"raw": raw}).seq
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import LargeBinary, String, and_, cast, or_, select
from sqlalchemy.orm import Session

from archive import merkle
from archive import tables as t
from archive.blobs import BlobStore
from archive.db import insert_rows

#: Record fields copied into columns for search (`archive search`); verify checks they agree.
SEARCH_FIELDS = ("agency", "category", "period", "status", "document_id", "message_id", "digest")
_RESERVED = frozenset({"seq", "kind", "at", "blobs"})


def _width(name: str) -> int:
    kind = t.LogEntry.__table__.c[name].type
    assert isinstance(kind, String) and kind.length, f"log_entries.{name} is a VARCHAR(n)"
    return kind.length


#: The width of each search column (its VARCHAR length).
_WIDTHS = {f: _width(f) for f in SEARCH_FIELDS}


class LogError(Exception):
    """The log cannot do what was asked (unknown entry, impossible proof)."""


class MissingNode(LogError):
    """A tree node a proof needs is not stored: the log was damaged, or altered."""


def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes that are hashed: JSON with sorted keys, no spaces, UTF-8; no floats."""
    _check_types(record)
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _check_types(value: Any) -> None:
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return  # the usual leaves, without the slower isinstance checks below
    if kind is dict or isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError("record keys must be strings")
            _check_types(v)
    elif isinstance(value, list | tuple):
        for v in value:
            _check_types(v)
    elif not isinstance(value, str | int | bool):
        raise TypeError(f"a record holds only text, integers, booleans and null, not {value!r}")


#: An entry's columns as :class:`Entry` holds them, record and leaf hash as stored bytes.
_AS_STORED = select(
    t.LogEntry.seq,
    t.LogEntry.kind,
    t.LogEntry.at,
    cast(t.LogEntry.record, LargeBinary),
    cast(t.LogEntry.leaf_hash, LargeBinary),
)


@dataclass(frozen=True)
class Entry:
    seq: int
    kind: str
    at: datetime
    record: bytes
    leaf_hash: bytes

    @property
    def fields(self) -> dict[str, Any]:
        """The record's fields; a record that is not one (rewritten in the database) is a
        :class:`LogError` naming the entry, not whatever the JSON parser or a caller hits."""
        try:
            value = json.loads(self.record)
        except (ValueError, RecursionError):
            value = None
        if not isinstance(value, dict):
            raise LogError(
                f"entry {self.seq}'s record is not an archive record (altered in the database? "
                "`gateway archive verify` says)"
            )
        return value

    @property
    def blobs(self) -> dict[str, str]:
        blobs = self.fields.get("blobs", {})
        if not isinstance(blobs, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in blobs.items()
        ):
            raise LogError(
                f"entry {self.seq}'s record names its blobs wrongly (altered in the database? "
                "`gateway archive verify` says)"
            )
        return dict(blobs)


@dataclass(frozen=True)
class Item:
    """One entry to append."""

    kind: str
    at: datetime
    fields: Mapping[str, Any]
    blobs: Mapping[str, bytes] = field(default_factory=dict)
    #: Blobs its writer knows to be base64 of ciphertext (an encrypted S/MIME message): stored
    #: by Huffman coding only (:func:`archive.blobs.compress`).
    dense: frozenset[str] = frozenset()


class Log:
    """The log; ``blobs`` may be omitted by writers whose entries carry no blobs (admin
    events), which therefore need no master key."""

    def __init__(self, blobs: BlobStore | None = None) -> None:
        self._blobs = blobs

    @property
    def blobs(self) -> BlobStore:
        if self._blobs is None:
            raise LogError("this log was opened without the archive master key")
        return self._blobs

    # --- writing ---------------------------------------------------------------------------

    def append(
        self,
        s: Session,
        kind: str,
        at: datetime,
        fields: Mapping[str, Any],
        blobs: Mapping[str, bytes] | None = None,
    ) -> Entry:
        return self.append_many(s, [Item(kind, at, fields, blobs or {})])[0]

    def append_many(self, s: Session, items: Sequence[Item]) -> list[Entry]:
        """Append ``items`` in order within the caller's transaction (one commit for all)."""
        for item in items:
            if _RESERVED & set(item.fields):
                raise ValueError(f"fields may not be named {sorted(_RESERVED & set(item.fields))}")
            if item.at.utcoffset() is None:
                raise ValueError("entry time must be timezone-aware")
        head = self._lock_head(s)
        frontier = merkle.Frontier.at(head.size, self._lookup(s, _frontier_nodes(head.size)))
        # The whole batch's blobs, rows and nodes are written with one statement each: per-row
        # ORM adds (and a blob look-up per entry, each flushing the session) cost more than the
        # hashing, sealing and the durable commit together (bench/archive_bench.py).
        with_blobs = [item for item in items if item.blobs]
        addresses = iter(
            self.blobs.put_many(
                s,
                [data for item in with_blobs for data in item.blobs.values()],
                at=with_blobs[0].at,
            )
            if with_blobs
            else ()
        )
        out, rows, nodes = [], [], []
        for item in items:
            seq = frontier.size
            record = {
                **item.fields,
                "seq": seq,
                "kind": item.kind,
                "at": iso(item.at),
                "blobs": {name: next(addresses) for name in item.blobs},
            }
            data = canonical(record)
            leaf = merkle.leaf_hash(data)
            nodes += [
                {"level": level, "idx": idx, "hash": h} for level, idx, h in frontier.append(leaf)
            ]
            search = {f: search_value(f, record.get(f)) for f in SEARCH_FIELDS}
            rows.append(
                {"seq": seq, "kind": item.kind, "at": item.at, "record": data, "leaf_hash": leaf}
                | search
            )
            out.append(Entry(seq, item.kind, item.at.astimezone(UTC), data, leaf))
        if rows:
            insert_rows(s, t.LogEntry, rows)
            insert_rows(s, t.LogNode, nodes)
        head.size = frontier.size
        return out

    def lock(self, s: Session) -> None:
        """Take the append lock now (for callers that must order their own rows with the log's)."""
        self._lock_head(s)

    def _lock_head(self, s: Session) -> t.LogHead:
        # SQLite transactions begin IMMEDIATE (archive.db); PostgreSQL locks the row.
        head = s.scalar(select(t.LogHead).where(t.LogHead.id == 1).with_for_update())
        if head is None:
            raise LogError("the log has no head row; run the migrations (Database.open)")
        return head

    # --- reading ---------------------------------------------------------------------------

    def size(self, s: Session) -> int:
        head = s.get(t.LogHead, 1)
        return head.size if head else 0

    def entry(self, s: Session, seq: int) -> Entry:
        """Entry ``seq`` as stored. Its record and leaf hash are read as the bytes they hold,
        whatever type a rewrite gave them (SQLite keeps text written to a BLOB column), as
        `archive verify` reads them: a changed record then fails its proof, never its reader."""
        row = s.execute(_AS_STORED.where(t.LogEntry.seq == seq)).first()
        if row is None:
            raise LogError(f"no entry {seq} in the archive (it holds {self.size(s)})")
        return Entry(*row)

    def entries(self, s: Session, seqs: Iterable[int]) -> dict[int, Entry]:
        """The entries ``seqs`` that exist, read as :meth:`entry` reads one, in one query."""
        wanted = sorted(set(seqs))
        found: dict[int, Entry] = {}
        for chunk in range(0, len(wanted), 500):
            rows = s.execute(_AS_STORED.where(t.LogEntry.seq.in_(wanted[chunk : chunk + 500])))
            found.update((row[0], Entry(*row)) for row in rows)
        return found

    def root(self, s: Session, size: int | None = None) -> bytes:
        size = self.size(s) if size is None else size
        ranges = merkle.head_ranges(size)
        return merkle.tree_head(size, self._lookup(s, merkle.nodes_for(ranges)))

    def inclusion(self, s: Session, seq: int, size: int | None = None) -> list[bytes]:
        held = self.size(s)
        size = held if size is None else size
        if size > held:
            raise LogError(f"the log holds {held} entries: no proof under a size of {size}")
        if not 0 <= seq < size:
            raise LogError(f"entry {seq} is not in a log of size {size}")
        ranges = merkle.inclusion_ranges(seq, size)
        return merkle.inclusion_proof(seq, size, self._lookup(s, merkle.nodes_for(ranges)))

    def consistency(self, s: Session, old: int, new: int | None = None) -> list[bytes]:
        held = self.size(s)
        new = held if new is None else new
        if new > held:
            raise LogError(f"the log holds {held} entries: no proof up to a size of {new}")
        if not 0 < old <= new:
            raise LogError(f"no consistency proof from size {old} to {new}")
        ranges = merkle.consistency_ranges(old, new)
        return merkle.consistency_proof(old, new, self._lookup(s, merkle.nodes_for(ranges)))

    def _lookup(self, s: Session, wanted: Iterable[merkle.Node]) -> merkle.NodeLookup:
        keys = sorted(wanted)
        found: dict[merkle.Node, bytes] = {}
        for chunk in range(0, len(keys), 500):
            by_level: dict[int, list[int]] = {}
            for level, idx in keys[chunk : chunk + 500]:
                by_level.setdefault(level, []).append(idx)
            # "level = ? AND idx IN (…)" per level, OR-ed: each is a primary-key search. SQLite
            # (3.40) answers the row-value form "(level, idx) IN ((?, ?), …)" with a scan of the
            # whole table: 135 ms for one proof at a million entries (bench/archive_bench.py).
            rows = s.execute(
                select(t.LogNode.level, t.LogNode.idx, t.LogNode.hash).where(
                    or_(
                        *(
                            and_(t.LogNode.level == level, t.LogNode.idx.in_(idxs))
                            for level, idxs in by_level.items()
                        )
                    )
                )
            )
            found.update({(lv, ix): h for lv, ix, h in rows})

        def lookup(node: merkle.Node) -> bytes:
            try:
                return found[node]
            except KeyError:
                raise MissingNode(f"the log is missing tree node {node}") from None

        return lookup


def _frontier_nodes(size: int) -> set[merkle.Node]:
    out, start = set(), 0
    for level in reversed(range(size.bit_length())):
        if size >> level & 1:
            out.add((level, start >> level))
            start += 1 << level
    return out


def iso(at: datetime) -> str:
    """An entry's time as its record holds it (UTC, microseconds, ``Z``)."""
    return at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def search_value(name: str, value: Any) -> str | None:
    """Search column ``name``'s value for a record's ``value``, as text a database column
    holds: PostgreSQL text takes no NUL, and a VARCHAR no more than its width. (A sender
    writes the Message-ID: one with a NUL, or over 998 characters once unfolded, failed its
    whole batch's insert.) The record keeps the value exactly; the column only finds it."""
    if value is None:
        return None
    return str(value).replace("\x00", "")[: _WIDTHS[name]]
