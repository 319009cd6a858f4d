"""Filing a message the IMAP poller will not take in (:mod:`gateway.imap`).

DESIGN §1.3: every message is filed; SMTP answers ``552`` instead and stores nothing. A message
the poller will not take in is not put in the intake (a stand-in there would be decided as a
submission) but filed straight in the archive: a ``message`` entry with status ``refused`` —
never released (``archive release`` takes only quarantined ones) and never answered (nobody
authenticated its sender) — with the reason (:class:`~formats.errors.LimitExceeded` or
:class:`Unreadable`), the transport (mailbox, UIDVALIDITY, UID), the source key, and what can be
kept within the limits: the size the server reports and, for an oversize message, its header
block (``BODY.PEEK[HEADER]``, at most ``max_header_bytes``, kept as Latin-1 text: one character
per byte, so the exact bytes come back) with its From, Message-ID and Subject when it reads as a
message's header. The poller holds no archive master key, so the entry has no blob; the message
itself stays in the mailbox it is moved to. The same transaction queues the admin alert, once a
day whatever the number (``alert:imap-oversize:DAY``, ``alert:imap-unreadable:DAY``, naming the
first), and records the key ``refused:<sha256 of the source key>`` in the replay table, so a
crash before the move does not file it twice.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from archive import tables as t
from archive.db import Database
from archive.log import Item, Log
from archive.records import Transport
from formats.errors import GatewayError
from formats.limits import Limits
from formats.smime import read_envelope
from formats.vntime import local_day
from gateway import outbound

log = logging.getLogger("gateway.imap")

#: The admin alert of a refused entry, given its seq: (key, text).
Alert = Callable[[int], tuple[str, str]]


class Unreadable(GatewayError):
    """The mailbox's server did not return the message in
    :data:`~gateway.imap.MAX_FAILED_PASSES` passes: the reason of a refused entry, never sent
    to anyone."""

    code = "imap-unreadable"
    reason_vi = "Máy chủ hộp thư không trả về được thư này"


def refused_fields(
    source_key: str,
    transport: Transport,
    error: GatewayError,
    size: int | None,
    header: bytes | None,
    limits: Limits,
    where: str,
) -> dict[str, Any]:
    """The refused entry's fields (``header``: the header block fetched, at most
    ``max_header_bytes`` + 1 bytes, or ``None``; ``where`` names the mailbox in the log)."""
    fields: dict[str, Any] = {
        "status": "refused",
        "size": size,
        "source_key": source_key,
        "transport": transport.as_dict(),
        "steps": {},
        "reasons": [error.as_dict()],
    }
    if header is not None:
        fields.update(_header_fields(header, limits, where))
    return fields


def file_refused(
    db: Database, fields: dict[str, Any], at: datetime, alert: Alert
) -> tuple[int, bool]:
    """File the refused entry and, in the same transaction, the admin alert ``alert(seq)``
    (key, text; insert-or-ignore: one per key), unless it is filed already (a crash before its
    move): ``(its seq, whether it is new)``."""
    marker = "refused:" + hashlib.sha256(fields["source_key"].encode()).hexdigest()
    with db.session() as s:
        seen = s.get(t.Seen, marker)
        if seen is not None:
            return seen.archive_seq, False
        (entry,) = Log().append_many(s, [Item("message", at, fields)])
        s.add(t.Seen(key=marker, archive_seq=entry.seq))
        outbound.add_alert(s, *alert(entry.seq), at)
    return entry.seq, True


def oversize_alert(
    where: str, uid: int, uidvalidity: int, how: str, limit: int, moved_to: str, at: datetime
) -> Alert:
    """The alert of the day's first message over ``max_message_bytes`` (``how``: its size)."""
    day = local_day(at)

    def alert(seq: int) -> tuple[str, str]:
        return f"imap-oversize:{day}", (
            f"Messages in the IMAP mailbox {where} are over the size limit ({day}): "
            f"the first, UID {uid} (UIDVALIDITY {uidvalidity}), is {how}, over [limits] "
            f"max_message_bytes ({limit}). It was not taken in: it is filed as refused "
            f"(archive entry {seq}: its size and header block) and moved, unread, to "
            f"{moved_to}. Any more today are filed and moved the same way "
            "without another alert; `gateway archive search --status refused` lists them."
        )

    return alert


def unreadable_alert(
    where: str, uid: int, uidvalidity: int, failures: str, moved_to: str, at: datetime
) -> Alert:
    """The alert of the day's first message the server did not return (``failures``: in how
    many passes, over how long, and its last answer)."""
    day = local_day(at)

    def alert(seq: int) -> tuple[str, str]:
        return f"imap-unreadable:{day}", (
            f"The IMAP server did not return messages in the mailbox {where} ({day}): "
            f"the first, UID {uid} (UIDVALIDITY {uidvalidity}), in {failures}. It "
            f"was not taken in: it is filed as refused (archive entry {seq}) and moved to "
            f"{moved_to}, or left where it is if the "
            "server refuses that too (the gateway's log says which). The server's log says "
            "why it cannot read it; once that is fixed, move it back and it is taken in as "
            "a new message. Any more today are handled the same way without another alert."
        )

    return alert


def _header_fields(header: bytes, limits: Limits, where: str) -> dict[str, Any]:
    kept = header[: limits.max_header_bytes]
    fields: dict[str, Any] = {
        "header": {
            "latin1": kept.decode("latin-1"),  # one character per byte: exactly the bytes
            "bytes": len(kept),
            "sha256": hashlib.sha256(kept).hexdigest(),
            "complete": len(header) <= limits.max_header_bytes,
        }
    }
    if len(header) <= limits.max_header_bytes:
        try:
            envelope, _ = read_envelope(header, limits)
        except GatewayError:
            return fields  # no single From or Message-ID: the header block says what is there
        except Exception:  # a defect of ours: the refusal is still filed
            log.exception("IMAP %s: reading a refused message's header block", where)
            return fields
        fields["from"] = envelope.from_addr
        fields["message_id"] = envelope.message_id
        fields["subject"] = envelope.subject
    return fields
