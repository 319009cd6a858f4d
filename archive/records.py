"""Entries of the archive other than messages (pure: values in, :class:`~archive.log.Item` out).

Messages are filed by :mod:`gateway.filing`, which knows the verdict; this module holds the
transport facts they carry and the entries for admin changes and for people reading.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from archive.log import Item


@dataclass(frozen=True)
class Transport:
    """How a message reached the gateway (SMTP/LMTP session or IMAP mailbox)."""

    received_at: datetime
    protocol: str = "file"  # smtp | lmtp | imap | file
    peer: str | None = None
    helo: str | None = None
    mail_from: str | None = None
    rcpt_to: Sequence[str] = ()
    tls: str | None = None  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384", or None
    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Transport:
        known = {"protocol", "received_at", "peer", "helo", "mail_from", "rcpt_to", "tls"}
        return cls(
            received_at=datetime.fromisoformat(str(data["received_at"])),
            protocol=str(data.get("protocol") or "file"),
            peer=data.get("peer"),
            helo=data.get("helo"),
            mail_from=data.get("mail_from"),
            rcpt_to=tuple(data.get("rcpt_to") or ()),
            tls=data.get("tls"),
            extra={k: str(v) for k, v in data.items() if k not in known},
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "received_at": self.received_at.isoformat(),
            "peer": self.peer,
            "helo": self.helo,
            "mail_from": self.mail_from,
            "rcpt_to": list(self.rcpt_to),
            "tls": self.tls,
            **dict(self.extra),
        }


def admin_item(
    at: datetime, actor: str, action: str, subject: str, detail: Mapping[str, Any], event_seq: int
) -> Item:
    """An administrative change (mirrors the ``admin_events`` row ``event_seq``)."""
    return Item(
        "admin",
        at,
        {
            "actor": actor,
            "action": action,
            "subject": subject,
            "detail": dict(detail),
            "event": event_seq,
        },
    )


def read_item(at: datetime, actor: str, action: str, target: str) -> Item:
    """A person reading the archive (show, export, prove, search)."""
    return Item("read", at, {"actor": actor, "action": action, "target": target})
