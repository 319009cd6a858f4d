"""What each agency's signatures advertise, and the cipher the hub encrypts to it with.

DESIGN §3: what the hub encrypts (receipts, deliveries, reminders) is AES-256-CBC
EnvelopedData by default, and AES-256-GCM AuthEnvelopedData for a partner that advertises it.
A signer advertises in its SMIMECapabilities signed attribute (RFC 8551 §2.5.2), which its
signature covers: the list of the algorithms its client reads, most preferred first.

Each message filed whose signature verified and was bound to an agency brings the agency's
list up to date (:func:`record`, in the filing's transaction: the receipt built after it is
encrypted the way the message asked). The newest message counts, even when it advertises
nothing (then AES-256-CBC): an agency whose clerks use several clients gets what its latest
one reads, and AES-256-CBC is read by every client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from archive import tables as t
from formats.algorithms import DEFAULT_OUTBOUND_CIPHER, outbound_cipher

#: organ_id → (archive sequence number of the message, its signer's capabilities).
Advertised = Mapping[str, tuple[int, Sequence[str]]]


def record(s: Session, advertised: Advertised, at: datetime) -> None:
    """Keep, for each agency in ``advertised``, what its message advertised, unless a newer
    message of it was recorded already (another worker may file a later one first)."""
    if not advertised:
        return
    rows = [
        {
            "organ_id": organ_id,
            "cipher": outbound_cipher(names),
            "advertised": list(names),
            "entry_seq": seq,
            "updated_at": at,
        }
        for organ_id, (seq, names) in sorted(advertised.items())
    ]
    table = t.AgencyCapabilities.__table__
    dialect = postgresql if s.get_bind().dialect.name == "postgresql" else sqlite
    statement = dialect.insert(table).values(rows)
    newer = statement.excluded
    s.execute(
        statement.on_conflict_do_update(
            index_elements=[table.c.organ_id],
            set_={c: newer[c] for c in ("cipher", "advertised", "entry_seq", "updated_at")},
            where=table.c.entry_seq < newer.entry_seq,
        )
    )


def cipher_for(s: Session, organ_id: str) -> str:
    """The content cipher to encrypt to ``organ_id`` with (:data:`DEFAULT_OUTBOUND_CIPHER`
    while none of its messages was filed)."""
    cipher = s.scalar(
        select(t.AgencyCapabilities.cipher).where(t.AgencyCapabilities.organ_id == organ_id)
    )
    return cipher or DEFAULT_OUTBOUND_CIPHER


def of(s: Session, organ_id: str) -> t.AgencyCapabilities | None:
    """What is kept for ``organ_id``, if any of its messages was filed."""
    return s.get(t.AgencyCapabilities, organ_id)
