"""The key store: enrolment with overlap, hub key rotation, checked imports, expiry.

Real SQLite databases in tmp_path; messages go through the real pipeline.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    pkcs12,
)
from cryptography.x509.oid import ExtendedKeyUsageOID

from archive.db import Database
from archive.tables import Base
from formats import cms_encrypt, cms_envelope
from formats.cms_envelope import RecipientKey
from formats.errors import InputError, NotForUs, SenderMismatch
from gateway.cli import cli
from gateway.demo import HUB_ADDRESS, DemoWorld
from gateway.pipeline import Context, process
from keys import evidence, store
from keys.issuing import Issued, issue_agency, issue_hub, make_crl, make_root
from keys.recipients import Recipients
from tests.conftest import WORLD_AT

PASS = "test-only passphrase"
ACTOR = "test"


@pytest.fixture
def db(tmp_path: Path, world: DemoWorld) -> Database:
    database = Database.open(f"sqlite:///{tmp_path}/archive.db")
    with database.session() as s:
        for agency in world.directory:
            store.add_agency(s, agency, at=WORLD_AT, actor=ACTOR)
        store.add_certificate(s, world.root.cert, role="anchor", at=WORLD_AT, actor=ACTOR)
    return database


def _context(db: Database, world: DemoWorld, keys: tuple[RecipientKey, ...] = ()) -> Context:
    base = world.context()
    with db.session() as s:
        return Context(
            keys=keys or base.keys,
            trust=base.trust,
            directory=store.directory(s),
            enrolled=store.enrolled(s),
        )


# --- the storage module --------------------------------------------------------------------------


def test_sqlite_is_durable_and_migrations_match_the_models(db: Database) -> None:
    with db.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert compare_metadata(MigrationContext.configure(c), Base.metadata) == []
    again = Database.open(str(db.engine.url))  # upgrading an up-to-date schema is a no-op
    assert "admin_events" in again.tables()


def test_a_failed_change_leaves_nothing_behind(db: Database, world: DemoWorld) -> None:
    with db.session() as s:
        before = len(store.events(s))
    with pytest.raises(InputError, match="already stored"):
        _add_twice(db, world)
    with db.session() as s:
        assert len(store.events(s)) == before
        assert store.certificates(s, role="hub") == []


def _add_twice(db: Database, world: DemoWorld) -> None:
    with db.session() as s:
        store.add_certificate(s, world.hub.cert, role="hub", at=WORLD_AT, actor=ACTOR)
        store.add_certificate(s, world.hub.cert, role="hub", at=WORLD_AT, actor=ACTOR)


# --- rollover ------------------------------------------------------------------------------------


def test_rollover_old_and_new_overlap_then_only_new(db: Database, world: DemoWorld) -> None:
    old = world.agencies["H26.SNV"]
    new = issue_agency(
        world.root,
        email="vanthu@snv.hanoi.gov.vn",
        organ_id="H26.SNV",
        common_name="Hanoi Department of Home Affairs (2027 key)",
        at=WORLD_AT - timedelta(days=1),
    )
    cutover = WORLD_AT + timedelta(days=1)
    with db.session() as s:
        store.add_certificate(
            s,
            old.cert,
            role="agency",
            organ_id="H26.SNV",
            use_until=cutover,
            at=WORLD_AT,
            actor=ACTOR,
        )
        store.add_certificate(
            s, new.cert, role="agency", organ_id="H26.SNV", at=WORLD_AT, actor=ACTOR
        )
    ctx = _context(db, world)
    with_old = world.submission("H26.SNV", signer=old)
    with_new = world.submission("H26.SNV", signer=new)

    during = cutover - timedelta(hours=2)
    assert process(with_old, ctx, at=during).accepted
    assert process(with_new, ctx, at=during).accepted

    after = cutover + timedelta(hours=2)
    refused = process(with_old, ctx, at=after)
    assert not refused.accepted
    assert [type(e) for e in refused.errors] == [SenderMismatch]
    assert "enrolled for H26.SNV only for" in refused.errors[0].message
    assert process(with_new, ctx, at=after).accepted


def test_a_certificate_not_enrolled_is_refused_once_an_agency_has_enrolled_ones(
    db: Database, world: DemoWorld
) -> None:
    stray = issue_agency(
        world.root,
        email="vanthu@snv.hanoi.gov.vn",
        organ_id="H26.SNV",
        common_name="unenrolled",
        at=WORLD_AT - timedelta(days=1),
    )
    message = world.submission("H26.SNV", signer=stray)
    assert process(message, _context(db, world), at=WORLD_AT).accepted  # nothing enrolled yet
    with db.session() as s:
        store.add_certificate(
            s,
            world.agencies["H26.SNV"].cert,
            role="agency",
            organ_id="H26.SNV",
            at=WORLD_AT,
            actor=ACTOR,
        )
    verdict = process(message, _context(db, world), at=WORLD_AT)
    assert [type(e) for e in verdict.errors] == [SenderMismatch]
    assert "not one of the certificates enrolled" in verdict.errors[0].message


# --- hub key rotation ----------------------------------------------------------------------------


def test_old_hub_key_decrypts_until_retired(db: Database, world: DemoWorld) -> None:
    successor = issue_hub(world.root, email=HUB_ADDRESS, at=WORLD_AT - timedelta(days=1))
    with db.session() as s:
        for issued in (world.hub, successor):
            store.add_private_key(
                s,
                issued.cert,
                issued.key,
                role="hub",
                passphrase=PASS.encode(),
                at=WORLD_AT,
                actor=ACTOR,
            )
    to_old = _to_hub(world, world.hub)
    to_new = _to_hub(world, successor)

    with db.session() as s:
        keys = store.hub_recipient_keys(s, PASS.encode())
    assert len(keys) == 2
    ctx = _context(db, world, keys)
    assert process(to_old, ctx, at=WORLD_AT).accepted
    assert process(to_new, ctx, at=WORLD_AT).accepted

    with db.session() as s:
        store.retire_certificate(s, store.fingerprint(world.hub.cert), at=WORLD_AT, actor=ACTOR)
        keys = store.hub_recipient_keys(s, PASS.encode())
    ctx = _context(db, world, keys)
    assert [type(e) for e in process(to_old, ctx, at=WORLD_AT).errors] == [NotForUs]
    assert process(to_new, ctx, at=WORLD_AT).accepted


def _to_hub(world: DemoWorld, hub: Issued) -> bytes:
    return world.submission("H26.SNV", to=[hub.cert])


def test_a_stored_key_needs_the_right_passphrase(db: Database, world: DemoWorld) -> None:
    with db.session() as s:
        store.add_private_key(
            s,
            world.hub.cert,
            world.hub.key,
            role="hub",
            passphrase=PASS.encode(),
            at=WORLD_AT,
            actor=ACTOR,
        )
    with db.session() as s:
        row = s.scalars(store.select(store.t.PrivateKey)).one()
        assert b"ENCRYPTED PRIVATE KEY" in row.encrypted_pem  # encrypted at rest
        with pytest.raises(Exception, match="wrong or missing passphrase"):
            store.hub_recipient_keys(s, b"not it")


# --- the CLI: checked imports --------------------------------------------------------------------


def _run(home: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(
        cli, ["--home", str(home), *args], env={"GATEWAY_KEY_PASSPHRASE": PASS, **(env or {})}
    )
    return result.exit_code, result.output


def _event_count(home: Path) -> int:
    with Database.open(f"sqlite:///{home}/archive.db").session() as s:
        return len(store.events(s))


@pytest.fixture
def home(tmp_path: Path, world: DemoWorld) -> Path:
    database = Database.open(f"sqlite:///{tmp_path}/archive.db")
    with database.session() as s:
        for agency in world.directory:
            store.add_agency(s, agency, at=WORLD_AT, actor=ACTOR)
    (tmp_path / "root.pem").write_bytes(world.root.cert_pem())
    return tmp_path


def _p12(path: Path, issued: Issued, passphrase: bytes) -> Path:
    path.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"agency", issued.key, issued.cert, None, BestAvailableEncryption(passphrase)
        )
    )
    return path


def test_import_list_window_and_expiring(home: Path, world: DemoWorld) -> None:
    assert _run(home, "keys", "anchors", "import", str(home / "root.pem"))[0] == 0
    p12 = _p12(home / "snv.p12", world.agencies["H26.SNV"], b"p12-secret")
    code, out = _run(
        home, "keys", "import", str(p12), "--agency", "H26.SNV", "--json",
        env={"GATEWAY_P12_PASSPHRASE": "p12-secret"},
    )  # fmt: skip
    assert code == 0, out
    [row] = json.loads(out)
    assert (row["role"], row["organ_id"], row["emails"]) == (
        "agency",
        "H26.SNV",
        ["vanthu@snv.hanoi.gov.vn"],
    )

    code, out = _run(home, "keys", "window", row["serial"], "--until", "2026-12-01", "--json")
    assert code == 0, out
    assert json.loads(out)[0]["use_until"] == "2026-11-30T17:00:00+00:00"  # midnight in Hanoi

    code, out = _run(home, "keys", "expiring", "--within", "60d", "--json")
    assert code == 0, out
    assert [e["sha256"] for e in json.loads(out)] == [row["sha256"]]
    assert _run(home, "keys", "expiring", "--within", "1d")[1].strip() == "nothing ends within 1d"

    code, out = _run(home, "keys", "list", "--agency", "H26.SNV", "--json")
    assert [c["sha256"] for c in json.loads(out)] == [row["sha256"]]


def _bad(world: DemoWorld, **kw: object) -> Issued:
    return issue_agency(
        world.root,
        email=kw.pop("email", "vanthu@snv.hanoi.gov.vn"),  # type: ignore[arg-type]
        organ_id="H26.SNV",
        common_name="bad",
        at=datetime.now(WORLD_AT.tzinfo),
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no-san", "has no e-mail address (rfc822Name) in subjectAltName"),
        ("server-auth", "its extended key usage is serverAuth; it needs emailProtection"),
        ("rsa-1024", "RSA-1024; at least RSA-2048 is required"),
        ("expired", "it expired on"),
        ("other-mailbox", "is not one of agency H26.SNV's addresses"),
        ("wrong-passphrase", "wrong passphrase, or not a PKCS#12 file"),
        ("corrupted", "wrong passphrase, or not a PKCS#12 file"),
        ("twice", "is already stored as agency for H26.SNV"),
        ("no-agency", "no agency 'H26.NOPE'"),
    ],
)
def test_bad_imports_say_what_is_wrong_and_change_nothing(
    home: Path, world: DemoWorld, case: str, message: str
) -> None:
    now = datetime.now(WORLD_AT.tzinfo)
    agency = "H26.SNV"
    env = {"GATEWAY_P12_PASSPHRASE": "right"}
    if case == "no-san":
        issued = _bad(world, with_email_san=False)
    elif case == "server-auth":
        issued = _bad(world, eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
    elif case == "rsa-1024":
        issued = _bad(world, key_kind="rsa1024")
    elif case == "expired":
        issued = _bad(
            world, not_before=now - timedelta(days=400), not_after=now - timedelta(days=1)
        )
    elif case == "other-mailbox":
        issued = _bad(world, email="someone@else.vn")
    else:
        issued = world.agencies["H26.SNV"]
    path = _p12(home / "x.p12", issued, b"right")
    if case == "wrong-passphrase":
        env = {"GATEWAY_P12_PASSPHRASE": "wrong"}
    elif case == "corrupted":
        path.write_bytes(path.read_bytes()[:200])
    elif case == "twice":
        assert _run(home, "keys", "import", str(path), "--agency", agency, env=env)[0] == 0
    elif case == "no-agency":
        agency = "H26.NOPE"
    before = _event_count(home)
    code, out = _run(home, "keys", "import", str(path), "--agency", agency, env=env)
    assert code == 2
    assert message in out
    assert len(out.strip().splitlines()) == 1  # one line, no traceback
    assert _event_count(home) == before


def test_anchors_must_be_cas_and_hub_keys_rotate(home: Path, world: DemoWorld) -> None:
    (home / "leaf.pem").write_bytes(world.agencies["H26.SNV"].cert_pem())
    code, out = _run(home, "keys", "anchors", "import", str(home / "leaf.pem"))
    assert code == 2 and "is not a CA certificate" in out

    code, out = _run(home, "keys", "hub", "new")
    assert code == 2 and "no built-in CA" in out

    hub_p12 = _p12(home / "hub.p12", world.hub, b"hub")
    env = {"GATEWAY_P12_PASSPHRASE": "hub"}
    code, out = _run(home, "keys", "hub", "import", str(hub_p12), env=env)
    assert code == 2 and "not the hub's address hub@gateway.localhost" in out  # [hub] address
    assert "the hub has no trust anchor to validate its path to" in out
    (home / "gateway.toml").write_text(f'[hub]\naddress = "{HUB_ADDRESS}"\n', encoding="utf-8")
    (home / "other.pem").write_bytes(make_root("Other", at=WORLD_AT).cert_pem())
    assert _run(home, "keys", "anchors", "import", str(home / "other.pem"))[0] == 0
    code, out = _run(home, "keys", "hub", "import", str(hub_p12), env=env)
    assert code == 2 and "does not validate to a trust anchor of the hub" in out
    assert _run(home, "keys", "anchors", "import", str(home / "root.pem"))[0] == 0
    assert _run(home, "keys", "hub", "import", str(hub_p12), env=env)[0] == 0
    code, out = _run(home, "keys", "hub", "retire", store.fingerprint(world.hub.cert))
    assert code == 2 and "last key" in out
    key = world.hub.key
    assert isinstance(key, rsa.RSAPrivateKey)


# --- CRLs from distribution points ---------------------------------------------------------------


class _CrlServer:
    """A real HTTP server on loopback serving whatever bytes are put at a path."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        files = self.files

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: object) -> None:
                return None

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_crls_are_fetched_from_distribution_points_and_checked(
    home: Path, world: DemoWorld
) -> None:
    server = _CrlServer()
    try:
        now = datetime.now(WORLD_AT.tzinfo)
        good = issue_agency(
            world.root, email="vanthu@snv.hanoi.gov.vn", organ_id="H26.SNV", common_name="dp",
            at=now - timedelta(days=1), crl_url=server.url("/root.crl"),
        )  # fmt: skip
        forged_dp = issue_agency(
            world.root, email="vanthu@stp.hanoi.gov.vn", organ_id="H26.STP", common_name="dp2",
            at=now - timedelta(days=1), crl_url=server.url("/forged.crl"),
        )  # fmt: skip
        missing_dp = issue_agency(
            world.root, email="pa08@congan.hanoi.gov.vn", organ_id="H26.CATP", common_name="dp3",
            at=now - timedelta(days=1), crl_url=server.url("/missing.crl"),
        )  # fmt: skip
        server.files["/root.crl"] = make_crl(
            world.root,
            revoked=[(7, now)],
            this_update=now,
            next_update=now + timedelta(days=7),
            number=5,
        ).public_bytes(Encoding.DER)
        impostor = make_root("Impostor CA", at=now - timedelta(days=1))
        server.files["/forged.crl"] = make_crl(
            Issued(world.root.cert, impostor.key), revoked=[], this_update=now,
            next_update=now + timedelta(days=7), number=6,
        ).public_bytes(Encoding.DER)  # fmt: skip
        assert _run(home, "keys", "anchors", "import", str(home / "root.pem"))[0] == 0
        for organ, issued in (("H26.SNV", good), ("H26.STP", forged_dp), ("H26.CATP", missing_dp)):
            (home / f"{organ}.pem").write_bytes(issued.cert_pem())
            assert (
                _run(home, "keys", "import", str(home / f"{organ}.pem"), "--agency", organ)[0] == 0
            )

        code, out = _run(home, "keys", "crls", "fetch", "--json")
        assert code == 1  # one distribution point failed
        by_url = {o["url"]: o for o in json.loads(out)}
        assert by_url[server.url("/root.crl")]["status"] == "stored"
        assert "not signed by any CA certificate" in by_url[server.url("/forged.crl")]["detail"]
        assert "HTTP 404" in by_url[server.url("/missing.crl")]["detail"]

        code, out = _run(home, "keys", "crls", "list", "--json")
        [crl] = json.loads(out)
        assert (crl["number"], crl["fresh"], crl["source"]) == ("5", True, server.url("/root.crl"))
        # Still fresh: not downloaded again unless forced.
        code, out = _run(home, "keys", "crls", "fetch", "--json")
        assert by_status(out)[server.url("/root.crl")] == "fresh"
        code, out = _run(home, "keys", "crls", "fetch", "--force", "--json")
        assert by_status(out)[server.url("/root.crl")] == "unchanged"
    finally:
        server.close()


def by_status(out: str) -> dict[str, str]:
    return {o["url"]: o["status"] for o in json.loads(out)}


def test_supervisor_loops_are_refused(db: Database) -> None:
    with db.session() as s:
        ubnd = store.get_agency(s, "H26.UBND")
    with pytest.raises(InputError, match="supervisors form a loop"), db.session() as s:
        store.update_agency(
            s, dataclasses.replace(ubnd, supervisor="H26.SNV"), at=WORLD_AT, actor=ACTOR
        )


def test_the_stored_directory_wins_over_the_legacy_file(db: Database) -> None:
    from gateway.loading import _merged
    from keys.directory import Agency

    with db.session() as s:
        stored = store.agencies(s)
    old = Agency("H26.SNV", "cũ", "old", frozenset({"old@snv.hanoi.gov.vn"}))
    extra = Agency("H26.X", "khác", "other", frozenset({"x@x.vn"}))
    merged = _merged(stored, [old, extra])
    snv = merged.get("H26.SNV")
    assert snv is not None and snv.emails == {"vanthu@snv.hanoi.gov.vn"}
    assert merged.get("H26.X") == extra


def test_during_an_overlap_the_hub_encrypts_to_both_certificates(
    db: Database, world: DemoWorld
) -> None:
    old = world.agencies["H26.SNV"]
    new = issue_agency(
        world.root, email="vanthu@snv.hanoi.gov.vn", organ_id="H26.SNV", common_name="new",
        at=WORLD_AT,
    )  # fmt: skip
    cutover = WORLD_AT + timedelta(days=10)
    with db.session() as s:
        store.add_certificate(
            s,
            old.cert,
            role="agency",
            organ_id="H26.SNV",
            use_until=cutover,
            at=WORLD_AT,
            actor=ACTOR,
        )
        store.add_certificate(
            s, new.cert, role="agency", organ_id="H26.SNV", at=WORLD_AT, actor=ACTOR
        )
        during = store.encryption_certificates(
            s, "H26.SNV", cutover - timedelta(days=1), trust=None
        ).usable
        after = store.encryption_certificates(
            s, "H26.SNV", cutover + timedelta(days=1), trust=None
        ).usable
    assert {c.serial_number for c in during} == {old.cert.serial_number, new.cert.serial_number}
    assert [c.serial_number for c in after] == [new.cert.serial_number]
    # Either agency key opens what the hub encrypts during the overlap.
    sealed = cms_encrypt.encrypt(b"receipt", during)
    for issued in (old, new):
        key = issued.key
        assert isinstance(key, rsa.RSAPrivateKey)
        opened = cms_envelope.decrypt(
            bytearray(sealed), [RecipientKey(issued.cert, key)], max_bytes=1 << 20
        )
        assert bytes(opened.content) == b"receipt"


def test_the_hub_encrypts_only_to_unrevoked_certificates_that_allow_key_transport_or_agreement(
    db: Database, world: DemoWorld
) -> None:
    """A signing-only RSA certificate, a signing-only EC one, one on a curve the hub does not
    use and a certificate a stored CRL lists are left out, each with its reason; the rest (RSA
    and EC) is encrypted to."""
    police = world.agencies["H26.CATP"]

    def issue(name: str, **options: Any) -> Issued:
        return issue_agency(
            world.root, email="pa08@congan.hanoi.gov.vn", organ_id="H26.CATP",
            common_name=name, at=WORLD_AT - timedelta(days=10), **options,
        )  # fmt: skip

    ec, signing, ec_signing, lost = (
        issue("EC", key_kind="ec-p256"),
        issue("sign", key_usage="sign"),
        issue("EC sign", key_kind="ec-p384", key_usage="sign"),
        issue("lost"),
    )
    crl = make_crl(
        world.root, revoked=[(lost.cert.serial_number, WORLD_AT - timedelta(days=1))],
        this_update=WORLD_AT - timedelta(hours=1), next_update=WORLD_AT + timedelta(days=7),
        number=7,
    )  # fmt: skip
    with db.session() as s:
        for issued in (police, ec, signing, ec_signing, lost):
            store.add_certificate(
                s, issued.cert, role="agency", organ_id="H26.CATP", at=WORLD_AT, actor=ACTOR
            )
        evidence.add_crl(s, crl, source="test", at=WORLD_AT, actor=ACTOR)
        trust = evidence.trust_store(s, revocation_mode="soft-fail")
        chosen = store.encryption_certificates(s, "H26.CATP", WORLD_AT, trust=trust)
        unjudged = store.encryption_certificates(s, "H26.CATP", WORLD_AT, trust=None)
    assert set(chosen.usable) == {police.cert, ec.cert}
    signing_why, ec_signing_why, lost_why = chosen.left_out
    assert "does not allow keyEncipherment" in signing_why
    assert "does not allow keyAgreement" in ec_signing_why
    assert f"serial 0x{lost.cert.serial_number:X}" in lost_why and "was revoked on" in lost_why
    assert set(unjudged.usable) == {police.cert, ec.cert, lost.cert}  # no anchor: no evidence
    assert "no usable encryption certificate" in Recipients((), chosen.left_out).none_usable("X")


def test_a_pkcs7_bundle_is_imported_by_its_end_entity_certificate(
    home: Path, world: DemoWorld
) -> None:
    from cryptography.hazmat.primitives.serialization import pkcs7

    leaf, root = world.agencies["H26.SNV"].cert, world.root.cert
    bundle = home / "chain.p7b"
    bundle.write_bytes(pkcs7.serialize_certificates([root, leaf], Encoding.DER))
    code, out = _run(home, "keys", "import", str(bundle), "--agency", "H26.SNV", "--json")
    assert code == 0, out
    assert json.loads(out)[0]["sha256"] == store.fingerprint(leaf)
    both = home / "two.p7b"
    both.write_bytes(
        pkcs7.serialize_certificates([leaf, world.agencies["H26.STP"].cert], Encoding.PEM)
    )
    code, out = _run(home, "keys", "import", str(both), "--agency", "H26.SNV")
    assert code == 2 and "expected exactly one agency (end-entity) certificate" in out
