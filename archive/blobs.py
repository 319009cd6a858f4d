"""Blobs: content-addressed, compressed and encrypted at rest (DESIGN §5 rule 6).

A blob is addressed by the SHA-256 of its plaintext. It is stored as
``nonce || AES-256-GCM(data key, zlib(plaintext), aad = address)``; the data key is itself
stored wrapped (AES-256-GCM) under the archive master key, which lives outside the database
(a file in the home, mode 0600, or an environment variable). A stolen database file therefore
reveals no payload, and a changed byte anywhere in a blob fails its tag or its address.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select
from sqlalchemy.orm import Session
from zlib_ng import zlib_ng as zlib

from archive import tables as t
from archive.db import insert_rows
from formats.errors import ConfigError

KEY_BYTES = 32
NONCE_BYTES = 12
#: zlib-ng's level 2: a 1 MB submission's text blobs (the decrypted entity, the payload) in
#: 1.4 ms instead of 3.8 at level 6, stored in 109 KB instead of 80 KB, beside the ~800 KB of
#: its raw message (Huffman only, whatever the level).
_LEVEL = 2
#: zlib-ng's error (its stub declares an instance, not the class).
_INFLATE_ERROR: type[Exception] = zlib.error  # type: ignore[assignment]
#: A sample this big decides how a blob is compressed (see :func:`compress`).
_SAMPLE = 16 * 1024
#: Blob addresses a store remembers as stored (:attr:`BlobStore._stored`).
_REMEMBERED = 4096


def compress(data: bytes, *, dense: bool = False) -> bytes:
    """zlib, chosen by what the data is: text (XML, headers) compresses well with LZ77 at
    a low level; base64 of ciphertext or signatures does not — only its 6-bit alphabet does, which
    Huffman coding alone captures (the same ratio, ~0.76, in half the time or less). ``dense``:
    the caller knows the data to be such base64 (an encrypted message); otherwise a big blob is
    judged by a sample. Any zlib stream decompresses the same way, so the choice is not
    recorded. zlib-ng writes and reads the same zlib streams as zlib, 2–4× faster (a 1 MB
    message's blobs: ~25 → ~4 ms with level 2)."""
    if not dense and len(data) > _SAMPLE:
        sample = data[:_SAMPLE]
        dense = len(zlib.compress(sample, 1)) > 0.6 * len(sample)
    if dense:
        packer = zlib.compressobj(_LEVEL, zlib.DEFLATED, 15, 8, zlib.Z_HUFFMAN_ONLY)
        return packer.compress(data) + packer.flush()
    return zlib.compress(data, _LEVEL)


class BlobDamaged(Exception):
    """A stored blob does not decrypt, or does not hash to its address."""


def load_master_key(path: Path, *, create: bool = False) -> bytes:
    """The 32-byte master key (base64 in a file), created if asked and absent."""
    env = os.environ.get("GATEWAY_ARCHIVE_KEY")
    if env:
        return _decode(env, "GATEWAY_ARCHIVE_KEY")
    try:
        if not path.exists():
            if not create:
                raise ConfigError(
                    f"archive master key {path} not found; the archive cannot read its blobs "
                    "without it (restore it from your key backup)"
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(base64.b64encode(os.urandom(KEY_BYTES)).decode() + "\n")
                f.flush()
                os.fsync(f.fileno())
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        # A directory, a path under a file, no permission: the setting names no usable file.
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"archive master key {path}: {why}; [archive] master_key_file must name a file "
            "this user can read (or, for a new archive, create)"
        ) from None
    return _decode(text.strip(), str(path))


def _decode(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{where}: the archive master key must be 32 bytes in base64")
    return key


@dataclass
class BlobStore:
    """Seals and opens blobs with data keys wrapped by ``master_key``."""

    master_key: bytes
    _keys: dict[int, AESGCM] = field(default_factory=dict, repr=False)
    _current: int | None = field(default=None, repr=False)
    #: Hashed and compressed ahead of the transaction (:meth:`prepare`), taken by put_many:
    #: by ``id(data)``, then ``(data, address, zlib stream)``. Holding ``data`` keeps its id
    #: from going to another object while the entry lasts.
    _ready: dict[int, tuple[bytes, str, bytes | None]] = field(default_factory=dict, repr=False)
    #: Addresses lately found stored or stored: their blobs (a signer's certificate path, its
    #: revocation evidence) come again with the next messages, and need no zlib stream then.
    #: Only a hint: :meth:`put_many` still looks in the database and compresses what is missing.
    _stored: dict[str, None] = field(default_factory=dict, repr=False)

    def prepare(self, blobs: Iterable[tuple[bytes, bool]]) -> None:
        """Hash and compress ``blobs`` (each with whether it is dense: :func:`compress`) now,
        before the transaction that stores the very same objects, so that the write lock
        (SQLite's, or the log head's on PostgreSQL) is not held while SHA-256 and zlib work.
        What an earlier call prepared and no transaction stored (it failed) is dropped."""
        self._ready.clear()
        for data, dense in blobs:
            address = hashlib.sha256(data).hexdigest()
            packed = None if address in self._stored else compress(data, dense=dense)
            self._ready[id(data)] = (data, address, packed)

    def _take_ready(self, data: bytes) -> tuple[str, bytes | None]:
        """The address of ``data``, and its zlib stream if :meth:`prepare` made it."""
        ready = self._ready.pop(id(data), None)
        if ready is not None:
            return ready[1], ready[2]
        return hashlib.sha256(data).hexdigest(), None

    def put(self, s: Session, data: bytes, *, at: datetime) -> str:
        """Store ``data`` (once: identical content is stored once) and return its address."""
        return self.put_many(s, [data], at=at)[0]

    def put_many(self, s: Session, blobs: Sequence[bytes], *, at: datetime) -> list[str]:
        """Store each of ``blobs`` (identical content once) and return their addresses, in order.

        One query finds what is already stored and one multi-row insert adds the rest: a
        look-up per blob would also flush the session once per blob, which made batched
        appends no faster than single ones (bench/archive_bench.py).
        """
        taken = [self._take_ready(data) for data in blobs]
        addresses = [address for address, _ in taken]
        # By address: also drops repeats within the batch, keeping a prepared stream (one object
        # given twice, a signer's cached certificate path, was prepared once and taken once).
        new: dict[str, tuple[bytes, bytes | None]] = {}
        for (address, packed), data in zip(taken, blobs, strict=True):
            if packed is not None or address not in new:
                new[address] = (data, packed)
        wanted = sorted(new)
        for i in range(0, len(wanted), 500):
            for address in s.scalars(
                select(t.Blob.sha256).where(t.Blob.sha256.in_(wanted[i : i + 500]))
            ):
                del new[address]
        if new:
            key_id, aead = self._data_key(s, at)
            rows = []
            for address, (data, packed) in new.items():
                nonce = os.urandom(NONCE_BYTES)
                body = aead.encrypt(nonce, packed or compress(data), address.encode())
                rows.append(
                    {"sha256": address, "key_id": key_id, "size": len(data), "sealed": nonce + body}
                )
            insert_rows(s, t.Blob, rows)
        self._remember(addresses)
        return addresses

    def _remember(self, addresses: list[str]) -> None:
        for address in addresses:
            self._stored.pop(address, None)
            self._stored[address] = None  # the newest last
        while len(self._stored) > _REMEMBERED:
            del self._stored[next(iter(self._stored))]

    def get(self, s: Session, address: str) -> bytes:
        row = s.get(t.Blob, address)
        if row is None:
            raise BlobDamaged(f"blob {address} is missing")
        return self.open(s, row)

    def open(self, s: Session, row: t.Blob) -> bytes:
        aead = self._key(s, row.key_id)
        nonce, body = row.sealed[:NONCE_BYTES], row.sealed[NONCE_BYTES:]
        try:
            data = zlib.decompress(aead.decrypt(nonce, body, row.sha256.encode()))
        except (InvalidTag, _INFLATE_ERROR):
            raise BlobDamaged(f"blob {row.sha256} does not decrypt: it was altered") from None
        if hashlib.sha256(data).hexdigest() != row.sha256 or len(data) != row.size:
            raise BlobDamaged(f"blob {row.sha256} does not match its address")
        return data

    def _data_key(self, s: Session, at: datetime) -> tuple[int, AESGCM]:
        if self._current is not None and s.get(t.DataKey, self._current) is None:
            # Created in a transaction that was rolled back. Its number may be given again to
            # the next key made (SQLite reuses the highest rowid): the unwrapped key cached
            # under it must go too, or blobs would be sealed with a key no row holds.
            self._keys.pop(self._current, None)
            self._current = None
        if self._current is None:
            newest = s.scalar(select(t.DataKey).order_by(t.DataKey.id.desc()).limit(1))
            if newest is None:
                raw = os.urandom(KEY_BYTES)
                nonce = os.urandom(NONCE_BYTES)
                wrapped = nonce + AESGCM(self.master_key).encrypt(nonce, raw, b"data-key")
                newest = t.DataKey(wrapped=wrapped, created_at=at)
                s.add(newest)
                s.flush()
                self._keys[newest.id] = AESGCM(raw)
            self._current = newest.id
        return self._current, self._key(s, self._current)

    def key(self, s: Session, key_id: int) -> AESGCM:
        """Data key ``key_id``, unwrapped (cached); :class:`ConfigError` if the master key does
        not open it."""
        return self._key(s, key_id)

    def _key(self, s: Session, key_id: int) -> AESGCM:
        aead = self._keys.get(key_id)
        if aead is None:
            row = s.get(t.DataKey, key_id)
            if row is None:
                raise BlobDamaged(f"data key {key_id} is missing")
            try:
                raw = AESGCM(self.master_key).decrypt(
                    row.wrapped[:NONCE_BYTES], row.wrapped[NONCE_BYTES:], b"data-key"
                )
            except InvalidTag:
                raise ConfigError(
                    "the archive master key does not open the archive's data keys; it is the "
                    "wrong key for this database"
                ) from None
            aead = self._keys[key_id] = AESGCM(raw)
        return aead

    def forget(self) -> None:
        """Drop cached keys (after a rollback that may have discarded a new data key)."""
        self._keys.clear()
        self._current = None
