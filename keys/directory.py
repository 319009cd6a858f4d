"""The agency directory as a value: who the agencies are, which mailboxes they own, and when.

Agencies merge, split and change names (since July 2025 many did), so every entry has an
optional validity window and nothing is hard-coded. A later task stores the directory in a
database; this module stays a pure value that the store loads into.

E-mail addresses are compared after :func:`normalize_email`: RFC 5321 §2.4 says the local
part is case-sensitive and the domain is not, so only the domain is lower-cased. Mailboxes are
ASCII: one with a non-ASCII character can only be reached over SMTPUTF8 (RFC 6531), with UTF-8
header fields (RFC 6532), which the gateway does not send (:func:`formats.smime.mailbox_text`);
it is refused where it would come in (``gateway agencies add|update|import``), naming it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date
from types import MappingProxyType

from formats.errors import InputError


def normalize_email(addr: str) -> str:
    """``Local@Example.VN`` → ``Local@example.vn``: exact local part, lower-case domain.

    Raises :class:`ValueError` for anything that is not a bare ``local@domain`` addr-spec in
    ASCII (:func:`_not_ascii`).
    """
    addr = addr.strip()
    local, sep, domain = addr.rpartition("@")
    if not sep or not local or not domain or any(c in addr for c in " <>,;\r\n\t"):
        raise ValueError(f"{addr!r} is not a bare e-mail address (local@domain)")
    if not addr.isascii():
        raise ValueError(_not_ascii(local, domain))
    return f"{local}@{domain.lower()}"


def _not_ascii(local: str, domain: str) -> str:
    """Why ``local@domain`` (not ASCII) is refused, and what to give instead."""
    fix = "give an ASCII mailbox instead"
    if local.isascii():  # only the domain: it has an ASCII form (IDNA A-labels, RFC 5890)
        fix = "write the domain in its ASCII (xn--) form"
        if (ace := ascii_form(f"{local}@{domain}")) is not None:
            fix += f": {ace}"
    return (
        f"{local + '@' + domain!r} is not an ASCII e-mail address: the gateway sends mail "
        "without SMTPUTF8 (RFC 6531), so every mailbox must be ASCII; " + fix
    )


def split_mailboxes(addresses: Iterable[str]) -> tuple[frozenset[str], list[tuple[str, str]]]:
    """``addresses`` the current rules accept, normalised (:func:`normalize_email`), and those
    they refuse, each with why, in the order given: for a directory an earlier version wrote,
    which loads without the refused ones."""
    usable: set[str] = set()
    refused: list[tuple[str, str]] = []
    for address in addresses:
        try:
            usable.add(normalize_email(address))
        except ValueError as exc:
            refused.append((address, str(exc)))
    return frozenset(usable), refused


def ascii_form(addr: str) -> str | None:
    """The ASCII form of a mailbox whose domain alone is not ASCII, domain in lower case:
    ``tp@Sở.vn`` → ``tp@xn--s-lym.vn`` (IDNA A-labels, RFC 5890); None when there is none — a
    non-ASCII local part, a domain IDNA refuses, or one it would map to another name (IDNA
    2003: ß → ss)."""
    local, _, domain = addr.strip().rpartition("@")
    if not local or not local.isascii():
        return None
    try:
        ace = domain.lower().encode("idna")
        if ace.decode("idna") != domain.lower():  # no IDNA 2003 mapping (ß → ss) in it
            return None
    except UnicodeError:
        return None
    return f"{local}@{ace.decode('ascii')}"


def comparable(addresses: Iterable[str]) -> set[str]:
    """``addresses`` as they are compared (:func:`normalize_email`); one that is not a bare
    address matches nothing, and is left out."""
    out = set()
    for address in addresses:
        try:
            out.add(normalize_email(address))
        except ValueError:
            continue
    return out


@dataclass(frozen=True)
class Agency:
    """One agency (cơ quan) in the directory.

    ``valid_from``/``valid_to`` are inclusive calendar dates (local time); ``None`` means
    unbounded. ``emails`` are normalised on construction.
    """

    organ_id: str
    name_vi: str
    name_en: str
    emails: frozenset[str]
    supervisor: str | None = None
    valid_from: date | None = None
    valid_to: date | None = None
    contact: str | None = None

    def __post_init__(self) -> None:
        if not self.organ_id.strip():
            raise InputError(f"agency {self.name_vi!r} has an empty OrganId; give its code")
        try:
            emails = frozenset(normalize_email(e) for e in self.emails)
        except ValueError as exc:
            raise InputError(f"agency {self.organ_id}: {exc}") from None
        object.__setattr__(self, "emails", emails)
        if self.valid_from and self.valid_to and self.valid_to < self.valid_from:
            raise InputError(
                f"agency {self.organ_id}: valid_to {self.valid_to} is before valid_from "
                f"{self.valid_from}; swap or correct the dates"
            )

    def active_on(self, day: date) -> bool:
        return (self.valid_from is None or self.valid_from <= day) and (
            self.valid_to is None or day <= self.valid_to
        )

    def overlaps(self, other: Agency) -> bool:
        """Whether the two validity windows share at least one day."""
        lo = max(self.valid_from or date.min, other.valid_from or date.min)
        hi = min(self.valid_to or date.max, other.valid_to or date.max)
        return lo <= hi


@dataclass(frozen=True)
class Directory:
    """The set of agencies, indexed by OrganId and by mailbox.

    Build it with :meth:`of`. OrganIds are unique. A mailbox may belong to only one agency at a
    time: two agencies claiming it with overlapping validity windows is refused, while disjoint
    windows (a mailbox handed on to the successor of a merged agency) are allowed.
    """

    _by_id: Mapping[str, Agency] = field(default_factory=dict)
    _by_email: Mapping[str, tuple[Agency, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, agencies: Iterable[Agency]) -> Directory:
        by_id: dict[str, Agency] = {}
        by_email: dict[str, list[Agency]] = {}
        for agency in agencies:
            if agency.organ_id in by_id:
                raise InputError(
                    f"OrganId {agency.organ_id} appears twice in the directory "
                    f"({by_id[agency.organ_id].name_vi!r} and {agency.name_vi!r}); "
                    "keep one entry per agency"
                )
            by_id[agency.organ_id] = agency
            for email in sorted(agency.emails):
                for other in by_email.get(email, ()):
                    if other.overlaps(agency):
                        raise InputError(
                            f"e-mail {email} is claimed by both {other.organ_id} and "
                            f"{agency.organ_id}; give it to one agency or make their "
                            "validity dates not overlap"
                        )
                by_email.setdefault(email, []).append(agency)
        return cls(
            MappingProxyType(by_id),
            MappingProxyType({k: tuple(v) for k, v in by_email.items()}),
        )

    def get(self, organ_id: str) -> Agency | None:
        return self._by_id.get(organ_id)

    def by_email(self, addr: str, at: date) -> Agency | None:
        """The agency that owns mailbox ``addr`` on day ``at``, if any."""
        try:
            key = normalize_email(addr)
        except ValueError:
            return None
        for agency in self._by_email.get(key, ()):
            if agency.active_on(at):
                return agency
        return None

    def not_deliverable(self, organ_ids: Iterable[str], day: date) -> list[str]:
        """Why each of ``organ_ids`` cannot be mailed on ``day`` (it is not here, or not
        active that day), one phrase each; empty when all can be."""
        return [english for english, _ in self.undeliverable(organ_ids, day)]

    def undeliverable(self, organ_ids: Iterable[str], day: date) -> list[tuple[str, str]]:
        """:meth:`not_deliverable`, each phrase in English and in Vietnamese."""
        problems = []
        for organ_id in organ_ids:
            agency = self.get(organ_id)
            if agency is None:
                problems.append(
                    (
                        f"{organ_id} is not an agency in the hub's directory",
                        f"{organ_id} không có trong danh bạ của cổng",
                    )
                )
            elif not agency.active_on(day):
                ceased = agency.valid_to is not None and agency.valid_to < day
                en = f"ceased after {agency.valid_to}" if ceased else (
                    f"is in being only from {agency.valid_from}"
                )  # fmt: skip
                vi = f"đã thôi hoạt động sau ngày {agency.valid_to}" if ceased else (
                    f"chỉ hoạt động từ ngày {agency.valid_from}"
                )  # fmt: skip
                problems.append(
                    (
                        f"{organ_id} ({agency.name_en or agency.name_vi}) {en}",
                        f"{organ_id} ({agency.name_vi}) {vi}",
                    )
                )
        return problems

    def __hash__(self) -> int:
        return hash(frozenset(self._by_id.values()))

    def __iter__(self) -> Iterator[Agency]:
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)
