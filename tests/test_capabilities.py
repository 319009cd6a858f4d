"""AES-256-GCM for the agencies that advertise it (DESIGN §3), AES-256-CBC for the rest.

A partner advertises what its client reads in the SMIMECapabilities attribute of its signature
(RFC 8551 §2.5.2). ``openssl cms -sign`` and ``cryptography`` advertise AES-CBC only; a client
that prefers AES-256-GCM is stood in for by :func:`advertising_message`, which signs with the
capability list it is given. Receipts and deliveries are opened with ``openssl cms``, as the
agency would.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import pytest
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
from tests.conftest import WORLD_AT
from tests.hostile import crafted_signature

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
    world: DemoWorld, payload: Payload, organ: str, caps: Sequence[str]
) -> bytes:
    """``payload`` signed by ``organ`` advertising ``caps`` (multipart/signed), encrypted to
    the hub: a submission from a client that is neither OpenSSL nor ours."""
    entity = payload_entity(payload.to_xml())
    boundary = b"=_caps_" + os.urandom(6).hex().encode()
    signed = (
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; '
        b'micalg=sha-256; boundary="' + boundary + b'"\r\n\r\n'
        b"--" + boundary + b"\r\n" + entity + b"\r\n"
        b"--" + boundary + b"\r\n"
        b'Content-Type: application/pkcs7-signature; name="smime.p7s"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + b64_lines(advertising_signature(entity, organ, world, caps))
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


def _file_and_build(archive: Archive, ctx: Context, hub: Hub, world: DemoWorld, raw: bytes) -> int:
    intake.accept(archive.db, raw, Transport(WORLD_AT, "smtp", "127.0.0.1"))
    [outcome] = Worker(archive, lambda: ctx, clock=lambda: LATER, name="w").run_once()
    builder = Builder(archive, hub, lambda: world.directory, clock=lambda: LATER, name="b")
    while builder.run_once():
        pass
    assert outcome.archive_seq is not None
    return outcome.archive_seq


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


def test_capabilities_are_read_from_an_openssl_signature_in_their_order() -> None:
    """``openssl cms -sign`` advertises AES-CBC first (and older ciphers after it);
    ``-nosmimecap`` advertises nothing."""
    out: list[tuple[str, ...]] = []
    for extra in ([], ["-nosmimecap"]):
        der = _openssl_signed(extra)
        out.append(cms_signed.verify_signed_data(der).capabilities)
    assert out[0][:3] == ("aes256_cbc", "aes192_cbc", "aes128_cbc")
    assert out[1] == ()
    assert outbound_cipher(out[0]) == outbound_cipher(out[1]) == "aes256_cbc"


def _openssl_signed(extra: list[str]) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", d / "k.pem",
             "-out", d / "c.pem", "-subj", "/CN=caps test", "-days", "2"],
            capture_output=True, check=True,
        )  # fmt: skip
        (d / "m.txt").write_bytes(b"hello\r\n")
        return subprocess.run(
            ["openssl", "cms", "-sign", "-in", d / "m.txt", "-signer", d / "c.pem",
             "-inkey", d / "k.pem", "-outform", "DER", "-binary", "-nodetach", *extra],
            capture_output=True, check=True,
        ).stdout  # fmt: skip


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
        assert (kept.cipher, kept.advertised, kept.entry_seq) == (
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
        assert kept is not None and (kept.cipher, kept.entry_seq) == ("aes256_cbc", later)
        # An older message filed after a newer one (another worker) changes nothing.
        capabilities.record(s, {"H26.CATP": (later - 1, GCM_FIRST)}, LATER)
        assert capabilities.cipher_for(s, "H26.CATP") == "aes256_cbc"
