"""Records from CSV: one layout per category, documented in ``docs/payloads.md``.

The layout (RFC 4180 CSV, UTF-8, comma separated, an optional UTF-8 byte-order mark):

* row 1 is the header: the category's columns (``CATEGORIES[code].columns``), in any order;
  a column for an optional field may be left out, every required one must be there;
* each further row is one record; blank rows are skipped; an empty cell means "absent"
  (allowed only for optional fields); cells are trimmed of surrounding spaces;
* dates are ISO ``YYYY-MM-DD``; other kinds are spelt as in :mod:`formats.categories`.

Every problem is an :class:`InputError` naming the row (the header is row 1), the column and
what is expected there.
"""

from __future__ import annotations

import csv
import io

from formats.categories import CATEGORIES, Value
from formats.errors import InputError
from formats.payload import Record


def records_from_csv(category: str, text: str) -> tuple[Record, ...]:
    """Parse ``text`` as the CSV layout of ``category`` into typed records."""
    if category not in CATEGORIES:
        raise InputError(
            f"unknown category {category!r}; known categories: {', '.join(CATEGORIES)}"
        )
    cat = CATEGORIES[category]
    rows = csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline=""), strict=True)
    try:
        header = next(rows, None)
        if header is None or not any(cell.strip() for cell in header):
            raise InputError(
                f"CSV for {category} is empty; row 1 must be the header: {','.join(cat.columns)}"
            )
        columns = _check_header([cell.strip() for cell in header], category)
        records: list[Record] = []
        for number, row in enumerate(rows, start=2):
            if not any(cell.strip() for cell in row):
                continue
            records.append(_record(category, columns, row, number))
    except csv.Error as err:
        raise InputError(f"CSV for {category} is not valid CSV: {err}") from None
    if len(records) < cat.min_records:
        raise InputError(
            f"CSV for {category} has {len(records)} records; at least {cat.min_records} needed"
        )
    if cat.max_records is not None and len(records) > cat.max_records:
        raise InputError(
            f"CSV for {category} has {len(records)} records; at most {cat.max_records} allowed"
        )
    return tuple(records)


def _check_header(header: list[str], category: str) -> list[str]:
    cat = CATEGORIES[category]
    unknown = [name for name in header if name not in cat.columns]
    if unknown:
        raise InputError(
            f"row 1: column {unknown[0]!r} is not part of the {category} layout; "
            f"expected columns: {','.join(cat.columns)}"
        )
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise InputError(f"row 1: column {repeated[0]!r} appears more than once; keep one")
    missing = [f.name for f in cat.fields if f.required and f.name not in header]
    if missing:
        raise InputError(
            f"row 1: required column {missing[0]!r} is missing from the {category} layout; "
            f"expected columns: {','.join(cat.columns)}"
        )
    return header


def _record(category: str, columns: list[str], row: list[str], number: int) -> Record:
    cat = CATEGORIES[category]
    if len(row) != len(columns):
        raise InputError(
            f"row {number}: has {len(row)} cells but the header has {len(columns)} columns; "
            "quote cells that contain commas"
        )
    values: dict[str, Value | None] = {}
    for name, raw in zip(columns, row, strict=True):
        field = cat.field(name)
        cell = raw.strip()
        if not cell:
            if field.required:
                raise InputError(
                    f"row {number}, column {name}: empty, but {name} is required "
                    f"({field.meaning}); expected {field.expected}"
                )
            values[name] = None
            continue
        try:
            values[name] = field.parse(cell)
        except ValueError:
            raise InputError(
                f"row {number}, column {name}: {cell!r} is not valid; expected {field.expected}"
            ) from None
    return Record.of(cat, values)
