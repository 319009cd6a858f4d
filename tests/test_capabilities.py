"""AES-256-GCM for the agencies that advertise it (DESIGN §3), AES-256-CBC for the rest.

A partner advertises what its client reads in the SMIMECapabilities attribute of its signature
(RFC 8551 §2.5.2). ``openssl cms -sign`` and ``cryptography`` advertise AES-CBC only; a client
that prefers AES-256-GCM is stood in for by :func:`advertising_message`, which signs with the
capability list it is given. Receipts and deliveries are opened with ``openssl cms``, as the
agency would.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from asn1crypto import core
from sqlalchemy import select

from archive import tables as t
from archive.records import Transport
from archive.service import Archive
from formats import cms_encrypt, cms_signed
from formats.algorithms import outbound_cipher
from formats.payload import Payload
from formats.smime import b64_lines, payload_entity, wrap_enveloped
from gateway import intake
from gateway.builder import Builder, Hub
from gateway.demo import HUB_ADDRESS, DemoWorld
from gateway.pipeline import Context
from gateway.worker import Worker
from keys import capabilities
from keys.issuing import Issued
from tests.conftest import WORLD_AT
from tests.hostile import _self_signed, crafted_signature

pytestmark = pytest.mark.skipif(
    subprocess.run(["openssl", "version"], capture_output=True, check=False).returncode != 0,
    reason="openssl is not installed",
)

LATER = WORLD_AT + timedelta(minutes=5)
GCM_FIRST = ("aes256_gcm", "aes256_cbc", "aes128_cbc")


def advertising_signature(
    entity: bytes,
    organ: str,
    world: DemoWorld,
    caps: Sequence[str],
    damage: Callable[[bytes], bytes] | None = None,
) -> bytes:
    """A detached SignedData over ``entity`` by the agency's key, whose signed attributes
    advertise ``caps`` (asn1crypto algorithm names), as a client preferring them would;
    ``damage`` changes the attributes' DER before they are signed."""
    return crafted_signature(entity, world.agencies[organ], capabilities=caps, damage=damage)


def advertising_message(
    world: DemoWorld,
    payload: Payload,
    organ: str,
    caps: Sequence[str],
    signer: Issued | None = None,
) -> bytes:
    """``payload`` signed by ``organ`` (or ``signer``, from its mailbox) advertising ``caps``
    (multipart/signed), encrypted to the hub: a submission from a client that is neither
    OpenSSL nor ours."""
    entity = payload_entity(payload.to_xml())
    signature = crafted_signature(entity, signer or world.agencies[organ], capabilities=caps)
    boundary = b"=_caps_" + os.urandom(6).hex().encode()
    signed = (
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; '
        b'micalg=sha-256; boundary="' + boundary + b'"\r\n\r\n'
        b"--" + boundary + b"\r\n" + entity + b"\r\n"
        b"--" + boundary + b"\r\n"
        b'Content-Type: application/pkcs7-signature; name="smime.p7s"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + b64_lines(signature)
        + b"--" + boundary + b"--\r\n"
    )  # fmt: skip
    agency = world.directory.get(organ)
    assert agency is not None
    sender = sorted(agency.emails)[0]
    return wrap_enveloped(
        cms_encrypt.encrypt(signed, [world.hub.cert]),
        smime_type="enveloped-data",
        from_addr=sender,
        to_addrs=[HUB_ADDRESS],
        message_id=f"<{os.urandom(8).hex()}@{sender.split('@')[1]}>",
        date=world.at,
        subject="Official data exchange",
    )


def _file_and_build(
    archive: Archive,
    ctx: Context,
    hub: Hub,
    world: DemoWorld,
    *raws: bytes,
    received: datetime = WORLD_AT,
) -> int:
    """Take ``raws`` in (received at ``received``), file them in one batch, build what is
    owed; the archive number of the last."""
    for raw in raws:
        intake.accept(archive.db, raw, Transport(received, "smtp", "127.0.0.1"))
    outcomes = Worker(archive, lambda: ctx, clock=lambda: LATER, name="w").run_once()
    assert len(outcomes) == len(raws)
    builder = Builder(archive, hub, lambda: world.directory, clock=lambda: LATER, name="b")
    while builder.run_once():
        pass
    seq = outcomes[-1].archive_seq
    assert seq is not None
    return seq


def _built(archive: Archive, key: str) -> tuple[bytes, str]:
    """The message built for outbox row ``key``, and the cipher its archive entry records."""
    with archive.db.session(read_only=True) as s:
        row = s.scalar(select(t.Outbox).where(t.Outbox.key == key))
        assert row is not None and row.message is not None and row.entry_seq is not None
        return row.message, str(archive.log.entry(s, row.entry_seq).fields["cipher"])


def _openssl_cipher(message: bytes, world: DemoWorld, organ: str, tmp_path: Path) -> str:
    """Decrypt as the agency with ``openssl cms``; the content cipher it reports."""
    issued = world.agencies[organ]
    (tmp_path / "in.eml").write_bytes(message)
    (tmp_path / "me.pem").write_bytes(issued.cert_pem())
    (tmp_path / "me.key").write_bytes(issued.key_pem())
    decrypted = subprocess.run(
        ["openssl", "cms", "-decrypt", "-in", tmp_path / "in.eml",
         "-recip", tmp_path / "me.pem", "-inkey", tmp_path / "me.key"],
        capture_output=True, check=False,
    )  # fmt: skip
    assert decrypted.returncode == 0, decrypted.stderr.decode(errors="replace")
    assert b"Content-Type: application/xml" in decrypted.stdout or b"multipart/signed" in (
        decrypted.stdout
    )
    shown = subprocess.run(
        ["openssl", "cms", "-cmsout", "-print", "-in", tmp_path / "in.eml"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    if b"authEnvelopedData" in shown or b"id-smime-ct-authEnvelopedData" in shown:
        return "aes256_gcm" if b"aes-256-gcm" in shown else "other-gcm"
    return "aes256_cbc" if b"aes-256-cbc" in shown else "other"


def test_capabilities_are_read_from_an_openssl_signature_in_their_order(
    world: DemoWorld, tmp_path: Path
) -> None:
    """``openssl cms -sign`` advertises AES-CBC first (and older ciphers after it);
    ``-nosmimecap`` advertises nothing."""
    signer = world.agencies["H26.SNV"]
    (tmp_path / "c.pem").write_bytes(signer.cert_pem())
    (tmp_path / "k.pem").write_bytes(signer.key_pem())
    (tmp_path / "m.txt").write_bytes(b"hello\r\n")
    out: list[tuple[str, ...]] = []
    for extra in ([], ["-nosmimecap"]):
        der = subprocess.run(
            ["openssl", "cms", "-sign", "-in", tmp_path / "m.txt", "-signer", tmp_path / "c.pem",
             "-inkey", tmp_path / "k.pem", "-outform", "DER", "-binary", "-nodetach", *extra],
            capture_output=True, check=True,
        ).stdout  # fmt: skip
        out.append(cms_signed.verify_signed_data(der).capabilities)
    assert out[0][:3] == ("aes256_cbc", "aes192_cbc", "aes128_cbc")
    assert out[1] == ()
    assert outbound_cipher(out[0]) == outbound_cipher(out[1]) == "aes256_cbc"


def test_the_cipher_is_the_first_of_ours_in_the_partners_order() -> None:
    assert outbound_cipher(GCM_FIRST) == "aes256_gcm"
    assert outbound_cipher(("aes256_cbc", "aes256_gcm")) == "aes256_cbc"
    assert outbound_cipher(("aes128_gcm", "aes256_gcm")) == "aes256_gcm"
    assert outbound_cipher(("aes128_gcm", "1.2.3.4")) == "aes256_cbc"
    assert outbound_cipher(()) == "aes256_cbc"


def test_a_damaged_capability_list_counts_as_none_and_not_against_the_message(
    world: DemoWorld,
) -> None:
    """Only a hint, which OpenSSL does not even read: a list that is not one, signed as it is,
    is no capability, and the signature still verifies."""
    entity = b"Content-Type: text/plain\r\n\r\nhello\r\n"
    oid = bytes.fromhex("060960864801650304012e")  # 2.16.840.1.101.3.4.1.46, aes256-GCM

    def integer_for_oid(attrs: bytes) -> bytes:  # same length: an INTEGER where the OID was
        assert attrs.count(oid) == 1
        return attrs.replace(oid, b"\x02" + oid[1:])

    good = advertising_signature(entity, "H26.SNV", world, ["aes256_gcm"])
    damaged = advertising_signature(entity, "H26.SNV", world, ["aes256_gcm"], integer_for_oid)
    assert cms_signed.verify_signed_data(good, detached=entity).capabilities == ("aes256_gcm",)
    checked = cms_signed.verify_signed_data(damaged, detached=entity)
    assert checked.capabilities == ()
    assert checked.signer == world.agencies["H26.SNV"].cert


def _der(tag: int, body: bytes) -> bytes:
    """One DER element (definite length)."""
    n = len(body)
    size = (
        bytes([n])
        if n < 0x80
        else bytes([0x80 | ((n.bit_length() + 7) // 8)])
        + n.to_bytes((n.bit_length() + 7) // 8, "big")
    )
    return bytes([tag]) + size + body


def _attribute(oid: str, *values: bytes) -> bytes:
    return _der(0x30, core.ObjectIdentifier(oid).dump() + _der(0x31, b"".join(values)))


GCM_OID = core.ObjectIdentifier("2.16.840.1.101.3.4.1.46").dump()  # aes256-GCM


@pytest.mark.parametrize(
    ("capabilities", "read"),
    [
        # one capability whose parameters are 2,000 NULLs (beyond the parser's 1,024 per element)
        ([_der(0x30, _der(0x30, GCM_OID + b"\x05\x00" * 2000))], ("aes256_gcm",)),
        # the attribute with 2,000 values (only the first is read: an empty list)
        ([_der(0x30, b"")] * 2000, ()),
        # 2,000 capabilities: the first sixteen are kept
        ([_der(0x30, _der(0x30, GCM_OID) * 2000)], ("aes256_gcm",) * 16),
    ],
    ids=["parameters", "values", "capabilities"],
)
def test_a_huge_capability_list_costs_nothing_and_never_refuses_the_message(
    world: DemoWorld, tmp_path: Path, capabilities: list[bytes], read: tuple[str, ...]
) -> None:
    """What OpenSSL verifies, the hub verifies: an odd SMIMECapabilities is not read past what
    is used, and never makes a parsing limit refuse the message (it is read only once the
    signature holds)."""
    entity = b"Content-Type: text/plain\r\n\r\nhello\r\n"
    attrs = _der(0x31, b"".join([
        _attribute("1.2.840.113549.1.9.3", core.ObjectIdentifier("1.2.840.113549.1.7.1").dump()),
        _attribute("1.2.840.113549.1.9.4", _der(0x04, hashlib.sha256(entity).digest())),
        _attribute("1.2.840.113549.1.9.15", *capabilities),
    ]))  # fmt: skip
    der = advertising_signature(entity, "H26.SNV", world, (), lambda _: attrs)
    checked = cms_signed.verify_signed_data(der, detached=entity)
    assert (checked.capabilities, checked.signer) == (read, world.agencies["H26.SNV"].cert)
    (tmp_path / "sig.der").write_bytes(der)
    (tmp_path / "content").write_bytes(entity)
    verified = subprocess.run(
        ["openssl", "cms", "-verify", "-inform", "DER", "-in", tmp_path / "sig.der",
         "-content", tmp_path / "content", "-binary", "-noverify", "-out", os.devnull],
        capture_output=True, check=False,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stderr


def test_an_agency_advertising_gcm_gets_its_receipt_in_gcm_and_the_others_stay_on_cbc(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub, tmp_path: Path
) -> None:
    raw = advertising_message(world, world.payload("H26.SNV"), "H26.SNV", GCM_FIRST)
    seq = _file_and_build(archive, world_ctx, hub, world, raw)
    with archive.db.session(read_only=True) as s:
        entry = archive.log.entry(s, seq)
        assert entry.fields["status"] == "accepted"
        assert entry.fields["crypto"]["capabilities"] == list(GCM_FIRST)
        kept = capabilities.of(s, "H26.SNV")
        assert kept is not None
        assert (capabilities.cipher_for(s, "H26.SNV"), kept.advertised, kept.entry_seq) == (
            "aes256_gcm",
            list(GCM_FIRST),
            seq,
        )
        assert capabilities.of(s, "H26.CATP") is None

    receipt, cipher = _built(archive, f"receipt:{seq}")
    assert cipher == "aes256_gcm"
    assert b"smime-type=authEnveloped-data" in receipt.split(b"\r\n\r\n")[0]
    assert _openssl_cipher(receipt, world, "H26.SNV", tmp_path) == "aes256_gcm"
    # The police advertised nothing yet: their delivery is AES-256-CBC.
    delivery, cipher = _built(archive, f"delivery:{seq}:H26.CATP")
    assert cipher == "aes256_cbc"
    assert b"smime-type=enveloped-data" in delivery.split(b"\r\n\r\n")[0]
    assert _openssl_cipher(delivery, world, "H26.CATP", tmp_path) == "aes256_cbc"
    assert archive.verify().ok


def test_a_delivery_follows_what_the_recipient_agency_advertised_and_the_newest_counts(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub, tmp_path: Path
) -> None:
    # The police sign something (what it is does not matter) advertising AES-256-GCM first.
    police = advertising_message(world, world.payload("H26.CATP"), "H26.CATP", GCM_FIRST)
    _file_and_build(archive, world_ctx, hub, world, police)
    with archive.db.session(read_only=True) as s:
        assert capabilities.cipher_for(s, "H26.CATP") == "aes256_gcm"

    # Home Affairs' ordinary client (cryptography's signer) advertises AES-CBC only.
    seq = _file_and_build(archive, world_ctx, hub, world, world.submission("H26.SNV"))
    receipt, cipher = _built(archive, f"receipt:{seq}")
    assert (cipher, _openssl_cipher(receipt, world, "H26.SNV", tmp_path)) == ("aes256_cbc",) * 2
    delivery, cipher = _built(archive, f"delivery:{seq}:H26.CATP")
    assert (cipher, _openssl_cipher(delivery, world, "H26.CATP", tmp_path)) == ("aes256_gcm",) * 2

    # The police's next message comes from a client that advertises nothing: back to CBC.
    plain = advertising_message(world, world.payload("H26.CATP", number=2), "H26.CATP", ())
    later = _file_and_build(archive, world_ctx, hub, world, plain)
    with archive.db.session() as s:
        kept = capabilities.of(s, "H26.CATP")
        assert kept is not None
        assert (capabilities.cipher_for(s, "H26.CATP"), kept.entry_seq) == ("aes256_cbc", later)
        # A message received before it but filed after it (retried, released from quarantine,
        # filed by another worker) changes nothing.
        earlier = WORLD_AT - timedelta(hours=1)
        capabilities.record(s, {"H26.CATP": (earlier, later + 5, GCM_FIRST)}, LATER)
        assert capabilities.cipher_for(s, "H26.CATP") == "aes256_cbc"


def test_a_receipt_follows_the_message_it_answers_and_the_agency_its_newest_received(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub, tmp_path: Path
) -> None:
    """Two clients of one agency in one batch, then one of them filed late: each receipt is
    encrypted as the message it answers asked, and the agency's list is its newest received."""
    plain = advertising_message(world, world.payload("H26.SNV", number=1), "H26.SNV", ())
    gcm = advertising_message(world, world.payload("H26.SNV", number=2), "H26.SNV", GCM_FIRST)
    second = _file_and_build(archive, world_ctx, hub, world, plain, gcm)
    first = second - 1
    assert _built(archive, f"receipt:{first}")[1] == "aes256_cbc"
    receipt, cipher = _built(archive, f"receipt:{second}")
    assert (cipher, _openssl_cipher(receipt, world, "H26.SNV", tmp_path)) == ("aes256_gcm",) * 2

    # A message received an hour before them, filed only now: its receipt follows it, the
    # agency's list stays that of the newest received.
    old = advertising_message(world, world.payload("H26.SNV", number=3), "H26.SNV", ())
    late = _file_and_build(
        archive, world_ctx, hub, world, old, received=WORLD_AT - timedelta(hours=1)
    )
    assert _built(archive, f"receipt:{late}")[1] == "aes256_cbc"
    with archive.db.session(read_only=True) as s:
        kept = capabilities.of(s, "H26.SNV")
        assert kept is not None
        assert (capabilities.cipher_for(s, "H26.SNV"), kept.entry_seq) == ("aes256_gcm", second)


def test_what_is_not_authenticated_changes_nothing(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub
) -> None:
    """A signer the hub does not trust (a self-signed certificate naming Home Affairs' mailbox),
    and one whose certificate is revoked (the Department of Justice's), advertise AES-GCM over
    signatures that verify: both are quarantined (no sender authenticated), and neither
    agency's list is touched."""
    forged = advertising_message(
        world, world.payload("H26.SNV"), "H26.SNV", GCM_FIRST, signer=_self_signed(world)
    )
    revoked = advertising_message(
        world, world.payload("H26.STP"), "H26.STP", GCM_FIRST, signer=world.revoked["H26.STP"]
    )
    for raw in (forged, revoked):
        intake.accept(archive.db, raw, Transport(WORLD_AT, "smtp", "127.0.0.1"))
    outcomes = Worker(archive, lambda: world_ctx, clock=lambda: LATER, name="w").run_once()
    assert [o.disposition for o in outcomes] == ["quarantined", "quarantined"]
    with archive.db.session(read_only=True) as s:
        assert capabilities.of(s, "H26.SNV") is None and capabilities.of(s, "H26.STP") is None
