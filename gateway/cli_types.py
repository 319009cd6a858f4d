"""Click parameter types shared by the commands: numbers the database can hold.

An integer given on the command line ends up in a query; one wider than the column (or than
SQLite's 64-bit INTEGER) made the driver raise ``OverflowError``, which the CLI could only
report as an internal error. These types refuse it as a usage error (exit 2) instead, naming
the range.
"""

from __future__ import annotations

import click

#: The widest integer SQLite stores and PostgreSQL's ``BIGINT``: archive sequence numbers,
#: tree sizes, and SQL ``LIMIT``.
INT64_MAX = 2**63 - 1
#: PostgreSQL's ``INTEGER``: the outbox's row ids (``archive.tables.Outbox.id``).
INT32_MAX = 2**31 - 1

#: An archive entry's sequence number (the first entry is 0).
SEQ = click.IntRange(min=0, max=INT64_MAX)
#: ``--after SEQ``: entries after this one (-1: from the first).
AFTER = click.IntRange(min=-1, max=INT64_MAX)
#: A number of entries: a tree size, a ``--limit``.
COUNT = click.IntRange(min=1, max=INT64_MAX)
#: An outbox row's id.
OUTBOX_ID = click.IntRange(min=1, max=INT32_MAX)
