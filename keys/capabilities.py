"""What each agency's signatures advertise, and the cipher the hub encrypts to it with.

DESIGN §3: what the hub encrypts (receipts, deliveries, reminders) is AES-256-CBC
EnvelopedData by default, and AES-256-GCM AuthEnvelopedData for a partner that advertises it.
A signer advertises in its SMIMECapabilities signed attribute (RFC 8551 §2.5.2), which its
signature covers: the list of the algorithms its client reads, most preferred first.

Each message filed whose signature verified and was bound to an agency brings the agency's
list up to date (:func:`record`, in the filing's transaction), unless a message of it received
later was recorded already: a message filed late (retried, or released from quarantine) does
not undo what the agency advertises now. The newest message counts, even when it advertises
nothing (then AES-256-CBC): an agency whose clerks use several clients gets what its latest one
reads, and AES-256-CBC is read by every client. Deliveries and reminders to an agency follow
its list; a receipt follows the list of the message it answers (its archive entry's
``crypto.capabilities``), read by the client that sent it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from sqlalchemy import and_, or_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from archive import tables as t
from formats.algorithms import outbound_cipher

#: organ_id → (when the message was received, its archive sequence number, its signer's
#: capabilities).
Advertised = Mapping[str, tuple[datetime, int, Sequence[str]]]


def record(s: Session, advertised: Advertised, at: datetime) -> None:
    """Keep, for each agency in ``advertised``, what its message advertised, unless one of it
    received later (or at the same moment, filed later) was recorded already."""
    if not advertised:
        return
    rows = [
        {
            "organ_id": organ_id,
            "advertised": list(names),
            "entry_seq": seq,
            "received_at": received,
            "updated_at": at,
        }
        for organ_id, (received, seq, names) in sorted(advertised.items())
    ]
    table = t.AgencyCapabilities.__table__
    dialect = postgresql if s.get_bind().dialect.name == "postgresql" else sqlite
    statement = dialect.insert(table).values(rows)
    newer = statement.excluded
    s.execute(
        statement.on_conflict_do_update(
            index_elements=[table.c.organ_id],
            set_={c: newer[c] for c in ("advertised", "entry_seq", "received_at", "updated_at")},
            where=or_(
                table.c.received_at < newer.received_at,
                and_(table.c.received_at == newer.received_at, table.c.entry_seq < newer.entry_seq),
            ),
        )
    )


def cipher_for(s: Session, organ_id: str) -> str:
    """The content cipher to encrypt to ``organ_id`` with: the one its kept list asks for
    (:func:`formats.algorithms.outbound_cipher`; AES-256-CBC while none of its messages was
    filed)."""
    kept = of(s, organ_id)
    return outbound_cipher(kept.advertised if kept else ())


def of(s: Session, organ_id: str) -> t.AgencyCapabilities | None:
    """What is kept for ``organ_id``, if any of its messages was filed."""
    return s.get(t.AgencyCapabilities, organ_id)
