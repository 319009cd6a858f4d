"""The archive log: appends, proofs, checkpoints, and tampering found and named by `verify`.

Each tamper test changes the database the way an intruder with SQL access would (plain SQL,
behind the gateway's back) and checks that verification fails *and names what and where*,
while an untouched archive verifies.
"""

from __future__ import annotations

import base64
import hashlib
import os
import sqlite3
import subprocess
import threading
import zlib
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from archive import blobs, merkle
from archive import checkpoint as cp
from archive import tables as t
from archive import verify as verify_module
from archive.blobs import BlobStore
from archive.db import Database
from archive.log import Item, Log
from archive.service import outside_trust
from archive.verify import verify
from gateway.demo import DemoWorld
from keys.issuing import Issued, issue_agency, issue_hub, make_crl, make_intermediate, make_root
from keys.trust import TrustStore
from tests.conftest import WORLD_AT

N = 40


@pytest.fixture
def archive(tmp_path: Path, world: DemoWorld) -> tuple[Database, Log]:
    db = Database.open(f"sqlite:///{tmp_path}/archive.db")
    log = Log(BlobStore(os.urandom(32)))
    with db.session() as s:
        log.append_many(
            s,
            [
                Item(
                    "message",
                    WORLD_AT + timedelta(seconds=i),
                    {"status": "accepted" if i % 3 else "rejected", "agency": "H26.SNV", "n": i},
                    {"raw": f"message {i}".encode() * 20, "shared": b"same bytes in every entry"},
                )
                for i in range(N)
            ],
        )
    _checkpoint(db, log, world, N // 2)
    _checkpoint(db, log, world, N)
    return db, log


def _checkpoint(db: Database, log: Log, world: DemoWorld, size: int) -> None:
    key = world.hub.key
    assert isinstance(key, rsa.RSAPrivateKey)
    with db.session() as s:
        c = cp.Checkpoint("hub@exchange.hanoi.gov.vn", size, log.root(s, size), WORLD_AT)
        s.add(
            t.Checkpoint(
                size=size,
                root=c.root,
                at=c.at,
                body=c.body(),
                signature=cp.sign(c, world.hub.cert, key),
            )
        )


def _verify(db: Database, log: Log, world: DemoWorld) -> list[str]:
    with db.session() as s:
        return verify(s, log.blobs, [world.hub.cert]).problems


def _sql(db: Database, *statements: str) -> None:
    with db.engine.begin() as c:
        for statement in statements:
            c.exec_driver_sql(statement)


def _rewrite_leaf(db: Database, seq: int) -> None:
    """Entry ``seq`` rewritten with care: a new record, its leaf hash and its leaf node."""
    with db.engine.begin() as c:
        record = c.exec_driver_sql("SELECT record FROM log_entries WHERE seq = ?", (seq,)).scalar()
        changed = bytes(record).replace(b'"at":"', b'"at":"1', 1)
        leaf = merkle.leaf_hash(changed)
        c.exec_driver_sql(
            "UPDATE log_entries SET record = ?, leaf_hash = ? WHERE seq = ?", (changed, leaf, seq)
        )
        c.exec_driver_sql("UPDATE log_nodes SET hash = ? WHERE level = 0 AND idx = ?", (leaf, seq))


def _sql_unchecked(db: Database, *statements: str) -> None:
    """As the sqlite3 shell runs them: foreign keys not enforced (its default)."""
    c = sqlite3.connect(str(db.engine.url.database), isolation_level=None)
    try:
        c.execute("PRAGMA foreign_keys = OFF")
        for statement in statements:
            c.execute(statement)
    finally:
        c.close()


def test_an_untouched_archive_verifies(archive: tuple[Database, Log], world: DemoWorld) -> None:
    db, log = archive
    with db.session() as s:
        report = verify(s, log.blobs, [world.hub.cert])
        assert (report.ok, report.entries, report.checkpoints) == (True, N, 2)
        assert report.blobs == N + 1  # the shared blob is stored once
        assert report.root == log.root(s)


def test_proofs_verify_against_signed_checkpoints(
    archive: tuple[Database, Log], world: DemoWorld
) -> None:
    db, log = archive
    with db.session() as s:
        rows = s.query(t.Checkpoint).order_by(t.Checkpoint.id).all()
        first, last = (cp.verify(r.body, r.signature, [world.hub.cert]) for r in rows)
        for seq in (0, 7, N // 2 - 1, N - 1):
            entry = log.entry(s, seq)
            proof = log.inclusion(s, seq, last.size)
            assert merkle.verify_inclusion(entry.leaf_hash, seq, last.size, proof, last.root)
        proof = log.consistency(s, first.size, last.size)
        assert merkle.verify_consistency(first.size, last.size, first.root, last.root, proof)


def _edit(db: Database) -> None:
    _sql(
        db,
        "UPDATE log_entries SET record = CAST(replace(CAST(record AS TEXT), 'accepted', 'rejected') AS BLOB) WHERE seq = 7",
    )


def _edit_consistently(db: Database) -> None:
    """A smarter intruder also fixes the leaf hash and the search column."""
    with db.engine.begin() as c:
        record = c.exec_driver_sql("SELECT record FROM log_entries WHERE seq = 7").scalar()
        changed = record.replace(b'"accepted"', b'"rejected"')
        c.exec_driver_sql(
            "UPDATE log_entries SET record = ?, leaf_hash = ?, status = 'rejected' WHERE seq = 7",
            (changed, merkle.leaf_hash(changed)),
        )


def _swap(db: Database) -> None:
    _sql(
        db,
        "UPDATE log_entries SET seq = -1 WHERE seq = 3",
        "UPDATE log_entries SET seq = 3 WHERE seq = 4",
        "UPDATE log_entries SET seq = 4 WHERE seq = -1",
    )


def _blob_byte(db: Database) -> None:
    with db.engine.begin() as c:
        address, sealed = c.exec_driver_sql("SELECT sha256, sealed FROM blobs LIMIT 1").one()
        flipped = bytes(sealed[:20]) + bytes([sealed[20] ^ 1]) + bytes(sealed[21:])
        c.exec_driver_sql("UPDATE blobs SET sealed = ? WHERE sha256 = ?", (flipped, address))


def _forge(db: Database) -> None:
    with db.engine.begin() as c:
        body = c.exec_driver_sql("SELECT body FROM checkpoints WHERE id = 2").scalar()
        c.exec_driver_sql(
            "UPDATE checkpoints SET body = ? WHERE id = 2",
            (body.replace(b"size: 40", b"size: 39"),),
        )


def _move_time(db: Database) -> None:
    with db.engine.begin() as c:
        at = c.exec_driver_sql("SELECT at FROM log_entries WHERE seq = 5").scalar()
        c.exec_driver_sql(
            "UPDATE log_entries SET at = ? WHERE seq = 5", (at.replace("2026", "2031"),)
        )


def _data_key_byte(db: Database) -> None:
    with db.engine.begin() as c:
        wrapped = c.exec_driver_sql("SELECT wrapped FROM data_keys WHERE id = 1").scalar()
        flipped = bytes(wrapped[:-1]) + bytes([wrapped[-1] ^ 1])
        c.exec_driver_sql("UPDATE data_keys SET wrapped = ? WHERE id = 1", (flipped,))


TAMPERING: dict[str, tuple[Callable[[Database], None], list[str]]] = {
    "move an entry's time column (what search and list read)": (
        _move_time,
        ["entry 5: time column says 2031"],
    ),
    "delete a checkpoint": (
        lambda db: _sql(db, "DELETE FROM checkpoints WHERE id = 1"),
        ["checkpoint 1 missing (deleted rows)"],
    ),
    "change the wrapped data key": (_data_key_byte, ["data key 1 does not open"]),
    "edit a row": (_edit, ["entry 7: its record was changed", "entry 7: search column status"]),
    "edit a row and its hashes": (
        _edit_consistently,
        [
            "tree node (0, 7) differs: entry 7 was changed after being logged",
            "checkpoint #1",
            "checkpoint #2",
        ],
    ),
    "delete a row": (
        lambda db: _sql(db, "DELETE FROM log_entries WHERE seq = 12"),
        ["entry 12 is missing (deleted rows)", "checkpoint #2"],
    ),
    "swap two rows": (
        _swap,
        ["entry 3: holds the record of entry 4", "entry 4: holds the record of entry 3"],
    ),
    "change one blob byte": (_blob_byte, ["does not decrypt: it was altered"]),
    "delete a blob": (
        lambda db: _sql(db, "DELETE FROM blobs WHERE size = 25"),
        ["is referenced by the log but missing"],
    ),
    "truncate the log": (
        lambda db: _sql(
            db,
            "DELETE FROM log_entries WHERE seq >= 30",
            "DELETE FROM log_nodes",
            "UPDATE log_head SET size = 30",
        ),
        ["checkpoint #2 (size 40", "signed 40 entries but only 30 remain (the log was truncated)"],
    ),
    "forge a checkpoint": (
        _forge,
        ["checkpoint #2", "signature does not verify", "forged or altered"],
    ),
    # Said once, as what was done (each was one line per node, per blob, or a wrong name).
    "delete the newest entries, the head left": (
        lambda db: _sql(db, "DELETE FROM log_entries WHERE seq >= 35"),
        ["are stored: entries 35–", "are missing (deleted)"],
    ),
    "delete the data keys": (
        lambda db: _sql_unchecked(db, "DELETE FROM data_keys"),
        ["data key 1 is missing (deleted): its "],
    ),
    "rewrite two tree nodes, one above the other": (
        lambda db: _sql(
            db,
            "UPDATE log_nodes SET hash = zeroblob(32) WHERE level = 2 AND idx = 1",
            "UPDATE log_nodes SET hash = zeroblob(32) WHERE level = 3 AND idx = 0",
        ),
        [
            "tree node (2, 1) is not the hash of the two stored nodes below it: it was "
            "rewritten, or they were, with entries 4–7 under them",
            "tree node (3, 0) is not the hash of the two stored nodes below it",
        ],
    ),
    "rewrite an entry, its leaf hash and its leaf node": (
        lambda db: _rewrite_leaf(db, 5),
        [
            "tree node (1, 2) is not the hash of the two stored nodes below it: it was rewritten, "
            "or they were, with entries 4–5 under them"
        ],
    ),
    "rewrite a leaf node alone": (
        lambda db: _sql(db, "UPDATE log_nodes SET hash = zeroblob(32) WHERE level = 0 AND idx = 9"),
        [
            "tree node (0, 9) was rewritten: it is not entry 9's leaf hash, while the entry and the "
            "nodes above agree"
        ],
    ),
    "rewrite an entry with its leaf hash and delete its leaf node": (
        lambda db: (
            _rewrite_leaf(db, 5),
            _sql(db, "DELETE FROM log_nodes WHERE level = 0 AND idx = 5"),
        ),
        [
            "tree nodes (0, 5) are missing",
            "tree node (1, 2) is not the hash of the two stored nodes below it",
        ],
    ),
}

#: What the cases above must not say: every fragment once at most (None: no line at all).
SAID_ONCE: dict[str, dict[str, int]] = {
    "delete the newest entries, the head left": {"beyond": 0, "missing (deleted)": 1},
    "delete the data keys": {"data key 1 is missing": 1},
    "rewrite two tree nodes, one above the other": {"changed after being logged": 0},
    "rewrite an entry, its leaf hash and its leaf node": {"tree node": 1},
    "rewrite a leaf node alone": {"changed after being logged": 0, "tree node": 1},
    "rewrite an entry with its leaf hash and delete its leaf node": {"is not the hash": 1},
}


@pytest.mark.parametrize("case", TAMPERING)
def test_tampering_is_found_and_named(
    archive: tuple[Database, Log], world: DemoWorld, case: str
) -> None:
    db, log = archive
    change, expected = TAMPERING[case]
    change(db)
    problems = _verify(db, log, world)
    assert problems, "tampering went unnoticed"
    text = "\n".join(problems)
    for fragment in expected:
        assert fragment in text, f"{fragment!r} not in:\n{text}"
    for fragment, times in SAID_ONCE.get(case, {}).items():
        assert text.count(fragment) == times, f"{fragment!r} not {times} times in:\n{text}"


def test_checkpoint_signatures_verify_with_openssl(
    archive: tuple[Database, Log], world: DemoWorld, tmp_path: Path
) -> None:
    db, _ = archive
    with db.session() as s:
        row = s.get(t.Checkpoint, 2)
        assert row is not None
        (tmp_path / "body.txt").write_bytes(row.body)
        (tmp_path / "body.p7s").write_bytes(row.signature)
    (tmp_path / "root.pem").write_bytes(world.root.cert_pem())
    result = subprocess.run(
        ["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", tmp_path / "body.p7s",
         "-content", tmp_path / "body.txt", "-CAfile", tmp_path / "root.pem", "-purpose", "any",
         "-out", os.devnull],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Verification successful" in result.stderr


def test_admin_changes_are_chained_into_the_log(tmp_path: Path, world: DemoWorld) -> None:
    from keys import store

    db = Database.open(f"sqlite:///{tmp_path}/a.db")
    with db.session() as s:
        for agency in world.directory:
            store.add_agency(s, agency, at=WORLD_AT, actor="admin@test")
    log = Log(BlobStore(os.urandom(32)))
    with db.session() as s:
        events = store.events(s)
        entries = [log.entry(s, n) for n in range(log.size(s))]
        report = verify(s, log.blobs, [])
    assert report.ok, report.problems
    assert [e.kind for e in entries] == ["admin"] * len(events)
    assert [e.fields["event"] for e in entries] == [e.seq for e in events]
    assert entries[0].fields["actor"] == "admin@test"
    assert entries[0].fields["action"] == "agency.add"


def test_edited_admin_events_are_found(tmp_path: Path, world: DemoWorld) -> None:
    """The admin_events rows (what `agencies show` reads) must be their log entries."""
    from keys import store

    db = Database.open(f"sqlite:///{tmp_path}/a.db")
    with db.session() as s:
        for agency in world.directory:
            store.add_agency(s, agency, at=WORLD_AT, actor="admin@test")
    _sql(
        db,
        "UPDATE admin_events SET actor = 'someone@else' WHERE seq = 1",
        "DELETE FROM admin_events WHERE seq = 2",
        "INSERT INTO admin_events (seq, at, actor, action, subject, detail) SELECT 99, at, "
        "actor, 'agency.add', 'H26.FAKE', detail FROM admin_events WHERE seq = 3",
    )
    with db.session() as s:
        problems = verify(s, Log(BlobStore(os.urandom(32))).blobs, []).problems
    assert problems == [
        "admin event 1 differs from its log entry 0: it was edited",
        "admin event 99 (agency.add H26.FAKE) is not in the log",
        "admin event 2 of log entry 1 is missing (deleted)",
    ]


def test_with_an_anchor_a_hub_certificate_planted_in_the_database_signs_nothing(
    archive: tuple[Database, Log], world: DemoWorld
) -> None:
    """Someone who can write the database adds a certificate of their own as a hub certificate
    and re-signs checkpoint #2: checked against the stored certificates alone that passes;
    against the CA given from outside (``archive verify --ca``), it is found."""
    db, log = archive
    intruder = make_root("Not the hub", at=WORLD_AT - timedelta(days=1))
    key = intruder.key
    assert isinstance(key, rsa.RSAPrivateKey)
    with db.session() as s:
        row = s.get(t.Checkpoint, 2)
        assert row is not None
        row.signature = cp.sign(cp.Checkpoint.parse(row.body), intruder.cert, key)
    stored = [world.hub.cert, intruder.cert]
    with db.session() as s:
        assert verify(s, log.blobs, stored).ok  # what the database says is all it has
        problems = verify(s, log.blobs, stored, trust=_trust(world.root)).problems
    assert len(problems) == 1, problems
    assert problems[0].startswith("checkpoint #2") and "CN=Not the hub" in problems[0]
    assert "whose path does not validate at its signed time" in problems[0]


def test_with_an_anchor_a_hub_certificate_issued_through_a_sub_ca_is_trusted(
    tmp_path: Path, world: DemoWorld
) -> None:
    """A national root above a sub-CA that issued the hub's certificate: `archive verify --ca
    ROOT` follows the chain through the stored sub-CA (each signature checked). A stored CA
    certificate that the root did not sign, or a stored end-entity certificate in the middle,
    links nothing."""
    root = make_root("National root", at=WORLD_AT - timedelta(days=2))
    sub = make_intermediate(root, "Sub-CA", at=WORLD_AT - timedelta(days=2))
    hub = issue_hub(sub, email="hub@exchange.hanoi.gov.vn", at=WORLD_AT - timedelta(days=1))
    other_root = make_root("Someone else", at=WORLD_AT - timedelta(days=2))
    stray = make_intermediate(other_root, "Sub-CA", at=WORLD_AT - timedelta(days=2))
    db = Database.open(f"sqlite:///{tmp_path}/archive.db")
    log = Log(BlobStore(os.urandom(32)))
    key = hub.key
    assert isinstance(key, rsa.RSAPrivateKey)
    with db.session() as s:
        log.append(s, "message", WORLD_AT, {"status": "accepted"}, {"raw": b"x" * 100})
        c = cp.Checkpoint("hub@exchange.hanoi.gov.vn", 1, log.root(s, 1), WORLD_AT)
        signature = cp.sign(c, hub.cert, key)
        s.add(t.Checkpoint(size=1, root=c.root, at=c.at, body=c.body(), signature=signature))

    def problems(*intermediates: Issued) -> list[str]:
        with db.session(read_only=True) as s:
            report = verify(s, log.blobs, [hub.cert], trust=_trust(root, *intermediates))
        return report.problems

    assert problems(sub) == []
    assert problems(stray, sub) == []
    for links in [(), (stray,)]:
        found = problems(*links)
        assert len(found) == 1, found
        assert found[0].startswith("checkpoint #1") and "does not validate" in found[0]
    # An agency's certificate under the same sub-CA, planted as the hub's, re-signs the
    # checkpoint: it chains to the root, but it does not name the hub's address.
    police = issue_agency(
        sub, email="pa08@congan.hanoi.gov.vn", organ_id="H26.CATP", common_name="Police",
        at=WORLD_AT - timedelta(days=1),
    )  # fmt: skip
    resign(db, police)
    with db.session(read_only=True) as s:
        stored = [hub.cert, police.cert]
        assert verify(s, log.blobs, stored, trust=_trust(root, sub)).ok
        found = verify(
            s, log.blobs, stored, trust=_trust(root, sub),
            hub_addresses=["hub@EXCHANGE.hanoi.gov.vn"],  # the domain in any case
        ).problems  # fmt: skip
    assert len(found) == 2, found
    assert "does not name the hub's address (hub@EXCHANGE.hanoi.gov.vn)" in found[0]
    assert "CN=Police" in found[0]
    assert found[1].startswith("checkpoint #1")

    def forged_through(*links: Issued) -> list[str]:
        """The checkpoint re-signed by a hub certificate issued below ``links`` (the last
        one signs it), each stored as an issuer."""
        forged = issue_hub(links[-1], email="hub@exchange.hanoi.gov.vn", at=WORLD_AT - DAY)
        resign(db, forged)
        with db.session(read_only=True) as s:
            return verify(s, log.blobs, [forged.cert], trust=_trust(root, *links)).problems

    # An end entity in the middle is no link, even one that signed the hub's certificate.
    leaf = issue_hub(root, email="x@exchange.hanoi.gov.vn", at=WORLD_AT - 2 * DAY)
    assert forged_through(sub) == []  # the same shape, with a real sub-CA, validates
    found = forged_through(leaf)
    assert len(found) == 1 and "does not validate" in found[0], found
    # Nor is a CA certificate whose keyUsage does not allow signing certificates.
    found = forged_through(_ca_without_cert_sign(root, "Signs CRLs only"))
    assert len(found) == 1 and "does not validate" in found[0], found
    # Nor a sub-CA below one whose pathLenConstraint is 0 (it may issue end entities only).
    under = make_intermediate(sub, "Sub-sub-CA", at=WORLD_AT - 2 * DAY, path_length=None)
    found = forged_through(sub, under)
    assert len(found) == 1 and "does not validate" in found[0], found
    db.dispose()


def test_with_an_anchor_a_checkpoint_signed_outside_its_signers_validity_is_found(
    tmp_path: Path,
) -> None:
    """The hub certificate (or its sub-CA) had expired, or was not yet valid, at the time a
    checkpoint says it was signed: `archive verify --ca` does not trust that checkpoint. The
    same certificate signing within its validity is fine."""
    root = make_root("National root", at=WORLD_AT - 400 * DAY)
    sub = make_intermediate(root, "Sub-CA", at=WORLD_AT - 400 * DAY, days=200)
    old_hub = issue_hub(root, email="hub@exchange.hanoi.gov.vn", at=WORLD_AT - 400 * DAY, days=30)
    under_sub = issue_hub(sub, email="hub@exchange.hanoi.gov.vn", at=WORLD_AT - 300 * DAY)
    db = Database.open(f"sqlite:///{tmp_path}/archive.db")
    log = Log(BlobStore(os.urandom(32)))
    with db.session() as s:
        log.append(s, "message", WORLD_AT, {"status": "accepted"}, {"raw": b"x" * 100})
        c = cp.Checkpoint("hub@exchange.hanoi.gov.vn", 1, log.root(s, 1), WORLD_AT)
        s.add(t.Checkpoint(size=1, root=c.root, at=c.at, body=c.body(), signature=b""))

    def problems(signer: Issued, at: datetime) -> list[str]:
        resign(db, signer, at=at)
        with db.session(read_only=True) as s:
            return verify(s, log.blobs, [signer.cert], trust=_trust(root, sub)).problems

    assert problems(old_hub, WORLD_AT - 390 * DAY) == []
    found = problems(old_hub, WORLD_AT)  # 30 days of validity, long gone
    assert len(found) == 1 and "does not validate at its signed time" in found[0], found
    assert problems(under_sub, WORLD_AT - 250 * DAY) == []
    found = problems(under_sub, WORLD_AT)  # the hub is valid, its sub-CA expired
    assert len(found) == 1 and "does not validate at its signed time" in found[0], found
    found = problems(under_sub, WORLD_AT - 350 * DAY)  # before the hub's was issued
    assert len(found) == 1 and "does not validate at its signed time" in found[0], found
    db.dispose()


def test_with_an_anchor_a_checkpoint_signed_after_its_signer_was_revoked_is_found(
    tmp_path: Path,
) -> None:
    """The database holds a CRL, fresh at the checkpoint's time, that lists the hub's
    certificate as revoked the day before (a stolen hub key): `verify --ca` (through
    :func:`archive.service.outside_trust`) does not trust the checkpoint. Signed before the
    revocation, it stands (no evidence fresh then: soft-fail). A damaged evidence row is no
    evidence, not a crash."""
    root = make_root("National root", at=WORLD_AT - 30 * DAY)
    hub = issue_hub(root, email="hub@exchange.hanoi.gov.vn", at=WORLD_AT - 20 * DAY)
    crl = make_crl(
        root,
        revoked=[(hub.cert.serial_number, WORLD_AT - DAY)],
        this_update=WORLD_AT - DAY / 2,
        next_update=WORLD_AT + 7 * DAY,
        number=1,
    )
    db = Database.open(f"sqlite:///{tmp_path}/archive.db")
    log = Log(BlobStore(os.urandom(32)))
    with db.session() as s:
        log.append(s, "message", WORLD_AT, {"status": "accepted"}, {"raw": b"x" * 100})
        c = cp.Checkpoint("hub@exchange.hanoi.gov.vn", 1, log.root(s, 1), WORLD_AT)
        s.add(t.Checkpoint(size=1, root=c.root, at=c.at, body=c.body(), signature=b""))
        for der in (crl.public_bytes(Encoding.DER), b"\x30\x03not a CRL"):
            s.add(
                t.RevocationEvidence(
                    kind="crl", sha256=hashlib.sha256(der).hexdigest(),
                    issuer=f"{root.cert.subject.rfc4514_string()}{len(der)}",
                    this_update=WORLD_AT - DAY / 2, next_update=None, number="1", der=der,
                    source="test", fetched_at=WORLD_AT,
                )
            )  # fmt: skip

    def problems(at: datetime) -> list[str]:
        resign(db, hub, at=at)
        with db.session(read_only=True) as s:
            trust = outside_trust(s, [root.cert])
            return verify(s, log.blobs, [hub.cert], trust=trust).problems

    found = problems(WORLD_AT)
    assert len(found) == 1 and "does not validate at its signed time" in found[0], found
    assert "revoked" in found[0]
    assert problems(WORLD_AT - 2 * DAY) == []
    db.dispose()


def resign(db: Database, signer: Issued, *, at: datetime | None = None) -> None:
    """Checkpoint #1 signed again by ``signer`` (its time changed to ``at``, if given), as
    someone who can write the database and holds that key would."""
    key = signer.key
    assert isinstance(key, rsa.RSAPrivateKey)
    with db.session() as s:
        row = s.get(t.Checkpoint, 1)
        assert row is not None
        c = cp.Checkpoint.parse(row.body)
        if at is not None:
            c = cp.Checkpoint(c.origin, c.size, c.root, at)
            row.body, row.at = c.body(), at
        row.signature = cp.sign(c, signer.cert, key)


DAY = timedelta(days=1)


def _trust(anchor: Issued, *intermediates: Issued) -> TrustStore:
    """What `archive verify --ca` builds: the anchor from outside, stored CAs as candidates."""
    return TrustStore(
        (anchor.cert,), tuple(i.cert for i in intermediates), revocation_mode="soft-fail"
    )


def _ca_without_cert_sign(parent: Issued, name: str) -> Issued:
    """A sub-CA of ``parent`` (cA true) whose keyUsage allows CRL signing only."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    at = WORLD_AT - timedelta(days=2)
    usage = dict.fromkeys(
        ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
         "key_agreement", "key_cert_sign", "encipher_only", "decipher_only"), False,
    )  # fmt: skip
    parent_key = parent.key
    assert isinstance(parent_key, rsa.RSAPrivateKey)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(parent.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(at)
        .not_valid_after(at + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(crl_sign=True, **usage), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(parent_key, hashes.SHA256())
    )
    return Issued(cert, key)


def test_a_stolen_database_file_reveals_no_payload(tmp_path: Path) -> None:
    marker = "Nguyễn Thị Bí Mật".encode() * 50  # would survive compression as a long run
    db = Database.open(f"sqlite:///{tmp_path}/a.db")
    key = os.urandom(32)
    log = Log(BlobStore(key))
    with db.session() as s:
        entry = log.append(s, "message", WORLD_AT, {"status": "accepted"}, {"payload": marker})
    db.dispose()
    files = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("a.db"))
    assert "Nguyễn Thị Bí Mật".encode() not in files
    assert key not in files
    with Database.open(f"sqlite:///{tmp_path}/a.db").session() as s:
        assert log.blobs.get(s, entry.blobs["payload"]) == marker
        with pytest.raises(Exception, match="does not open the archive's data keys"):
            BlobStore(os.urandom(32)).get(s, entry.blobs["payload"])


def test_a_long_read_does_not_block_writers(tmp_path: Path) -> None:
    db = Database.open(f"sqlite:///{tmp_path}/a.db")
    log = Log(BlobStore(os.urandom(32)))
    finished: list[int] = []
    failed: list[BaseException] = []
    with db.session(read_only=True) as reader:
        assert log.size(reader) == 0

        def write() -> None:
            try:
                with db.session() as s:
                    finished.append(log.append(s, "admin", WORLD_AT, {"n": 1}).seq)
            except BaseException as exc:  # a blocked writer gives up (busy_timeout) with 451
                failed.append(exc)

        writer = threading.Thread(target=write)
        writer.start()
        writer.join()  # while the reader's transaction is still open
        assert failed == []
        assert finished == [0]


def test_a_data_key_lost_to_a_rollback_is_replaced(tmp_path: Path) -> None:
    db = Database.open(f"sqlite:///{tmp_path}/a.db")
    log = Log(BlobStore(os.urandom(32)))
    with pytest.raises(RuntimeError, match="fails after"):
        _append_then_fail(db, log)
    with db.session() as s:
        entry = log.append(s, "message", WORLD_AT, {}, {"raw": b"second"})
    with db.session() as s:
        assert log.blobs.get(s, entry.blobs["raw"]) == b"second"
    # and after a restart: sealed with the key the database holds, not one cached in memory
    # under a number SQLite gave again
    with db.session() as s:
        assert BlobStore(log.blobs.master_key).get(s, entry.blobs["raw"]) == b"second"


def _append_then_fail(db: Database, log: Log, raw: bytes = b"first") -> None:
    with db.session() as s:
        log.append(s, "message", WORLD_AT, {}, {"raw": raw})
        raise RuntimeError("the transaction fails after the data key was made")


def test_blobs_prepared_ahead_are_stored_without_hashing_or_compressing_in_the_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker and builder hash and compress before their write transaction (the write lock is
    not held while SHA-256 and zlib work); what is stored is the same, and a blob stored
    already is not kept."""
    db = Database.open(f"sqlite:///{tmp_path}/a.db")
    log = Log(BlobStore(os.urandom(32)))
    with db.session() as s:
        old = log.append(s, "message", WORLD_AT, {}, {"raw": b"stored before"})
    texts = [b"<x>" + b"prepared " * 400 + b"</x>", b"stored before"]
    log.blobs.prepare((text, False) for text in texts)

    def refuse(data: bytes, dense: bool = False) -> bytes:
        raise AssertionError("hashed or compressed inside the transaction")

    with monkeypatch.context() as m:
        m.setattr("archive.blobs.compress", refuse)
        m.setattr("archive.blobs.hashlib", SimpleNamespace(sha256=refuse))
        with db.session() as s:
            entry = log.append(s, "message", WORLD_AT, {}, {"a": texts[0], "b": texts[1]})
        assert log.blobs._ready == {}
        # The same content in another object was not prepared: it is hashed (and refused here).
        with pytest.raises(AssertionError, match="inside the transaction"), db.session() as s:
            log.append(s, "message", WORLD_AT, {}, {"c": bytes(bytearray(texts[0]))})
    with db.session(read_only=True) as s:
        assert log.blobs.get(s, entry.blobs["a"]) == texts[0]
        assert entry.blobs["a"] == hashlib.sha256(texts[0]).hexdigest()
        assert entry.blobs["b"] == old.blobs["raw"]
    with db.session() as s:
        again = log.append(s, "message", WORLD_AT, {}, {"c": bytes(bytearray(texts[0]))})
    assert again.blobs["c"] == entry.blobs["a"]  # stored once, under the same address


def test_one_object_given_twice_in_a_batch_is_compressed_ahead_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two messages of one signer carry the very same certificate-path object (it is kept):
    prepared once, it is not compressed again inside the transaction for the second."""
    db = Database.open(f"sqlite:///{tmp_path}/a.db")
    log = Log(BlobStore(os.urandom(32)))
    chain = b"-----BEGIN CERTIFICATE-----\n" * 50
    log.blobs.prepare([(chain, False), (chain, False)])

    def refuse(data: bytes, dense: bool = False) -> bytes:
        raise AssertionError("compressed inside the transaction")

    monkeypatch.setattr("archive.blobs.compress", refuse)
    with db.session() as s:
        first = log.append(s, "message", WORLD_AT, {}, {"chain": chain, "again": chain})
    with db.session(read_only=True) as s:
        assert log.blobs.get(s, first.blobs["again"]) == chain


def test_a_blob_stored_lately_is_not_compressed_again_and_one_rolled_back_still_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signer's certificate path comes with every message: once stored, preparing it again
    only hashes it. The store's memory is a hint: a blob it remembers from a transaction that
    was rolled back is compressed in the next one, and stored whole."""
    db = Database.open(f"sqlite:///{tmp_path}/a.db")
    log = Log(BlobStore(os.urandom(32)))
    chain, lost = b"-----BEGIN CERTIFICATE-----\n" * 50, b"<x>rolled back</x>" * 50
    with db.session() as s:
        log.append(s, "message", WORLD_AT, {}, {"chain": chain})
    with pytest.raises(RuntimeError, match="fails after"):
        _append_then_fail(db, log, lost)
    compressed: list[bytes] = []
    real = blobs.compress
    monkeypatch.setattr(
        "archive.blobs.compress", lambda d, dense=False: compressed.append(d) or real(d)
    )
    again = [bytes(bytearray(chain)), bytes(bytearray(lost))]
    log.blobs.prepare((data, False) for data in again)
    assert compressed == []  # both remembered as stored
    with db.session() as s:
        entry = log.append(s, "message", WORLD_AT, {}, {"chain": again[0], "raw": again[1]})
    assert compressed == [lost]  # not in the database after all: compressed in the transaction
    with db.session(read_only=True) as s:
        assert log.blobs.get(s, entry.blobs["raw"]) == lost
        assert log.blobs.get(s, entry.blobs["chain"]) == chain


@pytest.mark.parametrize(
    "data",
    [
        b"<Record><FullName>Nguyen</FullName></Record>\n" * 2000,  # text: LZ77
        base64.encodebytes(os.urandom(40_000)),  # base64 of ciphertext: Huffman only
        b"x",
    ],
    ids=["text", "base64", "tiny"],
)
def test_blobs_are_plain_zlib_streams_whichever_library_wrote_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: bytes
) -> None:
    """Blobs are compressed with zlib-ng: stdlib zlib reads what it writes (also what it wrote
    by Huffman coding only, for a blob its writer says is dense), and blobs that an archive
    wrote with stdlib zlib (before zlib-ng) still open and verify."""
    assert zlib.decompress(blobs.compress(data)) == data
    assert zlib.decompress(blobs.compress(data, dense=True)) == data
    db = Database.open(f"sqlite:///{tmp_path}/a.db")
    key = os.urandom(32)
    monkeypatch.setattr("archive.blobs.compress", lambda d: zlib.compress(d, 6))
    with db.session() as s:
        address = BlobStore(key).put(s, data, at=WORLD_AT)
    monkeypatch.undo()
    with db.session(read_only=True) as s:
        assert BlobStore(key).get(s, address) == data
    db.dispose()


def test_verify_tells_its_progress_within_a_tree_level(
    archive: tuple[Database, Log], world: DemoWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Progress came once a level: at 400,000 entries, level 0 took seconds without a word."""
    db, log = archive
    monkeypatch.setattr(verify_module, "PROGRESS_EVERY", 8)
    told: list[tuple[str, int, int]] = []
    with db.session(read_only=True) as s:
        verify(s, log.blobs, [world.hub.cert], progress=lambda *a: told.append(a))
    level0 = [done for stage, done, _total in told if stage.startswith("tree level 0 ")]
    assert level0[:3] == [0, 0, 8] and len(level0) > 3
