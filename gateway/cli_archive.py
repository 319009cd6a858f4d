"""``gateway archive …``: list, search, show, release, verify, checkpoint; ``prove``,
``export`` and ``verify-bundle`` are in :mod:`gateway.cli_proofs`.

Every read by a person (list, search, show, prove, export) is logged as a ``read`` entry of
the archive in the same transaction as the read, and printed only once that is committed
(DESIGN §5 rule 6).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from sqlalchemy import select
from sqlalchemy.orm import Session

from archive import bundle, merkle
from archive import checkpoint as cp
from archive import tables as t
from archive.blobs import BlobDamaged
from archive.log import LogError
from archive.search import (
    Query,
    QueryError,
    line,
    parse_bound,
    summary,
)
from archive.service import Archive
from archive.verify import Kept
from formats.errors import InputError
from gateway import intake
from gateway.cli import Failure, actor, emit_json, load_settings, now
from gateway.cli_keys import key_passphrase
from gateway.cli_types import AFTER, COUNT, SEQ
from gateway.loading import open_archive, open_database
from gateway.verdict import FILED
from keys import files, store

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (LogError, BlobDamaged, cp.CheckpointError, QueryError, bundle.BundleError) as err:
            raise Failure(str(err)) from err


@click.group("archive", cls=_Group)
def archive_cmd() -> None:
    """The tamper-evident archive: find, read, prove and export evidence."""


@contextmanager
def _opened(ctx: click.Context) -> Iterator[Archive]:
    settings = load_settings(ctx)
    db = open_database(settings, existing=True)  # read, not made: a wrong home is an error
    try:
        yield open_archive(settings, db)
    finally:
        db.dispose()


def _read(a: Archive, s: Session, action: str, target: str) -> None:
    a.read(s, at=now(), actor=actor(), action=action, target=target)


def _write_private(path: Path, data: bytes) -> None:
    """Evidence leaves the encrypted store here: owner-only, written whole or not at all."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write {path}: {exc.strerror}") from None


# --- list, search, show --------------------------------------------------------------------------


def _listing(ctx: click.Context, query: Query, action: str, as_json: bool) -> None:
    with _opened(ctx) as a, a.db.session() as s:
        try:
            items = [summary(row) for row in s.scalars(query.statement())]
        except (ValueError, TypeError) as exc:  # a column the driver cannot read as its type
            raise Failure(
                f"an entry in this range cannot be read ({exc}): a column was altered in the "
                "database? `gateway archive verify` says which"
            ) from exc
        _read(a, s, action, query.describe())
    if as_json:
        emit_json(items)
    elif not items:
        click.echo("(no entries)")
    for item in [] if as_json else items:
        click.echo(line(item))


#: The kinds of entry the gateway files (a --kind outside them would find nothing, silently).
ENTRY_KINDS = (
    "message", "receipt", "resend", "delivery", "reminder", "alert", "outcome",
    "deemed-consent", "paper", "admin", "read",
)  # fmt: skip
_KIND = click.Choice(ENTRY_KINDS)
#: A message's verdict, or a paper record's (``accepted``) or its withdrawal's (gateway.paper).
_STATUS = click.Choice((*FILED, "withdrawal"))


@archive_cmd.command("list")
@click.option("--kind", type=_KIND, help="Only entries of this kind.")
@click.option("--limit", type=COUNT, default=100, show_default=True)
@click.option("--after", type=AFTER, help="Only entries after this SEQ.")
@json_option
@click.pass_context
def list_cmd(
    ctx: click.Context, kind: str | None, limit: int, after: int | None, as_json: bool
) -> None:
    """List entries in log order (who, what, when; never content)."""
    _listing(ctx, Query(kind=kind, limit=limit, after=after), "list", as_json)


@archive_cmd.command("search")
@click.option("--agency", help="Sending agency (OrganId).")
@click.option("--category", help="Payload category, e.g. work-permit.")
@click.option("--period", metavar="YYYY-MM", help="Reporting period (month of its last day).")
@click.option(
    "--status",
    type=_STATUS,
    help="A message's verdict (refused: never taken in, over IMAP); a paper record's or "
    "its withdrawal's.",
)
@click.option("--from", "start", metavar="DATE", help="From this day or time (Vietnam time).")
@click.option("--to", "end", metavar="DATE", help="Up to this day (included) or time.")
@click.option("--document-id", help="The payload's DocumentId.")
@click.option("--message-id", help="The message's Message-ID header.")
@click.option(
    "--digest",
    help="SHA-256 of the raw message as received (a receipt's ReceivedDigest is its payload's: "
    "find that entry by the receipt's ArchiveSequence, with `archive show`).",
)
@click.option("--kind", type=_KIND, help="Entry kind.")
@click.option("--limit", type=COUNT, default=100, show_default=True)
@click.option("--after", type=AFTER, help="Only entries after this SEQ.")
@json_option
@click.pass_context
def search_cmd(
    ctx: click.Context, /, start: str | None, end: str | None, as_json: bool, **kw: Any
) -> None:
    """Find entries by agency, category, period, status, dates, identifiers or digest."""
    query = Query(
        start=_bound(start) if start else None,
        end=_bound(end, end=True) if end else None,
        **kw,
    )
    _listing(ctx, query, "search", as_json)


#: The years a ``--from``/``--to`` bound may fall in, in its own time zone: near the ends of
#: ``datetime``'s range (years 1 and 9999), the day after a ``--to`` date, or the bound in
#: UTC, overflows. (Compared in UTC, 1900-01-01 in Vietnam, 1899-12-31 17:00 UTC, was out.)
_FIRST_YEAR, _LAST_YEAR = 1900, 9998


def _bound(text: str, *, end: bool = False) -> datetime:
    """``parse_bound``, refusing a bound out of range (:class:`QueryError`)."""
    out = QueryError(f"{text!r} is out of range: give a day or time in {_FIRST_YEAR}–{_LAST_YEAR}")
    try:
        value = parse_bound(text, end=end)
        last = value - timedelta(microseconds=1) if end else value  # an end is exclusive
        value.astimezone(UTC)  # (within datetime's range in UTC too)
    except OverflowError:
        raise out from None
    if value.year < _FIRST_YEAR or last.year > _LAST_YEAR:
        raise out
    return value


@archive_cmd.command("show")
@click.argument("seq", type=SEQ)
@click.option("--blob", "blob_name", metavar="NAME", help="Print (or --out) this blob's bytes.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the blob here.")
@json_option
@click.pass_context
def show_cmd(
    ctx: click.Context, seq: int, blob_name: str | None, out: Path | None, as_json: bool
) -> None:
    """Show entry SEQ: its fields and its blobs' names and sizes (content only with --blob)."""
    if out is not None and blob_name is None:
        raise Failure("--out writes a blob: name it with --blob NAME")
    if as_json and blob_name is not None and out is None:
        raise Failure("--blob gives the blob's bytes as they are, not JSON: leave out --json")
    with _opened(ctx) as a, a.db.session() as s:
        entry = a.log.entry(s, seq)
        addresses = entry.blobs
        if blob_name is not None:
            if blob_name not in addresses:
                names = ", ".join(sorted(addresses)) or "none"
                raise Failure(f"entry {seq} has no blob {blob_name!r} (it has: {names})")
            data = a.blobs.get(s, addresses[blob_name])
            _read(a, s, "show", f"entry {seq} blob {blob_name}")
        else:
            rows = s.execute(
                select(t.Blob.sha256, t.Blob.size).where(t.Blob.sha256.in_(addresses.values()))
            )
            sizes = {address: size for address, size in rows}
            _read(a, s, "show", f"entry {seq}")
    if blob_name is not None:
        if out is None:
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        else:
            _write_private(out, data)
            click.echo(f"wrote {blob_name} of entry {seq} ({len(data)} bytes) to {out}", err=True)
        return
    fields = {k: v for k, v in entry.fields.items() if k not in ("seq", "kind", "at", "blobs")}
    blobs = [{"name": n, "sha256": addr, "size": sizes.get(addr)} for n, addr in addresses.items()]
    if as_json:
        at = entry.fields["at"]
        emit_json(
            {"seq": seq, "kind": entry.kind, "at": at, "leaf_hash": entry.leaf_hash.hex(),
             "fields": fields, "blobs": blobs}
        )  # fmt: skip
        return
    click.echo(f"entry {seq}  {entry.kind}  {entry.fields['at']}")
    click.echo(f"leaf hash: {entry.leaf_hash.hex()}")
    for name, value in fields.items():
        shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        click.echo(f"{name}: {shown}")
    for b in blobs:
        click.echo(f"blob {b['name']:<14} {b['size'] or '?':>9} bytes  sha256 {b['sha256']}")


@archive_cmd.command("release")
@click.argument("seq", type=SEQ)
@json_option
@click.pass_context
def release_cmd(ctx: click.Context, seq: int, as_json: bool) -> None:
    """Put quarantined message SEQ back in the inbox to be decided again (after the cause is
    fixed: a trust anchor or certificate added, a defect of the gateway's corrected). It keeps
    its time of receipt; the running service decides it and files a new entry."""
    with _opened(ctx) as a, a.db.session() as s:
        entry = a.log.entry(s, seq)
        raw = a.blobs.get(s, entry.blobs["raw"]) if "raw" in entry.blobs else b""
        number, new = intake.release(s, seq, entry.fields, raw, at=now(), actor=actor())
    if as_json:
        emit_json({"seq": seq, "intake": number, "released": new})
    elif new:
        click.echo(
            f"entry {seq} is back in the inbox as intake {number}: `gateway serve` decides it"
        )
    else:
        click.echo(f"entry {seq} was released already, as intake {number}")


# --- verify, checkpoint --------------------------------------------------------------------------


#: A checkpoint's signer checked against trust from outside the database (verify, prove).
ca_option = click.option(
    "--ca",
    "anchors",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Trust a checkpoint only if its signer's path to this CA (a file from outside the "
    "database; stored sub-CAs may link) validates at the checkpoint's time.",
)
hub_address_option = click.option(
    "--hub-address",
    "hub_addresses",
    multiple=True,
    metavar="ADDRESS",
    help="With --ca: the hub's address that its certificates name (repeatable; default "
    "[hub] address). Give earlier ones too if the hub's address changed.",
)


def pinned_trust(
    ctx: click.Context, anchors: tuple[Path, ...], hub_addresses: tuple[str, ...]
) -> tuple[list[x509.Certificate], tuple[str, ...]]:
    """The certificates of ``--ca`` and the hub addresses their checkpoint signers must name
    (``--hub-address``, by default ``[hub] address``); none without ``--ca``."""
    if hub_addresses and not anchors:
        raise InputError("--hub-address is checked with --ca: give the CA too")
    trusted = [cert for p in anchors for cert in files.load_certificates(p)]
    hubs = (hub_addresses or (load_settings(ctx).hub.address,)) if trusted else ()
    return trusted, hubs


class _Progress:
    """Progress on stderr, at most once a second, only once a run has taken a second."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if time.monotonic() - self.last >= 1.0:
            self.last = time.monotonic()
            click.echo(f"verify: {stage} {done}/{total}", err=True)


@archive_cmd.command("verify")
@click.option("--no-blobs", is_flag=True, help="Skip decrypting and re-hashing every blob.")
@ca_option
@hub_address_option
@click.option(
    "--kept",
    "kept_files",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    metavar="FILE",
    help="A tree head kept outside the database: the JSON of `gateway archive checkpoint "
    "--json` (or of `prove --json`), or a bundle's checkpoint.txt. The log must still hash to "
    "it (repeatable).",
)
@json_option
@click.pass_context
def verify_cmd(
    ctx: click.Context,
    no_blobs: bool,
    anchors: tuple[Path, ...],
    hub_addresses: tuple[str, ...],
    kept_files: tuple[Path, ...],
    as_json: bool,
) -> None:
    """Recompute every leaf, node, checkpoint, admin event and blob, and compare the key store
    and the agency directory with the admin events. Exit 0 if all agree, 1 if not. Without
    --ca, checkpoints are checked against the hub certificates the database holds, which
    whoever can write the database could replace; without --kept, deleting the newest entries
    with their checkpoints leaves a log that verifies."""
    trusted, hubs = pinned_trust(ctx, anchors, hub_addresses)
    kept = [_kept(p) for p in kept_files]
    with _opened(ctx) as a:
        report = a.verify(
            check_blobs=not no_blobs,
            progress=_Progress(),
            anchors=trusted,
            hub_addresses=hubs,
            kept=kept,
        )
    if as_json:
        emit_json(report.as_dict())
    else:
        for problem in report.problems:
            click.echo(f"PROBLEM: {problem}")
        state = "verifies" if report.ok else f"does NOT verify ({len(report.problems)} problems)"
        if report.entries > report.covered:
            first, last = report.covered, report.entries - 1
            which = f"entry {first} is" if first == last else f"entries {first} to {last} are"
            if report.ok:
                click.echo(
                    f"NOTE: {which} covered by no checkpoint yet: only a tree head kept outside "
                    "(--kept) shows that they were not rewritten; `gateway archive checkpoint` "
                    "signs one now"
                )
            else:  # a checkpoint signed now would vouch for what was changed
                click.echo(
                    f"NOTE: {which} covered by no checkpoint that verifies; sign none until the "
                    "problems above are explained: a checkpoint signed now would vouch for them"
                )
        against = f", {report.kept} kept outside" if kept else ""
        click.echo(
            f"archive {state}: {report.entries} entries, {report.checkpoints} checkpoints"
            f"{against}, {report.blobs} blobs; root {report.root.hex()}"
        )
    ctx.exit(0 if report.ok else 1)


#: A kept tree head is a few hundred bytes; a file far larger is not one.
_KEPT_MAX = 1 << 20


def _kept(path: Path) -> Kept:
    """The tree head in ``path``: checkpoint.txt, or JSON with ``size`` and ``root`` (hex),
    at the top or under ``checkpoint`` (as `prove --json` nests it)."""
    try:
        with path.open("rb") as f:
            data = f.read(_KEPT_MAX + 1)
    except OSError as exc:
        raise Failure(f"--kept {path}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > _KEPT_MAX:
        raise Failure(f"--kept {path}: larger than a tree head could be")
    if data.startswith(cp.HEADER.encode()):
        try:
            head = cp.Checkpoint.parse(data)
        except cp.CheckpointError as err:
            raise Failure(f"--kept {path}: {err}") from None
        return Kept(head.size, head.root, str(path))
    try:
        value = json.loads(data)
        if isinstance(value, dict) and isinstance(value.get("checkpoint"), dict):
            value = value["checkpoint"]
        size, root = value["size"], bytes.fromhex(value["root"])
        if type(size) is not int or size < 0 or len(root) != merkle.HASH_SIZE:
            raise ValueError
    except (ValueError, TypeError, KeyError, UnicodeDecodeError, RecursionError):
        raise Failure(
            f"--kept {path}: not a tree head (the JSON of `gateway archive checkpoint --json`, "
            "with size and a 64-digit hex root, or a bundle's checkpoint.txt)"
        ) from None
    return Kept(size, root, str(path))


@archive_cmd.command("checkpoint")
@json_option
@click.pass_context
def checkpoint_cmd(ctx: click.Context, as_json: bool) -> None:
    """Sign the current tree head now with the newest hub key (needs the key passphrase)."""
    passphrase = key_passphrase(ctx)
    at = now()
    with _opened(ctx) as a:
        with a.db.session() as s:
            keys = store.private_keys(s, role="hub", passphrase=passphrase, at=at)
        if not keys:
            raise Failure(
                "no usable hub key in the key store to sign with; add one with "
                "`gateway keys hub new` or `gateway keys hub import`"
            )
        stored, key = keys[0]
        a.signer = (stored.certificate, key)
        row = a.checkpoint(at)
    out = {"id": row.id, "size": row.size, "root": row.root.hex(), "at": row.at.isoformat()}
    if as_json:
        emit_json({**out, "signer": stored.subject})
    else:
        click.echo(f"checkpoint #{row.id}: size {row.size}, root {row.root.hex()}, {out['at']}")
