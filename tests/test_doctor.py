"""``gateway doctor`` on a real home: a demo home made by ``DemoWorld.install`` at the fixed
instant WORLD_AT, relaying to a real aiosmtpd sink, is all OK; then one thing at a time is
broken — a key file's mode, the archive master key, the passphrase, the relay, a CRL's date, a
certificate's end, a listener port held by another process — and the right line says so, with
exit status 1 for a FAIL (0 for WARN only). Dates are judged with ``--at``, never the clock."""

from __future__ import annotations

import base64
import configparser
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import text

from archive.blobs import BlobStore
from archive.db import Database
from archive.service import master_key
from formats.limits import Limits
from gateway import cli, obligation_store, smtp
from gateway import doctor as doctor_mod
from gateway import settings as settings_mod
from gateway.demo import HUB_ADDRESS, DemoWorld
from gateway.obligations import Obligation, default_due
from keys import store
from keys.issuing import issue_agency
from tests.conftest import WORLD_AT
from tests.servers import free_port

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PASSPHRASE = b"doctor passphrase"
AT = WORLD_AT.isoformat()


@pytest.fixture(scope="module")
def pristine(world: DemoWorld, relay_port: int, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home ready to serve, with an archive master key that has sealed one blob."""
    home = tmp_path_factory.mktemp("doctor") / "home"
    home.mkdir(mode=0o700)
    world.install(home, PASSPHRASE, relay_port=relay_port)
    db = Database.open(f"sqlite:///{home / 'archive.db'}")
    try:
        key = master_key(home / "keys/archive.key", db)
        with db.session() as s:
            BlobStore(key).put(s, b"sealed under the master key", at=WORLD_AT)
    finally:
        db.dispose()
    return home


@pytest.fixture
def home(pristine: Path, tmp_path: Path) -> Path:
    """A copy of the pristine home that a test may break (modes are copied too)."""
    copy = tmp_path / "home"
    shutil.copytree(pristine, copy)
    return copy


def doctor(home: Path, *args: str) -> Result:
    return CliRunner().invoke(
        cli.cli, ["--home", str(home), "doctor", "--at", AT, "--timeout", "1", *args]
    )


def lines(result: Result) -> dict[str, list[str]]:
    """``check`` → the statuses of its lines, from ``--json`` output."""
    out: dict[str, list[str]] = {}
    for r in json.loads(result.output):
        out.setdefault(r["check"], []).append(r["status"])
    return out


def one(result: Result, check: str) -> dict[str, str]:
    matches = [r for r in json.loads(result.output) if r["check"] == check]
    assert len(matches) == 1, result.output
    return matches[0]


def edit(home: Path, old: str, new: str) -> None:
    config = home / "gateway.toml"
    text = config.read_text(encoding="utf-8")
    assert old in text
    config.write_text(text.replace(old, new), encoding="utf-8")


def append(home: Path, text: str) -> None:
    with (home / "gateway.toml").open("a", encoding="utf-8") as f:
        f.write("\n" + text)


def test_a_ready_home_is_all_ok(home: Path) -> None:
    result = doctor(home, "--json")
    assert result.exit_code == 0, result.output
    statuses = lines(result)
    assert all(s == ["OK"] for s in statuses.values()), result.output
    assert set(statuses) >= {
        "config", "permissions", "database", "schema", "archive key", "hub keys",
        "hub certificate", "trust anchors", "context", "certificates", "crls", "smtp",
        "metrics", "relay",
    }  # fmt: skip
    assert "opens the archive" in one(result, "archive key")["message"]

    text = doctor(home)
    assert text.exit_code == 0
    assert [line.split()[0] for line in text.output.splitlines()] == ["OK"] * len(
        json.loads(result.output)
    )


def test_a_world_readable_key_file_fails(home: Path) -> None:
    (home / "keys/passphrase").chmod(0o644)
    result = doctor(home, "--json")
    assert result.exit_code == 1
    line = one(result, "permissions")
    assert line["status"] == "FAIL"
    assert "keys/passphrase" in line["message"] and "chmod 600" in line["message"]


def test_a_group_readable_key_file_warns(home: Path) -> None:
    (home / "keys/archive.key").chmod(0o640)
    result = doctor(home, "--json")
    assert result.exit_code == 0, result.output
    assert one(result, "permissions")["status"] == "WARN"


def test_a_missing_master_key_fails(home: Path) -> None:
    (home / "keys/archive.key").unlink()
    result = doctor(home, "--json")
    assert result.exit_code == 1
    line = one(result, "archive key")
    assert line["status"] == "FAIL" and "restore it from the key backup" in line["message"]


def test_another_master_key_fails(home: Path) -> None:
    (home / "keys/archive.key").write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    result = doctor(home, "--json")
    assert result.exit_code == 1
    assert "wrong key for this database" in one(result, "archive key")["message"]


def test_a_wrong_passphrase_fails(home: Path) -> None:
    (home / "keys/passphrase").write_bytes(b"not the passphrase\n")
    result = doctor(home, "--json")
    assert result.exit_code == 1
    line = one(result, "hub keys")
    assert line["status"] == "FAIL" and "wrong or missing passphrase" in line["message"]
    assert "context" not in lines(result)  # nothing more to learn from loading it


def test_passphrase_file_option_overrides_the_configured_one(home: Path, tmp_path: Path) -> None:
    (home / "keys/passphrase").write_bytes(b"not the passphrase\n")
    right = tmp_path / "from-the-credential-store"
    right.write_bytes(PASSPHRASE + b"\n")
    result = doctor(home, "--json", "--passphrase-file", str(right))
    assert one(result, "hub keys")["status"] == "OK", result.output

    piped = CliRunner().invoke(
        cli.cli,
        ["--home", str(home), "doctor", "--at", AT, "--json", "--passphrase-file", "-"],
        input=PASSPHRASE.decode() + "\n",
    )
    assert one(piped, "hub keys")["status"] == "OK", piped.output
    assert "GATEWAY_KEY_PASSPHRASE" not in os.environ  # handed on for the run only


def test_a_closed_relay_port_fails(home: Path, relay_port: int) -> None:
    closed = free_port()
    edit(home, f"port = {relay_port}", f"port = {closed}")
    result = doctor(home, "--json")
    assert result.exit_code == 1
    line = one(result, "relay")
    assert line["status"] == "FAIL" and f"127.0.0.1:{closed}" in line["message"]
    assert "connection refused" in line["message"]


def test_a_stale_crl_fails_under_hard_fail_and_warns_under_soft_fail(home: Path) -> None:
    later = (WORLD_AT + timedelta(days=8)).isoformat()  # the demo CRL's nextUpdate is +7 days
    result = doctor(home, "--json", "--at", later)
    assert result.exit_code == 1
    line = one(result, "crls")
    assert line["status"] == "FAIL" and "stale since" in line["message"]
    assert one(result, "hub certificate")["status"] == "OK"

    append(home, '[trust]\nrevocation = "soft-fail"\n')
    soft = doctor(home, "--json", "--at", later)
    assert soft.exit_code == 0, soft.output
    assert one(soft, "crls")["status"] == "WARN"


def test_an_ending_agency_certificate_warns_unless_it_has_a_successor(
    home: Path, world: DemoWorld
) -> None:
    def ending(organ_id: str, email: str) -> None:
        cert = issue_agency(
            world.root,
            email=email,
            organ_id=organ_id,
            common_name=organ_id,
            at=WORLD_AT - timedelta(days=300),
            days=320,
            key_kind="ec-p256",
        ).cert
        db = Database.open(f"sqlite:///{home / 'archive.db'}")
        try:
            with db.session() as s:
                store.add_certificate(
                    s, cert, role="agency", organ_id=organ_id, at=WORLD_AT, actor="test"
                )
        finally:
            db.dispose()

    ending("H26.SNV", "vanthu@snv.hanoi.gov.vn")  # the demo's own SNV certificate succeeds it
    assert one(doctor(home, "--json"), "certificates")["status"] == "OK"

    ending("H26.UBND", "vanphong@ubnd.hanoi.gov.vn")  # no successor
    result = doctor(home, "--json")
    assert result.exit_code == 0, result.output
    line = one(result, "certificates")
    assert line["status"] == "WARN" and "H26.UBND" in line["message"]
    assert "gateway keys retire" in line["message"]


def test_recipients_that_could_not_be_sent_their_deliveries_warn(home: Path) -> None:
    """An obligation in force owes H26.CATP (mailbox and certificate), H26.UBND (no mailbox in
    the demo directory) and H26.STP, whose certificate is retired: two of them warn."""
    assert one(doctor(home, "--json"), "deliveries")["status"] == "OK"
    db = Database.open(f"sqlite:///{home / 'archive.db'}")
    try:
        with db.session() as s:
            obligation_store.add(
                s,
                Obligation(
                    "snv-work-permit", "H26.SNV", ("H26.CATP", "H26.UBND", "H26.STP"),
                    "work-permit", "monthly", default_due("monthly"), "QĐ 18/2017 Điều 8.2.c",
                ),
                at=WORLD_AT, actor="test",
            )  # fmt: skip
            for c in store.certificates(s, role="agency", organ_id="H26.STP"):
                store.retire_certificate(s, c.sha256, at=WORLD_AT, actor="test")
    finally:
        db.dispose()
    result = doctor(home, "--json")
    assert result.exit_code == 0, result.output
    line = one(result, "deliveries")
    assert line["status"] == "WARN", line
    assert (
        "H26.STP (no certificate the hub can encrypt to), H26.UBND (no mailbox)" in line["message"]
    )
    assert "H26.CATP" not in line["message"]


def test_the_hub_certificate_warns_before_its_end_and_fails_after(home: Path) -> None:
    end = WORLD_AT - timedelta(days=30) + timedelta(days=730)  # DemoWorld's hub certificate
    soon = doctor(home, "--json", "--at", (end - timedelta(days=10)).isoformat())
    assert one(soon, "hub certificate")["status"] == "WARN"
    after = doctor(home, "--json", "--at", (end + timedelta(days=1)).isoformat())
    assert after.exit_code == 1
    line = one(after, "hub certificate")
    assert line["status"] == "FAIL" and "receipts cannot be signed" in line["message"]


def test_an_smtp_port_held_by_a_foreign_process_fails(home: Path) -> None:
    with socket.socket() as squatter:  # listens, never greets
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        edit(home, 'smtp = "127.0.0.1:0"', f'smtp = "127.0.0.1:{port}"')
        result = doctor(home, "--json")
    assert result.exit_code == 1
    line = one(result, "smtp")
    assert line["status"] == "FAIL" and "taken by another process" in line["message"]


def test_an_smtp_port_held_by_another_mail_server_fails(home: Path, relay_port: int) -> None:
    edit(home, 'smtp = "127.0.0.1:0"', f'smtp = "127.0.0.1:{relay_port}"')
    result = doctor(home, "--json")
    assert result.exit_code == 1
    assert "another mail server" in one(result, "smtp")["message"]


def test_listeners_free_or_already_the_gateways(home: Path) -> None:
    port = free_port()
    edit(home, 'smtp = "127.0.0.1:0"', f'smtp = "127.0.0.1:{port}"')
    free = one(doctor(home, "--json"), "smtp")
    assert free["status"] == "OK" and "is free" in free["message"]

    db = Database.open(f"sqlite:///{home / 'archive.db'}")
    listener = smtp.start(
        db, host="127.0.0.1", port=0, hub_addresses=[HUB_ADDRESS], limits=Limits(), lmtp=True
    )
    try:
        lmtp = f'lmtp = "127.0.0.1:{listener.port}"\n'
        edit(home, f'smtp = "127.0.0.1:{port}"\n', f'smtp = "127.0.0.1:{port}"\n{lmtp}')
        result = doctor(home, "--json")
    finally:
        listener.stop()
        db.dispose()
    line = one(result, "lmtp")
    assert line["status"] == "OK" and "the gateway already listens here" in line["message"]


@pytest.mark.parametrize("password", ["s3cret", "s3c@ret"])
def test_an_unreachable_database_fails_without_showing_its_password(
    home: Path, password: str
) -> None:
    url = f"postgresql+psycopg://gw:{password}@127.0.0.1:{free_port()}/gw"
    append(home, f'[database]\nurl = "{url}"\n')
    result = doctor(home, "--json")
    assert result.exit_code == 1
    line = one(result, "database")
    assert line["status"] == "FAIL" and "not reachable" in line["message"]
    assert "s3c" not in result.output and "ret@" not in result.output
    assert "hub keys" not in lines(result)  # the key store lives in the database


def test_an_unparsable_database_url_fails_without_showing_its_password(home: Path) -> None:
    append(home, '[database]\nurl = "postgres ql://gw:s3cret@127.0.0.1/gw"\n')
    result = doctor(home, "--json")
    assert result.exit_code == 1
    line = one(result, "database")
    assert line["status"] == "FAIL" and "is not a database URL" in line["message"]
    assert "gw:***@127.0.0.1" in line["message"] and "s3cret" not in result.output


def test_an_unreachable_imap_server_fails(home: Path) -> None:
    (home / "keys/imap-password").write_text("x\n")
    (home / "keys/imap-password").chmod(0o600)
    append(
        home,
        f'[imap]\nhost = "127.0.0.1"\nport = {free_port()}\nsecurity = "none"\n'
        'username = "hub"\npassword_file = "keys/imap-password"\n',
    )
    result = doctor(home, "--json")
    assert result.exit_code == 1
    assert one(result, "imap")["status"] == "FAIL"


def test_a_broken_config_is_one_fail(home: Path) -> None:
    append(home, "[nonsense]\n")
    result = doctor(home)
    assert result.exit_code == 1
    assert result.output.startswith("FAIL config") and len(result.output.splitlines()) == 1


def test_database_and_schema_on_each_engine(database_url: str, tmp_path: Path) -> None:
    Database.open(database_url).dispose()  # created and migrated to the newest revision
    settings = dataclasses.replace(
        settings_mod.load(tmp_path), database=settings_mod.DatabaseSettings(url=database_url)
    )

    def statuses() -> list[tuple[str, str]]:
        results, db = doctor_mod.database(settings)
        if db is not None:
            db.dispose()
        return [(r.status, r.message) for r in results]

    (db_ok, durable), (schema_ok, _) = statuses()
    assert (db_ok, schema_ok) == ("OK", "OK")
    assert ("fsync on" if database_url.startswith("postgresql") else "synchronous=FULL") in durable

    db = Database.open(database_url, migrate=False)
    try:
        for revision, status, says in (("0001", "WARN", "upgrades it"), ("9999", "FAIL", "newer")):
            with db.engine.begin() as c:
                c.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
            schema = statuses()[1]
            assert schema[0] == status and says in schema[1]
    finally:
        db.dispose()


# --- deploy/ ----------------------------------------------------------------------------------


def test_the_production_example_loads(tmp_path: Path) -> None:
    shutil.copy(DEPLOY / "gateway.toml.production.example", tmp_path / "gateway.toml")
    settings = settings_mod.load(tmp_path)
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert settings.listen.lmtp == "127.0.0.1:2424" and settings.listen.require_tls
    assert (settings.relay.host, settings.relay.port, settings.relay.security) == (
        "127.0.0.1", 25, "none",
    )  # fmt: skip
    assert settings.serve.metrics == "127.0.0.1:9466" and settings.serve.admin_address
    assert str(settings.hub.passphrase_file).startswith("/run/credentials/gateway.service/")


HARDENING = {
    "User": "gateway",
    "ProtectSystem": "strict",
    "ReadWritePaths": "/var/lib/gateway",
    "PrivateTmp": "yes",
    "NoNewPrivileges": "yes",
    "ProtectHome": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "CapabilityBoundingSet": "",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallFilter": "@system-service",
    "UMask": "0077",
    "Restart": "on-failure",
    "KillSignal": "SIGTERM",
    "TimeoutStopSec": "60",
}


def test_the_systemd_unit_is_hardened() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    unit.read(DEPLOY / "systemd/gateway.service", encoding="utf-8")
    service = unit["Service"]
    assert {k: service.get(k) for k in HARDENING} == HARDENING
    assert service["ExecStart"].endswith("gateway --home /var/lib/gateway serve --log-format json")
    assert service["LoadCredential"].startswith("hub-key-passphrase:")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_accepts_the_unit(tmp_path: Path) -> None:
    # verify wants ExecStart to exist: point it at this environment's `gateway`.
    here = Path(sys.executable).parent / "gateway"
    text = (DEPLOY / "systemd/gateway.service").read_text(encoding="utf-8")
    unit = tmp_path / "gateway.service"
    unit.write_text(text.replace("/opt/gateway/bin/gateway", str(here)), encoding="utf-8")
    for command in (
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        ["systemd-analyze", "security", "--offline=true", "--threshold=20", str(unit)],
    ):
        run = subprocess.run(command, capture_output=True, text=True, check=False)
        assert run.returncode == 0 and not run.stderr.strip(), (command, run.stdout, run.stderr)
