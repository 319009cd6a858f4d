"""Agencies in and out of files — CSV and TOML — and the plan of an import. Pure: no database,
no clock; the CLI (``gateway agencies``) reads the file, asks :func:`plan_import` what would
change, and applies the plan through :mod:`keys.store`.

Two layouts, described for people in ``docs/agencies.md``:

* **CSV** (RFC 4180, UTF-8, optional byte-order mark): row 1 is the header, naming columns from
  :data:`COLUMNS` in any order (``organ_id`` and ``name_vi`` are required); each further row is
  one agency; ``emails`` holds any number of addresses separated by ``;`` (or spaces); dates are
  ISO ``YYYY-MM-DD``; an empty cell means "none".
* **TOML**: ``[[agency]]`` tables with the same keys — the directory file format of
  :func:`gateway.loading.load_directory`, so old ``agencies.toml`` files import unchanged.

Every problem is an :class:`~formats.errors.InputError` of one line: the file, the row (CSV,
header = row 1) or line (TOML), what is wrong and how to fix it. Text is trimmed and put in
Unicode NFC, so a name typed with decomposed Vietnamese diacritics equals the precomposed one.
"""

from __future__ import annotations

import csv
import io
import json
import re
import tomllib
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import date
from typing import Any

from formats.errors import InputError
from keys.directory import Agency, Directory

COLUMNS = (
    "organ_id",
    "name_vi",
    "name_en",
    "emails",
    "supervisor",
    "valid_from",
    "valid_to",
    "contact",
)
REQUIRED = ("organ_id", "name_vi")
FORMATS = ("csv", "toml")

_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_EMAIL_SEPARATORS = re.compile(r"[;,\s]+")
_TOML_TABLE = re.compile(r"^\s*\[\[\s*agency\s*\]\]\s*(#.*)?$")


@dataclass(frozen=True)
class Entry:
    """One agency read from a file, with where it was (``row 3``, ``line 12``)."""

    agency: Agency
    where: str


# --- reading -------------------------------------------------------------------------------------


def format_of(name: str, explicit: str | None = None) -> str:
    """``csv`` or ``toml``: ``explicit`` if given, else from the file name's suffix."""
    if explicit:
        return explicit
    suffix = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if suffix not in FORMATS:
        raise InputError(
            f"{name}: cannot tell the format from the file name; name it .csv or .toml "
            "or give --format csv|toml"
        )
    return suffix


def read(data: bytes, *, source: str, fmt: str) -> tuple[Entry, ...]:
    """Decode ``data`` (UTF-8) and read it as ``fmt``."""
    text = decode(data, source=source)
    return read_csv(text, source=source) if fmt == "csv" else read_toml(text, source=source)


def decode(data: bytes, *, source: str) -> str:
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(
            f"{source}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start}); save the file as UTF-8 (in a spreadsheet: CSV UTF-8)"
        ) from None


def read_csv(text: str, *, source: str) -> tuple[Entry, ...]:
    rows = csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline=""), strict=True)
    entries: list[Entry] = []
    try:
        header = [cell.strip() for cell in next(rows, [])]
        if not any(header):
            raise InputError(f"{source}: the file is empty; row 1 must be the header: {_cols()}")
        _check_header(header, source)
        for number, row in enumerate(rows, start=2):
            if not any(cell.strip() for cell in row):
                continue
            where = f"row {number}"
            if len(row) != len(header):
                raise InputError(
                    f"{source}: {where}: has {len(row)} cells but the header has "
                    f"{len(header)} columns; quote cells that contain commas"
                )
            values = {name: cell for name, cell in zip(header, row, strict=True) if cell.strip()}
            entries.append(Entry(_agency(values, source, where), where))
    except csv.Error as exc:
        raise InputError(f"{source}: not valid CSV ({exc}); check the quoting") from None
    return tuple(entries)


def read_toml(text: str, *, source: str) -> tuple[Entry, ...]:
    try:
        data = tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{source}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"agency"})
    if unknown:
        raise InputError(
            f"{source}: unknown top-level key {unknown[0]!r}; the file holds [[agency]] tables "
            f"with the keys {_cols()}"
        )
    tables = data.get("agency", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise InputError(f"{source}: 'agency' must be an array of tables, written [[agency]]")
    lines = [n for n, line in enumerate(text.split("\n"), start=1) if _TOML_TABLE.match(line)]
    entries = []
    for index, table in enumerate(tables):
        where = f"line {lines[index]}" if len(lines) == len(tables) else f"agency #{index + 1}"
        entries.append(Entry(_agency(table, source, where), where))
    return tuple(entries)


def _check_header(header: list[str], source: str) -> None:
    for name in header:
        if name not in COLUMNS:
            raise InputError(
                f"{source}: row 1: unknown column {name!r}; the columns are {_cols()} "
                "(spelt exactly so, lower case)"
            )
        if header.count(name) > 1:
            raise InputError(f"{source}: row 1: column {name!r} appears twice; keep one")
    for name in REQUIRED:
        if name not in header:
            raise InputError(f"{source}: row 1: required column {name!r} is missing; add it")


def _agency(values: Mapping[str, Any], source: str, where: str) -> Agency:
    """One agency from a CSV row or a TOML table (absent key = empty)."""
    at = f"{source}: {where}"
    for key in values:
        if key not in COLUMNS:
            raise InputError(f"{at}: unknown key {key!r}; the keys are {_cols()}")
    organ_id = _text(values.get("organ_id"), "organ_id", at)
    name_vi = _text(values.get("name_vi"), "name_vi", at)
    if not organ_id:
        raise InputError(f"{at}: organ_id is empty; give the agency's code (e.g. H26.STP)")
    if not name_vi:
        raise InputError(f"{at}: name_vi of {organ_id} is empty; give its Vietnamese name")
    name_en = _text(values.get("name_en"), "name_en", at)
    emails = frozenset(_emails(values.get("emails"), at))
    supervisor = _text(values.get("supervisor"), "supervisor", at) or None
    valid_from = _day(values.get("valid_from"), "valid_from", at)
    valid_to = _day(values.get("valid_to"), "valid_to", at)
    contact = _text(values.get("contact"), "contact", at) or None
    try:
        return Agency(organ_id, name_vi, name_en, emails, supervisor, valid_from, valid_to, contact)
    except InputError as exc:  # a bad e-mail address, dates the wrong way round
        raise InputError(f"{at}: {exc.message}") from None


def clean(value: str) -> str:
    """Trimmed, NFC text: how every name, code and contact is stored."""
    return unicodedata.normalize("NFC", value).strip()


def _text(value: Any, key: str, at: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f'{at}: {key} must be text (in TOML: {key} = "…")')
    return clean(value)


def _emails(value: Any, at: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = _EMAIL_SEPARATORS.split(value)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f'{at}: emails must be a list of addresses (in TOML: ["a@b.vn"])')
    return [clean(v) for v in value if v.strip()]


def parse_day(text: str, key: str) -> date:
    """``YYYY-MM-DD`` → date; :class:`ValueError` with a message naming ``key`` otherwise."""
    text = text.strip()
    try:
        if _DAY.fullmatch(text):
            return date.fromisoformat(text)
    except ValueError:
        pass
    raise ValueError(f"{key} {text!r} is not a date; write it as YYYY-MM-DD (e.g. 2025-06-30)")


def _day(value: Any, key: str, at: str) -> date | None:
    if value is None or value == "":
        return None
    if isinstance(value, date):  # TOML local date (a datetime is a date too: refuse it)
        if type(value) is date:
            return value
        raise InputError(f"{at}: {key} must be a date without a time, YYYY-MM-DD")
    try:
        return parse_day(str(value), key)
    except ValueError as exc:
        raise InputError(f"{at}: {exc}") from None


def _cols() -> str:
    return ",".join(COLUMNS)


# --- writing -------------------------------------------------------------------------------------


def as_dict(agency: Agency) -> dict[str, Any]:
    """The JSON shape of an agency (also the order of the CSV columns)."""
    return {
        "organ_id": agency.organ_id,
        "name_vi": agency.name_vi,
        "name_en": agency.name_en,
        "emails": sorted(agency.emails),
        "supervisor": agency.supervisor,
        "valid_from": agency.valid_from.isoformat() if agency.valid_from else None,
        "valid_to": agency.valid_to.isoformat() if agency.valid_to else None,
        "contact": agency.contact,
    }


def to_csv(agencies: Iterable[Agency]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)  # RFC 4180: CRLF, cells with CR or LF quoted
    writer.writerow(COLUMNS)
    for agency in agencies:
        row = as_dict(agency)
        row["emails"] = ";".join(row["emails"])
        writer.writerow(["" if row[c] is None else row[c] for c in COLUMNS])
    return out.getvalue()


def to_toml(agencies: Iterable[Agency]) -> str:
    lines = ["# Agency directory: `gateway agencies import FILE` reads it back.", ""]
    for agency in agencies:
        row = as_dict(agency)
        lines.append("[[agency]]")
        for key in COLUMNS:
            value = row[key]
            if key == "emails":
                lines.append("emails = [" + ", ".join(toml_string(e) for e in value) + "]")
            elif key in ("valid_from", "valid_to") and value:
                lines.append(f"{key} = {value}")
            elif value is not None:
                lines.append(f"{key} = {toml_string(value)}")
        lines.append("")
    return "\n".join(lines)


def toml_string(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's (TOML 1.0 §String), plus DEL."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007F")


# --- planning an import --------------------------------------------------------------------------

#: Fields a preset owns. E-mails and contact belong to the admin: a preset never sets them.
PRESET_FIELDS = ("name_vi", "name_en", "supervisor", "valid_from", "valid_to")


@dataclass(frozen=True)
class Plan:
    """What an import changes, in an order the store accepts (supervisors before those they
    supervise). ``kept``: preset entries an admin changed, left alone, with the differing
    fields."""

    add: tuple[Agency, ...]
    update: tuple[Agency, ...]
    unchanged: tuple[str, ...]
    kept: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def changes(self) -> int:
        return len(self.add) + len(self.update)


def differing(a: Agency, b: Agency) -> tuple[str, ...]:
    return tuple(f.name for f in fields(Agency) if getattr(a, f.name) != getattr(b, f.name))


def plan_import(
    existing: Sequence[Agency],
    entries: Sequence[Entry],
    *,
    source: str,
    preset: bool = False,
    overwrite: bool = False,
) -> Plan:
    """Check ``entries`` against the directory ``existing`` and say what importing them does.

    An ordinary import makes each entry exactly as the file says (entries not in the file are
    left alone). A *preset* import only owns :data:`PRESET_FIELDS`: e-mails and contact stay as
    the admin set them, and an entry whose preset fields were changed after loading is *kept*
    unless ``overwrite``. Refuses (before anything is written) duplicates in the file, an
    e-mail claimed twice over overlapping dates, an unknown supervisor and supervisor loops.
    """
    where: dict[str, str] = {}
    for entry in entries:
        organ_id = entry.agency.organ_id
        if organ_id in where:
            raise InputError(
                f"{source}: {entry.where}: OrganId {organ_id} already appears at "
                f"{where[organ_id]}; keep one entry per agency"
            )
        where[organ_id] = entry.where
    current = {a.organ_id: a for a in existing}
    final = dict(current)
    add: list[Agency] = []
    update: list[Agency] = []
    unchanged: list[str] = []
    kept: list[tuple[str, tuple[str, ...]]] = []
    for entry in entries:
        new, old = entry.agency, current.get(entry.agency.organ_id)
        if old is None:
            add.append(new)
        else:
            new = replace(new, emails=old.emails, contact=old.contact) if preset else new
            if new == old:
                unchanged.append(new.organ_id)
                continue
            if preset and not overwrite:
                kept.append((new.organ_id, differing(old, new)))
                continue
            update.append(new)
        final[new.organ_id] = new
    changed = [*add, *update]
    _check_emails(changed, final, where, source)
    _check_supervisors(changed, final, where, source)
    try:
        Directory.of(final.values())
    except InputError as exc:
        raise InputError(f"{source}: {exc.message}") from None
    return Plan(
        tuple(_supervisors_first(add, current)), tuple(update), tuple(unchanged), tuple(kept)
    )


def _check_emails(
    changed: Sequence[Agency], final: Mapping[str, Agency], where: Mapping[str, str], source: str
) -> None:
    touched = {a.organ_id for a in changed}
    claims: dict[str, list[Agency]] = {}
    for agency in final.values():
        if agency.organ_id not in touched:
            for email in agency.emails:
                claims.setdefault(email, []).append(agency)
    for agency in changed:  # file order: the later of two clashing entries is blamed
        for email in sorted(agency.emails):
            for other in claims.get(email, ()):
                if not other.overlaps(agency):
                    continue
                if other.organ_id in touched:
                    raise InputError(
                        f"{source}: {where[agency.organ_id]}: e-mail {email} of "
                        f"{agency.organ_id} is also given to {other.organ_id} at "
                        f"{where[other.organ_id]} over overlapping dates; give it to one "
                        "agency or make their validity dates not overlap"
                    )
                raise InputError(
                    f"{source}: {where[agency.organ_id]}: e-mail {email} of {agency.organ_id} "
                    f"is already used by {other.organ_id} ({other.name_vi}) over overlapping "
                    f"dates; remove it here, or first `gateway agencies update {other.organ_id} "
                    f"--remove-email {email}` (or retire {other.organ_id})"
                )
            claims.setdefault(email, []).append(agency)


def _check_supervisors(
    changed: Sequence[Agency], final: Mapping[str, Agency], where: Mapping[str, str], source: str
) -> None:
    for agency in changed:
        at = f"{source}: {where[agency.organ_id]}"
        boss = agency.supervisor
        if boss is None:
            continue
        if boss not in final:
            raise InputError(
                f"{at}: supervisor {boss} of {agency.organ_id} is neither in the directory nor "
                "in this file; add that agency first (or in this file), or leave supervisor empty"
            )
        chain = [agency.organ_id]
        while boss is not None and boss not in chain:
            chain.append(boss)
            boss = final[boss].supervisor if boss in final else None
        if boss == agency.organ_id:
            raise InputError(
                f"{at}: supervisors go round in a loop ({' → '.join([*chain, boss])}); "
                "leave one of them without a supervisor"
            )


def _supervisors_first(add: Sequence[Agency], current: Mapping[str, Agency]) -> list[Agency]:
    """``add`` reordered so each supervisor is added before those it supervises (no loops:
    :func:`_check_supervisors` ran first)."""
    placed, pending, out = set(current), list(add), []
    while pending:
        ready = [a for a in pending if a.supervisor is None or a.supervisor in placed]
        ready = ready or pending  # a supervisor outside the directory: the store will explain
        for agency in ready:
            placed.add(agency.organ_id)
            out.append(agency)
        pending = [a for a in pending if a.organ_id not in placed]
    return out
