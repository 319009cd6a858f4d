"""Limits checked before any parsing (DESIGN §5 rule 4).

One frozen value carries every cap; callers pass it in, so a deployment can tighten or relax
them from the settings file without touching code.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    #: Whole message as received, in bytes (SMTP SIZE; answered 552).
    max_message_bytes: int = 32 * MiB
    #: The header block of any one MIME entity, in bytes.
    max_header_bytes: int = 32 * 1024
    #: Longest physical line anywhere in the message (RFC 5322 §2.1.1 allows 998 + CRLF).
    max_line_bytes: int = 998
    #: MIME parts counted over the whole (decrypted) structure.
    max_parts: int = 16
    #: Nesting of MIME entities (the message itself is depth 1).
    max_depth: int = 4
    #: The XML payload, after base64 decoding.
    max_xml_bytes: int = 24 * MiB
    #: Element nesting in the XML payload.
    max_xml_depth: int = 32

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"limit {name} must be a positive integer, got {value!r}")


DEFAULT_LIMITS = Limits()
