"""The archive's figures: durable appends, `archive verify`, inclusion and consistency proofs.

Each figure is printed next to its target (issue 4) and a baseline measured in the same run:

- durable appends/s — baseline: one entry per transaction (one fsync each); figures: 100 and
  1,000 entries per transaction. Entries go through ``Archive.file`` (the gateway's path, with a
  signed checkpoint every 1,000 entries) and look like real message entries: ~1 KB of JSON
  fields and one ~10 KB blob (a MIME message whose body is base64 of random bytes, so it
  compresses only ~25 %).
- `archive verify` of 100,000 message entries (with and without decrypting every blob) and of
  1,000,000 entries, the 900,000 above 100,000 small ones without blobs, so that the log can be
  filled in about a minute (filling time is printed but is not a figure). Baseline: the naive
  check, recomputing the root from every stored leaf hash read from the database.
- one inclusion proof (median of many, random entries) and one consistency proof at 1,000,000
  entries, time and size. Baseline: the naive proof, computed from every leaf hash read from
  the database; it must equal the log's proof.

Nothing asserts a time. ``--quick`` runs at a tenth of the sizes.

Run:  .venv/bin/python bench/archive_bench.py [--quick] [--postgres URL]

The PostgreSQL database must be empty and throw-away: the benchmark fills it.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import func, select

from archive import merkle
from archive import tables as t
from archive.blobs import BlobStore
from archive.db import Database
from archive.log import Item, canonical
from archive.records import Transport
from archive.service import Archive, SigningKey
from archive.verify import verify
from gateway.demo import HUB_ADDRESS, DemoWorld

AT = datetime(2026, 11, 2, 3, 0, tzinfo=UTC)
AGENCIES = ("H26.SNV", "H26.STC", "H26.SYT", "H26.SXD", "H26.STP")
BLOB_RANDOM = 7_300  # random bytes whose base64, wrapped, makes a ~10 KB message


# --- entries ---------------------------------------------------------------------------------


def message_item(seq: int, rng: random.Random) -> Item:
    """A message entry: ~1 KB of fields and one ~10 KB blob (the raw message)."""
    agency = AGENCIES[seq % len(AGENCIES)]
    at = AT + timedelta(milliseconds=seq)
    body = base64.encodebytes(rng.randbytes(BLOB_RANDOM))
    raw = (
        f"From: van-thu@{agency.lower()}.hanoi.gov.vn\r\nTo: {HUB_ADDRESS}\r\n"
        f"Message-ID: <{seq}.{agency}@hanoi.gov.vn>\r\nSubject: Bao cao dinh ky {seq}\r\n"
        'Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name="smime.p7m"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode() + body.replace(b"\n", b"\r\n")
    transport = Transport(
        received_at=at,
        protocol="smtp",
        peer=f"10.26.{seq % 200}.{seq % 250}",
        helo=f"mail.{agency.lower()}.hanoi.gov.vn",
        mail_from=f"van-thu@{agency.lower()}.hanoi.gov.vn",
        rcpt_to=[HUB_ADDRESS],
        tls="TLSv1.3 TLS_AES_256_GCM_SHA384",
    )
    fields: dict[str, Any] = {
        "agency": agency,
        "category": "BC-LAODONG",
        "period": "2026-10",
        "status": "rejected" if seq % 20 == 0 else "accepted",
        "document_id": f"{agency}-2026-{seq:08d}",
        "message_id": f"<{seq}.{agency}@hanoi.gov.vn>",
        "digest": hashlib.sha256(raw).hexdigest(),
        "transport": transport.as_dict(),
        "signer": {
            "subject": f"CN=Van thu {agency},O={agency},L=Ha Noi,C=VN",
            "serial": f"{seq * 7919:032x}",
            "issuer": "CN=Hanoi Official-mail Intermediate CA,O=UBND TP Ha Noi,C=VN",
            "revocation": {"kind": "crl", "number": str(seq // 1000), "sha256": "ab" * 32},
        },
        "reasons": [
            f"signature verified: signer {agency} bound to its agency",
            "payload valid against schema bao-cao-lao-dong v2",
            f"period 2026-10 due 2026-11-15; received on time ({seq % 13} days early)",
        ],
    }
    return Item("message", at, fields, {"raw": raw})


def small_item(seq: int) -> Item:
    """A small entry without blobs (to fill a large log quickly)."""
    return Item(
        "delivery",
        AT + timedelta(milliseconds=seq),
        {"agency": AGENCIES[seq % len(AGENCIES)], "status": "delivered", "n": seq},
    )


# --- measuring -------------------------------------------------------------------------------


@dataclass
class Figure:
    name: str
    value: str
    target: str
    baseline: str
    verdict: str

    def line(self) -> str:
        return (
            f"  {self.name:<40} {self.value:>14}   {self.target:<13} {self.verdict:<6} "
            f"baseline {self.baseline}"
        )


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.2f} ms"


def secs(seconds: float) -> str:
    return f"{seconds:,.1f} s" if seconds >= 1 else ms(seconds)


def rate(n: float) -> str:
    return f"{n:,.0f} /s"


def verdict(ok: bool | None) -> str:
    return "" if ok is None else "met" if ok else "MISSED"


def fill(archive: Archive, make: Callable[[int], Item], upto: int, batch: int, what: str) -> float:
    """Append entries until the log holds ``upto``; returns entries/s."""
    with archive.db.session() as s:
        start = archive.log.size(s)
    began = time.perf_counter()
    for first in range(start, upto, batch):
        archive.file([make(seq) for seq in range(first, min(first + batch, upto))])
        done = min(first + batch, upto)
        if sys.stderr.isatty():
            print(f"\r  filling {what}: {done:,}/{upto:,}", end="", file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return (upto - start) / max(time.perf_counter() - began, 1e-9)


def appends(archive: Archive, per_transaction: int, count: int) -> float:
    """Durable appends/s of ``count`` message entries, ``per_transaction`` per commit."""
    with archive.db.session() as s:
        start = archive.log.size(s)
    rng = random.Random(per_transaction)
    end = start + count
    batches = [
        [message_item(seq, rng) for seq in range(first, min(first + per_transaction, end))]
        for first in range(start, end, per_transaction)
    ]  # made before the clock starts: building entries is the caller's work
    began = time.perf_counter()
    for batch in batches:
        archive.file(batch)  # returns once committed (WAL fsync / synchronous_commit)
    elapsed = time.perf_counter() - began
    with archive.db.session() as s:
        assert archive.log.size(s) == end
    return count / elapsed


def stored_leaves(db: Database) -> list[bytes]:
    with db.session() as s:
        query = select(t.LogEntry.leaf_hash).order_by(t.LogEntry.seq)
        return [bytes(h) for h in s.scalars(query.execution_options(yield_per=10_000))]


def naive_root(db: Database) -> tuple[float, bytes]:
    """Baseline: every leaf hash read from the database, the root recomputed from them."""
    began = time.perf_counter()
    root = merkle.root_of(stored_leaves(db))
    return time.perf_counter() - began, root


def naive_path(leaves: Sequence[bytes], m: int) -> list[bytes]:
    """RFC 6962 §2.1.1 PATH(m, D[n]), every subtree hash computed from the leaves."""
    n = len(leaves)
    if n == 1:
        return []
    k = 1 << ((n - 1).bit_length() - 1)
    if m < k:
        return [*naive_path(leaves[:k], m), merkle.root_of(leaves[k:])]
    return [*naive_path(leaves[k:], m - k), merkle.root_of(leaves[:k])]


def naive_subproof(leaves: Sequence[bytes], m: int, complete: bool = True) -> list[bytes]:
    """RFC 6962 §2.1.2 SUBPROOF(m, D[n], b), every subtree hash computed from the leaves."""
    n = len(leaves)
    if m == n:
        return [] if complete else [merkle.root_of(leaves)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
        return [*naive_subproof(leaves[:k], m, complete), merkle.root_of(leaves[k:])]
    return [*naive_subproof(leaves[k:], m - k, False), merkle.root_of(leaves[:k])]


def run_verify(
    archive: Archive, signer: SigningKey, *, check_blobs: bool
) -> tuple[float, int, int]:
    began = time.perf_counter()
    with archive.db.session() as s:
        report = verify(s, archive.blobs, [signer[0]], check_blobs=check_blobs)
    elapsed = time.perf_counter() - began
    if not report.ok:
        raise SystemExit(f"verify found problems in an untouched archive: {report.problems[:5]}")
    return elapsed, report.entries, report.checkpoints


# --- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    single: int  # entries appended one per transaction
    batched: tuple[tuple[int, int], ...]  # (per transaction, entries)
    medium: int  # message entries, verified with and without blobs
    large: int  # all entries, verified; proofs at this size
    proofs: int


FULL = Sizes(500, ((100, 5_000), (1000, 10_000)), 100_000, 1_000_000, 500)
QUICK = Sizes(100, ((100, 1_000), (1000, 2_000)), 10_000, 100_000, 200)


def bench(url: str, label: str, sizes: Sizes, signer: SigningKey) -> list[Figure]:
    db = Database.open(url)
    try:
        with db.session() as s:
            if s.scalar(select(func.count()).select_from(t.LogEntry)):
                raise SystemExit(f"{label}: the database is not empty; give a throw-away one")
        archive = Archive(
            db, BlobStore(os.urandom(32)), HUB_ADDRESS, signer=signer, checkpoint_every=1000
        )
        return _bench(archive, label, sizes, signer)
    finally:
        db.dispose()


def _bench(archive: Archive, label: str, sizes: Sizes, signer: SigningKey) -> list[Figure]:
    out: list[Figure] = []
    sample = message_item(0, random.Random(0))
    print(
        f"\n{label}\n  message entry: record {len(canonical(dict(sample.fields))):,} bytes of "
        f"JSON fields + one {len(sample.blobs['raw']):,}-byte blob (MIME, base64 of random "
        "bytes); checkpoint signed every 1,000 entries",
        flush=True,
    )

    # 1. durable appends
    single = appends(archive, 1, sizes.single)
    out.append(Figure("durable appends, 1 per transaction", rate(single), "", "(itself)", ""))
    for per, count in sizes.batched:
        value = appends(archive, per, count)
        out.append(
            Figure(
                f"durable appends, {per:,} per transaction",
                rate(value),
                "≥ 2,000 /s",
                rate(single),
                verdict(value >= 2000),
            )
        )
    print("\n".join(f.line() for f in out[-1 - len(sizes.batched) :]), flush=True)

    # 2. verify at the medium size, message entries with blobs
    rng = random.Random(2)
    filled = fill(archive, lambda seq: message_item(seq, rng), sizes.medium, 1000, "messages")
    baseline, root = naive_root(archive.db)
    for check_blobs in (True, False):
        elapsed, entries, checkpoints = run_verify(archive, signer, check_blobs=check_blobs)
        blobs = "with" if check_blobs else "without"
        out.append(
            Figure(
                f"verify {entries:,} entries, {blobs} blobs",
                secs(elapsed),
                "",
                f"naive root {secs(baseline)}",
                "",
            )
        )
        print(out[-1].line(), flush=True)
    print(
        f"  (filled at {filled:,.0f} entries/s, 1,000 per transaction; {checkpoints} checkpoints)"
    )

    # 3. verify at the large size (small entries above the medium size)
    filled = fill(archive, small_item, sizes.large, 1000, "small entries")
    baseline, root = naive_root(archive.db)
    elapsed, entries, checkpoints = run_verify(archive, signer, check_blobs=False)
    out.append(
        Figure(
            f"verify {entries:,} entries, without blobs",
            secs(elapsed),
            "< 60 s" if entries >= 1_000_000 else "(1M: < 60 s)",
            f"naive root {secs(baseline)}",
            verdict(elapsed < 60 * entries / 1_000_000),
        )
    )
    print(out[-1].line(), flush=True)
    print(
        f"  (filled at {filled:,.0f} entries/s, 1,000 per transaction; {checkpoints} checkpoints;"
        f" {sizes.medium:,} message entries, the rest small without blobs)"
    )

    # 4. proofs at the large size
    out += _proofs(archive, sizes, root)
    print("\n".join(f.line() for f in out[-2:]), flush=True)
    return out


def _proofs(archive: Archive, sizes: Sizes, root: bytes) -> list[Figure]:
    rng = random.Random(4)
    log = archive.log
    inclusion, consistency = [], []
    with archive.db.session() as s:
        size = log.size(s)
        assert log.root(s) == root, "stored tree head differs from the naive root"
        for _ in range(sizes.proofs):
            seq = rng.randrange(size)
            began = time.perf_counter()
            proof = log.inclusion(s, seq, size)
            leaf = log.entry(s, seq).leaf_hash
            inclusion.append(time.perf_counter() - began)
            assert merkle.verify_inclusion(leaf, seq, size, proof, root)
        old = rng.randrange(1, size)
        for _ in range(sizes.proofs // 4):
            began = time.perf_counter()
            cproof = log.consistency(s, old, size)
            old_root = log.root(s, old)
            consistency.append(time.perf_counter() - began)
        assert merkle.verify_consistency(old, size, old_root, root, cproof)

    began = time.perf_counter()
    leaves = stored_leaves(archive.db)
    naive = naive_path(leaves, seq)
    naive_inclusion = time.perf_counter() - began
    assert naive == proof, "the naive inclusion proof differs from the log's"
    began = time.perf_counter()
    leaves = stored_leaves(archive.db)
    naive_c = naive_subproof(leaves, old)
    naive_consistency = time.perf_counter() - began
    assert naive_c == cproof, "the naive consistency proof differs from the log's"

    i_ms, c_ms = statistics.median(inclusion), statistics.median(consistency)
    return [
        Figure(
            f"inclusion proof at {size:,}: {len(proof) * 32} bytes",
            ms(i_ms),
            "< 10 ms",
            f"naive {secs(naive_inclusion)}",
            verdict(i_ms < 0.010),
        ),
        Figure(
            f"consistency {old:,}→{size:,}: {len(cproof) * 32} bytes",
            ms(c_ms),
            "",
            f"naive {secs(naive_consistency)}",
            "",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a tenth of the sizes")
    parser.add_argument("--postgres", metavar="URL", help="also on this (empty) PostgreSQL db")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    world = DemoWorld.create(AT)
    signer: SigningKey = (world.hub.cert, world.hub.key)
    print(f"  {'figure':<40} {'value':>14}   {'target':<13} {'verdict':<6} baseline")
    print("  (proof times: medians over random entries, database queries included)")
    with tempfile.TemporaryDirectory(prefix="archive-bench-") as tmp:
        bench(
            f"sqlite:///{tmp}/archive.db", f"SQLite (WAL, synchronous=FULL) in {tmp}", sizes, signer
        )
    if args.postgres:
        bench(args.postgres, "PostgreSQL (synchronous_commit=on)", sizes, signer)


if __name__ == "__main__":
    main()
