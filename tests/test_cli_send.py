"""``gateway send`` end to end: a demo home made now, the command run with CliRunner, a real
aiosmtpd relay on loopback; what arrives must pass the gateway's own pipeline and
``openssl cms -decrypt`` + ``-verify``. Every refusal is one line and a non-zero exit."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from hashlib import sha256
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.serialization import Encoding

from archive.db import Database
from formats.payload import Attachment, Organ, Signer, build_payload
from gateway import cli
from gateway import settings as settings_mod
from gateway.demo import HUB_ADDRESS, DemoWorld
from gateway.loading import load_context
from gateway.pipeline import process
from keys.issuing import issue_agency, make_crl, make_intermediate, make_root, pkcs12_bundle
from tests.payload_samples import work_permit_report
from tests.test_relay import LoopbackController, Peer

SNV, CATP, STP = "H26.SNV", "H26.CATP", "H26.STP"
SNV_EMAIL = "vanthu@snv.hanoi.gov.vn"
P12_SECRET = "p12 passphrase for tests"
PASSPHRASE = b"demo passphrase"


@pytest.fixture(scope="module")
def peer() -> Iterator[tuple[Peer, int]]:
    handler = Peer()
    controller = LoopbackController(handler, hostname="127.0.0.1", port=0)
    controller.start()
    yield handler, controller.port
    controller.stop()


@pytest.fixture(scope="module")
def world() -> DemoWorld:
    return DemoWorld.create(datetime.now(UTC))  # now: the CLI reads the clock


@pytest.fixture(scope="module")
def home(
    world: DemoWorld, tmp_path_factory: pytest.TempPathFactory, peer: tuple[Peer, int]
) -> Path:
    """A demo home with keys and directory in files, relaying to the loopback peer."""
    home = tmp_path_factory.mktemp("send-home")
    world.write_home(home, PASSPHRASE)
    with (home / "gateway.toml").open("a", encoding="utf-8") as toml:
        toml.write(f'\n[relay]\nhost = "127.0.0.1"\nport = {peer[1]}\nsecurity = "none"\n')
    (home / "agencies/H26.SNV.p12").write_bytes(
        pkcs12_bundle(
            world.agencies[SNV], [world.root.cert], passphrase=P12_SECRET.encode(), name=SNV
        )
    )
    stranger = issue_agency(
        world.root,
        email="someone@snv.hanoi.gov.vn",
        organ_id=None,
        common_name="A mailbox the directory does not know",
        at=world.at,
        key_kind="rsa2048",
    )
    (home / "agencies/stranger.pem").write_bytes(stranger.cert_pem())
    (home / "agencies/stranger.key").write_bytes(stranger.key_pem(PASSPHRASE))
    # SNV's own name and mailbox, from a CA the hub does not trust.
    foreign = make_root("A CA the hub does not trust", at=world.at, key_kind="rsa2048")
    outsider = issue_agency(
        foreign,
        email=SNV_EMAIL,
        organ_id=SNV,
        common_name="SNV from elsewhere",
        at=world.at,
        key_kind="rsa2048",
    )
    for name, issued in (("foreign", outsider), ("STP-revoked", world.revoked[STP])):
        (home / f"agencies/{name}.pem").write_bytes(issued.cert_pem())
        (home / f"agencies/{name}.key").write_bytes(issued.key_pem(PASSPHRASE))
    stp = world.directory.get(STP)
    assert stp is not None
    revoked_payload = build_payload(
        "document",
        sender=Organ(STP, stp.name_vi, sorted(stp.emails)[0]),
        recipients=[Organ(CATP, "Công an thành phố Hà Nội", "pa08@congan.hanoi.gov.vn")],
        records=[{"DocumentType": "Công văn", "Summary": "signed with a revoked certificate"}],
        document_number="8/STP-VP",
        issued_on=world.at.date(),
        message_id=uuid.uuid4(),
        signer=Signer("Nguyễn Văn A", "Chánh Văn phòng"),
    )
    (home / "stp.xml").write_bytes(revoked_payload.to_xml())
    (home / "payload.xml").write_bytes(work_permit_report(world.at.date()))
    annex = {"annex.pdf": b"%PDF-1.4 an annex the payload lists\n"}
    with_annex(home, "payload-annex.xml", annex, world.at.date())
    return home


def with_annex(
    where: Path, name: str, files: dict[str, bytes], issued_on: date
) -> list[str | Path]:
    """Writes ``files`` and, as ``name``, a payload listing them; returns their --attach options."""
    for filename, data in files.items():
        (where / filename).write_bytes(data)
    listed = [
        Attachment(n, "application/pdf", len(d), sha256(d).hexdigest()) for n, d in files.items()
    ]
    (where / name).write_bytes(work_permit_report(issued_on, listed))
    return [option for n in files for option in ("--attach", where / n)]


@pytest.fixture(scope="module")
def db_home(
    world: DemoWorld, tmp_path_factory: pytest.TempPathFactory, peer: tuple[Peer, int]
) -> Path:
    """A home with everything in the database: directory, hub key, enrolled agency certificates."""
    home = tmp_path_factory.mktemp("send-db-home")
    world.install(home, PASSPHRASE, relay_port=peer[1])
    (home / "agencies").mkdir()
    unenrolled = issue_agency(
        world.root,
        email=SNV_EMAIL,
        organ_id=SNV,
        common_name="SNV (not enrolled)",
        at=world.at,
        key_kind="rsa2048",
    )
    for name, issued in ((SNV, world.agencies[SNV]), ("unenrolled", unenrolled)):
        (home / f"agencies/{name}.pem").write_bytes(issued.cert_pem())
        (home / f"agencies/{name}.key").write_bytes(issued.key_pem(PASSPHRASE))
    return home


@pytest.fixture
def relay(peer: tuple[Peer, int]) -> Peer:
    handler = peer[0]
    handler.received.clear()
    handler.mail_reply, handler.rcpt_replies = None, {}
    handler.data_reply = "250 2.0.0 Ok: queued as 77"
    return handler


def send(home: Path, *args: str | Path, env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(
        cli.cli, ["--home", str(home), "send", *map(str, args)], env=env, catch_exceptions=False
    )


def pem(home: Path, organ_id: str = SNV) -> list[str | Path]:
    return [
        "--key", home / f"agencies/{organ_id}.key", "--cert", home / f"agencies/{organ_id}.pem",
        "--passphrase-file", home / "keys/passphrase",
    ]  # fmt: skip


def openssl(*args: str | Path) -> bytes:
    proc = subprocess.run(["openssl", *map(str, args)], capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


# --- sent, accepted, interoperable -------------------------------------------------------------


@pytest.mark.parametrize("variant", ["pem", "p12", "attachment"])
def test_sent_message_is_accepted_by_the_gateway(home: Path, relay: Peer, variant: str) -> None:
    xml, env = home / "payload.xml", {"GATEWAY_SEND_PASSPHRASE": P12_SECRET}
    args: list[str | Path] = {
        "pem": ["--to", CATP, *pem(home)],
        "p12": ["--key", home / "agencies/H26.SNV.p12"],
        "attachment": [*pem(home), "--attach", home / "annex.pdf"],
    }[variant]
    if variant == "attachment":
        xml = home / "payload-annex.xml"
    result = send(home, xml, "--as", SNV, *args, env=env)
    assert result.exit_code == 0, result.output
    [got] = relay.received
    message_id = got.content.split(b"Message-ID: ", 1)[1].split(b"\r\n", 1)[0].decode()
    assert result.output == (
        f"sent {message_id} from {SNV} to {HUB_ADDRESS}: 250 2.0.0 Ok: queued as 77\n"
    )
    assert message_id.endswith("@snv.hanoi.gov.vn>")
    assert (got.mail_from, got.rcpt_tos) == (SNV_EMAIL, [HUB_ADDRESS])

    assert_accepted(home, got.content, xml.read_bytes())


def assert_accepted(home: Path, raw: bytes, xml: bytes) -> None:
    """The gateway's own pipeline, with the context that home configures."""
    settings = settings_mod.load(home)
    db = Database.open(settings.database_url)
    try:
        context = load_context(settings, db)
    finally:
        db.dispose()
    verdict = process(raw, context, at=datetime.now(UTC))
    assert verdict.errors == ()
    assert verdict.accepted
    assert verdict.opened is not None
    assert verdict.opened.payload == xml


def test_directory_hub_key_and_enrolment_from_the_database(
    db_home: Path, home: Path, relay: Peer
) -> None:
    xml = home / "payload.xml"
    result = send(db_home, xml, "--as", SNV, *pem(db_home))
    assert result.exit_code == 0, result.output
    assert_accepted(db_home, relay.received[0].content, xml.read_bytes())

    result = send(db_home, xml, "--as", SNV, *pem(db_home, "unenrolled"))
    assert result.exit_code == 2
    assert (
        "is not enrolled for H26.SNV (or not usable now), so the hub would refuse it"
        in result.output
    )
    assert len(relay.received) == 1


def openssl_opens(home: Path, raw: bytes, tmp_path: Path) -> bytes:
    """The payload XML, as ``openssl cms`` decrypts ``raw`` with the hub's key and verifies it
    with the demo root as the only trust anchor."""
    (tmp_path / "msg.eml").write_bytes(raw)
    decrypted = openssl(
        "cms", "-decrypt", "-in", tmp_path / "msg.eml", "-recip", home / "keys/hub.pem",
        "-inkey", home / "keys/hub.key", "-passin", f"file:{home / 'keys/passphrase'}",
    )  # fmt: skip
    (tmp_path / "signed.eml").write_bytes(decrypted)
    content = openssl(
        "cms", "-verify", "-in", tmp_path / "signed.eml", "-purpose", "smimesign",
        "-CAfile", home / "trust/anchors/demo-root.pem",
    )  # fmt: skip
    return base64.b64decode(content.split(b"\r\n\r\n", 1)[1])


@pytest.mark.interop
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_sent_message_opens_with_openssl(home: Path, relay: Peer, tmp_path: Path) -> None:
    assert send(home, home / "payload.xml", "--as", SNV, *pem(home)).exit_code == 0
    raw = relay.received[0].content
    assert openssl_opens(home, raw, tmp_path) == (home / "payload.xml").read_bytes()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_p12_chain_is_carried_in_the_signature(
    home: Path, world: DemoWorld, relay: Peer, tmp_path: Path
) -> None:
    """An agency certificate issued by an intermediate CA, whose PKCS#12 file holds that CA:
    `send` validates with the file's chain, so the signature must carry it; the hub (and
    openssl) hold only the root. Guards against signing with the leaf alone, which the hub
    refused as an untrusted signer."""
    copy = tmp_path / "home"
    shutil.copytree(home, copy)
    sub = make_intermediate(world.root, "Agency Sub-CA", at=world.at - timedelta(days=1))
    leaf = issue_agency(
        sub, email=SNV_EMAIL, organ_id=SNV, common_name="SNV via a sub-CA",
        at=world.at - timedelta(hours=1),
    )  # fmt: skip
    crl = make_crl(
        sub, revoked=[], this_update=world.at - timedelta(hours=1),
        next_update=world.at + timedelta(days=7), number=1,
    )  # fmt: skip
    (copy / "trust/crls/sub.crl").write_bytes(crl.public_bytes(Encoding.DER))
    p12 = copy / "agencies/sub.p12"
    p12.write_bytes(pkcs12_bundle(leaf, [sub.cert], passphrase=P12_SECRET.encode(), name=SNV))

    xml = copy / "payload.xml"
    result = send(copy, xml, "--as", SNV, "--key", p12, env={"GATEWAY_SEND_PASSPHRASE": P12_SECRET})
    assert result.exit_code == 0, result.output
    [got] = relay.received
    assert_accepted(copy, got.content, xml.read_bytes())
    assert openssl_opens(copy, got.content, tmp_path) == xml.read_bytes()


def test_dry_run_and_output_send_nothing(home: Path, relay: Peer, tmp_path: Path) -> None:
    out = tmp_path / "out.eml"
    result = send(home, home / "payload.xml", "--as", SNV, *pem(home), "--output", out, "--json")
    assert result.exit_code == 0, result.output
    assert '"outcome": "not sent"' in result.output
    assert out.read_bytes().startswith(f"From: {SNV_EMAIL}\r\nTo: {HUB_ADDRESS}\r\n".encode())
    result = send(home, home / "payload.xml", "--as", SNV, *pem(home), "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.output.endswith("not sent (dry run)\n")
    assert relay.received == []


# --- refused before sending, one line each -----------------------------------------------------


def test_refusals_before_sending(home: Path, relay: Peer, tmp_path: Path) -> None:
    xml = home / "payload.xml"
    (tmp_path / "bad.xml").write_bytes(b"<Payload><unclosed></Payload>")
    nowhere = build_payload(
        "document",
        sender=Organ(SNV, None, SNV_EMAIL),
        recipients=[Organ(CATP), Organ("H26.NOPE")],
        records=[{"DocumentType": "Công văn", "Summary": "to an agency the hub does not know"}],
        document_number="9/SNV-VP",
        issued_on=datetime.now(UTC).date(),
        message_id=uuid.uuid4(),
    )
    (tmp_path / "nowhere.xml").write_bytes(nowhere.to_xml())
    (tmp_path / "wrong").write_text("not the passphrase\n")
    cases = {
        "invalid XML": ([tmp_path / "bad.xml", "--as", SNV, *pem(home)], "bad.xml: "),
        "wrong --as": (
            [xml, "--as", CATP, *pem(home, CATP)],
            f"the payload's From/OrganId is {SNV}, not {CATP} (--as)",
        ),
        "--to mismatch": (
            [xml, "--as", SNV, "--to", CATP, "--to", "H26.STP", *pem(home)],
            "differs from --to: --to names H26.STP, the payload does not",
        ),
        "wrong passphrase": (
            [xml, "--as", SNV, *pem(home)[:4], "--passphrase-file", tmp_path / "wrong"],
            "H26.SNV.key: wrong passphrase",
        ),
        "not the agency's certificate": (
            [xml, "--as", SNV, *pem(home, CATP)],
            "belongs to OrganId H26.CATP, not H26.SNV",
        ),
        "certificate e-mail not the agency's": (
            [xml, "--as", SNV, *pem(home, "stranger")],
            "the certificate's e-mail <someone@snv.hanoi.gov.vn> is not a mailbox of H26.SNV "
            "(vanthu@snv.hanoi.gov.vn)",
        ),
        "attachment not given": (
            [home / "payload-annex.xml", "--as", SNV, *pem(home)],
            "the payload lists attachment(s) annex.pdf: give each with --attach FILE",
        ),
        "certificate from a CA the hub does not trust": (
            [xml, "--as", SNV, *pem(home, "foreign")],
            "does not chain to a configured trust anchor",
        ),
        "revoked certificate": (
            [home / "stp.xml", "--as", STP, *pem(home, "STP-revoked")],
            "was revoked on",
        ),
        "To an agency the hub does not know": (
            [tmp_path / "nowhere.xml", "--as", SNV, *pem(home)],
            "recipient agency (To) H26.NOPE is not an agency in the hub's directory",
        ),
        "no passphrase": (
            [xml, "--as", SNV, "--key", home / "agencies/H26.SNV.p12"],
            "no passphrase: give --passphrase-file or set $GATEWAY_SEND_PASSPHRASE",
        ),
    }
    for name, (args, message) in cases.items():
        result = send(home, *args, env={"GATEWAY_SEND_PASSPHRASE": None})
        assert result.exit_code == 2, (name, result.output)
        assert message in result.output, (name, result.output)
        assert result.output.count("\n") == 1, (name, result.output)
    assert relay.received == []


def test_without_fresh_revocation_evidence_it_warns_and_sends(
    home: Path, relay: Peer, tmp_path: Path
) -> None:
    """The hub holds the message until it can check revocation (hard-fail): no reason to
    refuse it here, but worth a word."""
    copy = tmp_path / "home"
    shutil.copytree(home, copy)
    (copy / "trust/crls/demo-root.crl").unlink()
    result = send(copy, copy / "payload.xml", "--as", SNV, *pem(copy))
    assert result.exit_code == 0, result.output
    assert "gateway: warning: " in result.output
    assert "the hub checks it before deciding" in result.output
    assert len(relay.received) == 1


def test_refuses_more_mime_parts_than_the_homes_limits(
    home: Path, world: DemoWorld, relay: Peer, tmp_path: Path
) -> None:
    """[limits] max_parts (16) counts the decrypted structure: multipart/signed, the signature,
    multipart/mixed, the XML and one part per attachment. The payload schema allows 100
    attachments, so 13 passed every other check and went out, for the hub to refuse; 12 fit."""
    files = {f"annex{i:02d}.pdf": b"%%PDF-1.4 annex %d\n" % i for i in range(13)}
    attach = with_annex(tmp_path, "many.xml", files, world.at.date())
    result = send(home, tmp_path / "many.xml", "--as", SNV, *pem(home), *attach)
    assert result.exit_code == 2, result.output
    assert result.output == (
        "Error: the hub would refuse this message: more than 16 MIME parts ([limits] of "
        f"{home / 'gateway.toml'})\n"
    )
    assert relay.received == []

    del files["annex12.pdf"]
    attach = with_annex(tmp_path, "twelve.xml", files, world.at.date())
    result = send(home, tmp_path / "twelve.xml", "--as", SNV, *pem(home), *attach)
    assert result.exit_code == 0, result.output
    assert_accepted(home, relay.received[0].content, (tmp_path / "twelve.xml").read_bytes())


def test_refuses_a_message_over_the_homes_max_message_bytes(
    home: Path, world: DemoWorld, relay: Peer, tmp_path: Path
) -> None:
    """The home's [limits] max_message_bytes, not the built-in 32 MiB: the hub answers 552 to
    a bigger message, so `send` refuses it before it goes."""
    copy = tmp_path / "home"
    shutil.copytree(home, copy)
    with (copy / "gateway.toml").open("a", encoding="utf-8") as toml:
        toml.write("\n[limits]\nmax_message_bytes = 1048576\n")
    files = {"big.pdf": b"%PDF-1.4\n" + os.urandom(1024 * 1024)}
    attach = with_annex(tmp_path, "big.xml", files, world.at.date())
    result = send(copy, tmp_path / "big.xml", "--as", SNV, *pem(copy), *attach)
    assert result.exit_code == 2, result.output
    assert "Error: the hub would refuse this message: message is " in result.output
    assert "bytes, limit is 1048576; send smaller parts ([limits] of " in result.output
    assert result.output.count("\n") == 1
    assert relay.received == []


# --- the relay says no --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "exit_code", "message"),
    [
        (
            "550 5.7.1 relaying denied",
            1,
            "not sent; the relay refused it: 550 5.7.1 relaying denied",
        ),
        (
            "451 4.3.0 queue full",
            75,
            "not sent; the relay cannot take it now, try later: 451 4.3.0 queue full",
        ),
    ],
)
def test_relay_refusal_exits_with_the_reply(
    home: Path, relay: Peer, reply: str, exit_code: int, message: str
) -> None:
    relay.data_reply = reply
    result = send(home, home / "payload.xml", "--as", SNV, *pem(home))
    assert result.exit_code == exit_code
    assert result.output == f"Error: {message}\n"
