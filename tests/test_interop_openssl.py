"""Interop with the real ``openssl cms`` CLI, both directions (DESIGN §3).

openssl → gateway: openssl signs (detached, opaque, RSA-PSS, ECDSA) and encrypts (AES-256-CBC,
AES-256-GCM AuthEnvelopedData, RSA-OAEP key transport); the pipeline must accept every one.
gateway → openssl: every profile variant we build must decrypt with ``openssl cms -decrypt``
and verify, chain included, with ``openssl cms -verify -CAfile root``.
"""

from __future__ import annotations

import base64
import itertools
import os
import shutil
import subprocess
import uuid
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest

from formats.payload import Attachment as Listed
from formats.payload import Organ, build_payload
from formats.smime import Attachment, build_message, payload_entity
from gateway.demo import HUB_ADDRESS, DemoWorld
from gateway.pipeline import Context, process
from keys.issuing import Issued, issue_agency
from tests.conftest import WORLD_AT

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed"),
]

SENDER = "H26.SNV"
SENDER_EMAIL = "vanthu@snv.hanoi.gov.vn"


def openssl(*args: str | Path, input: bytes | None = None) -> bytes:
    proc = subprocess.run(
        ["openssl", *map(str, args)], input=input, capture_output=True, check=False
    )
    if proc.returncode != 0:
        raise AssertionError(f"openssl {args[:2]} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


@pytest.fixture(scope="module")
def ec_signer(world: DemoWorld) -> Issued:
    return issue_agency(
        world.root,
        email=SENDER_EMAIL,
        organ_id=SENDER,
        common_name="Hanoi Department of Home Affairs (ECDSA)",
        at=world.at,
        key_kind="ec-p256",
    )


@pytest.fixture(scope="module")
def files(world: DemoWorld, ec_signer: Issued, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("openssl")
    (d / "root.pem").write_bytes(world.root.cert_pem())
    (d / "hub.pem").write_bytes(world.hub.cert_pem())
    (d / "hub.key").write_bytes(world.hub.key_pem())
    (d / "rsa.pem").write_bytes(world.agencies[SENDER].cert_pem())
    (d / "rsa.key").write_bytes(world.agencies[SENDER].key_pem())
    (d / "ec.pem").write_bytes(ec_signer.cert_pem())
    (d / "ec.key").write_bytes(ec_signer.key_pem())
    return d


def payload_xml(world: DemoWorld) -> bytes:
    raw = world.submission(SENDER)
    opened = process(raw, world.context(), at=WORLD_AT).opened
    assert opened is not None
    return opened.payload


SIGNING = {
    "detached-rsa": ("rsa", []),
    "detached-rsa-keyid": ("rsa", ["-keyid"]),  # the signer named by its key identifier
    "opaque-rsa": ("rsa", ["-nodetach"]),
    "detached-pss": ("rsa", ["-keyopt", "rsa_padding_mode:pss"]),
    "detached-ecdsa": ("ec", []),
    "opaque-ecdsa": ("ec", ["-nodetach"]),
}
ENCRYPTION = {
    "aes256-cbc": ["-aes-256-cbc"],
    "aes256-cbc-keyid": ["-aes-256-cbc", "-keyid"],  # the hub named by its key identifier
    "aes256-gcm": ["-aes-256-gcm"],
    "oaep": ["-aes-256-cbc", "-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256"],
}


@pytest.mark.parametrize(("sig", "enc"), list(itertools.product(SIGNING, ENCRYPTION)), ids="-".join)
def test_openssl_made_submission_is_accepted(
    world: DemoWorld, world_ctx: Context, files: Path, tmp_path: Path, sig: str, enc: str
) -> None:
    key_name, sign_opts = SIGNING[sig]
    xml = payload_xml(world)
    (tmp_path / "entity").write_bytes(payload_entity(xml))
    signed = openssl(
        "cms", "-sign", "-md", "sha256", "-in", tmp_path / "entity",
        "-signer", files / f"{key_name}.pem", "-inkey", files / f"{key_name}.key", *sign_opts,
    )  # fmt: skip
    (tmp_path / "signed").write_bytes(signed)
    recip_opts = ENCRYPTION[enc]
    cipher, keyopts = recip_opts[0], recip_opts[1:]
    encrypted = openssl(
        "cms", "-encrypt", "-in", tmp_path / "signed", cipher,
        "-from", SENDER_EMAIL, "-to", HUB_ADDRESS, "-subject", "openssl interop",
        "-recip", files / "hub.pem", *keyopts,
    )  # fmt: skip
    raw = f"Message-ID: <{uuid.uuid4()}@snv.hanoi.gov.vn>\n".encode() + encrypted

    verdict = process(raw, world_ctx, at=WORLD_AT)

    assert verdict.errors == ()
    assert verdict.accepted
    assert verdict.opened is not None
    assert verdict.opened.payload == xml
    assert verdict.opened.style == ("opaque" if "-nodetach" in sign_opts else "detached")
    expected_cipher = "aes256_gcm" if enc == "aes256-gcm" else "aes256_cbc"
    assert verdict.opened.cipher == expected_cipher
    assert verdict.opened.key_transport == ("rsaes_oaep" if enc == "oaep" else "rsaes_pkcs1v15")
    if sig == "detached-pss":
        assert verdict.opened.signature.signature_algorithm == "rsassa_pss"


def document_with_scan(world: DemoWorld, scan: Attachment) -> bytes:
    """A document payload whose manifest lists ``scan`` (so the message can be large)."""
    return build_payload(
        "document",
        sender=Organ(SENDER, None, SENDER_EMAIL),
        recipients=[Organ("H26.CATP")],
        records=[{"DocumentType": "Công văn", "Summary": "Gửi kèm bản quét", "PageCount": 40}],
        document_number="9/SNV-VP",
        issued_on=WORLD_AT.date(),
        message_id=uuid.uuid4(),
        attachments=[
            Listed(scan.filename, scan.media_type, len(scan.data), sha256(scan.data).hexdigest())
        ],
    ).to_xml()


@pytest.mark.parametrize("sign_opts", [[], ["-nodetach"]], ids=["detached", "opaque"])
def test_openssl_streamed_submission_is_accepted(
    world: DemoWorld, world_ctx: Context, files: Path, tmp_path: Path, sign_opts: list[str]
) -> None:
    """``openssl cms -stream`` writes BER: indefinite lengths, and the content (signed opaque
    content, ciphertext) in segments. A 3 MiB scan makes hundreds of them: the walker's cap on
    elements per byte carried (formats/der.py) must let every one through."""
    scan = Attachment("ban-quet.pdf", "application/pdf", os.urandom(3 * 1024 * 1024))
    xml = document_with_scan(world, scan)
    (tmp_path / "entity").write_bytes(payload_entity(xml, [scan]))
    signed = openssl(
        "cms", "-sign", "-stream", "-binary", "-md", "sha256", "-in", tmp_path / "entity",
        "-signer", files / "rsa.pem", "-inkey", files / "rsa.key", *sign_opts,
    )  # fmt: skip
    (tmp_path / "signed").write_bytes(signed)
    encrypted = openssl(
        "cms", "-encrypt", "-stream", "-binary", "-in", tmp_path / "signed", "-aes-256-cbc",
        "-from", SENDER_EMAIL, "-to", HUB_ADDRESS, "-subject", "openssl interop (stream)",
        "-recip", files / "hub.pem",
    )  # fmt: skip
    raw = f"Message-ID: <{uuid.uuid4()}@snv.hanoi.gov.vn>\n".encode() + encrypted
    der = base64.b64decode(encrypted.split(b"\n\n", 1)[1])
    assert der.startswith(b"\x30\x80")  # BER, indefinite lengths
    assert der.count(b"\x04\x82\x10\x00") > 700  # ciphertext in 4096-byte segments

    verdict = process(raw, world_ctx, at=WORLD_AT)

    assert verdict.errors == ()
    assert verdict.accepted
    assert verdict.opened is not None
    assert verdict.opened.style == ("opaque" if sign_opts else "detached")
    assert verdict.opened.attachments == (scan,)


OURS = {
    "detached-rsa-cbc": {},
    "opaque-rsa-cbc": {"detached": False},
    "detached-pss-cbc": {"pss": True},
    "detached-rsa-gcm": {"cipher": "aes256_gcm"},
    "detached-rsa-oaep": {"oaep": True},
    "opaque-pss-gcm-oaep": {"detached": False, "pss": True, "cipher": "aes256_gcm", "oaep": True},
    "detached-ecdsa-cbc": {"ec": True},
    "opaque-ecdsa-gcm": {"ec": True, "detached": False, "cipher": "aes256_gcm"},
}


@pytest.mark.parametrize("variant", list(OURS))
def test_our_submission_opens_with_openssl(
    world: DemoWorld, ec_signer: Issued, files: Path, tmp_path: Path, variant: str
) -> None:
    options = dict(OURS[variant])
    signer = ec_signer if options.pop("ec", False) else world.agencies[SENDER]
    xml = '<?xml version="1.0" encoding="UTF-8"?>\n<note>xin chào</note>\n'.encode()
    raw = build_message(
        xml,
        signer_cert=signer.cert,
        signer_key=signer.key,  # type: ignore[arg-type]
        recipients=[world.hub.cert],
        from_addr=SENDER_EMAIL,
        to_addrs=[HUB_ADDRESS],
        message_id="<interop@snv.hanoi.gov.vn>",
        date=WORLD_AT,
        **options,  # type: ignore[arg-type]
    )
    (tmp_path / "msg.eml").write_bytes(raw)

    decrypted = openssl(
        "cms", "-decrypt", "-in", tmp_path / "msg.eml",
        "-recip", files / "hub.pem", "-inkey", files / "hub.key",
    )  # fmt: skip
    (tmp_path / "signed.eml").write_bytes(decrypted)
    content = openssl(
        "cms", "-verify", "-in", tmp_path / "signed.eml",
        "-CAfile", files / "root.pem", "-purpose", "smimesign",
        "-attime", str(int(WORLD_AT.timestamp())),
    )  # fmt: skip

    body = content.split(b"\r\n\r\n", 1)[1]
    assert base64.b64decode(body) == xml


@pytest.mark.parametrize("curve", ["ec-p256", "ec-p384"])
@pytest.mark.parametrize("options", [{}, {"cipher": "aes256_gcm"}, {"oaep": True}], ids=str)
def test_our_message_to_an_ec_recipient_opens_with_openssl(
    world: DemoWorld, files: Path, tmp_path: Path, curve: str, options: dict[str, Any]
) -> None:
    """What the hub sends an agency whose encryption certificate is EC (a receipt, a
    delivery): ECDH key agreement (RFC 5753) next to RSA key transport in one envelope. openssl
    opens it with either recipient's key; with neither, not at all."""
    police = issue_agency(
        world.root, email="pa08@congan.hanoi.gov.vn", organ_id="H26.CATP",
        common_name=f"Police ({curve})", at=world.at, key_kind=curve,  # type: ignore[arg-type]
    )  # fmt: skip
    (tmp_path / "ec.pem").write_bytes(police.cert_pem())
    (tmp_path / "ec.key").write_bytes(police.key_pem())
    signer = world.agencies[SENDER]
    raw = build_message(
        b"<note>receipt</note>",
        signer_cert=signer.cert,
        signer_key=signer.key,  # type: ignore[arg-type]
        recipients=[police.cert, world.agencies[SENDER].cert],
        from_addr=SENDER_EMAIL,
        to_addrs=["pa08@congan.hanoi.gov.vn"],
        message_id="<interop-ec@snv.hanoi.gov.vn>",
        date=WORLD_AT,
        **options,
    )
    (tmp_path / "msg.eml").write_bytes(raw)
    for cert, key in (
        (tmp_path / "ec.pem", tmp_path / "ec.key"),
        (files / "rsa.pem", files / "rsa.key"),
    ):
        signed = openssl(
            "cms", "-decrypt", "-in", tmp_path / "msg.eml", "-recip", cert, "-inkey", key
        )
        (tmp_path / "signed.eml").write_bytes(signed)
        content = openssl(
            "cms", "-verify", "-in", tmp_path / "signed.eml", "-CAfile", files / "root.pem",
            "-purpose", "smimesign", "-attime", str(int(WORLD_AT.timestamp())),
        )  # fmt: skip
        assert base64.b64decode(content.split(b"\r\n\r\n", 1)[1]) == b"<note>receipt</note>"
    with pytest.raises(AssertionError, match="failed"):
        openssl("cms", "-decrypt", "-in", tmp_path / "msg.eml", "-recip", files / "ec.pem",
                "-inkey", files / "ec.key")  # fmt: skip


def test_openssl_rejects_our_message_when_tampered(
    world: DemoWorld, files: Path, tmp_path: Path
) -> None:
    """The control for the test above: openssl really checks what we sign."""
    signer = world.agencies[SENDER]
    raw = build_message(
        b"<note>original</note>",
        signer_cert=signer.cert,
        signer_key=signer.key,  # type: ignore[arg-type]
        recipients=[world.hub.cert],
        from_addr=SENDER_EMAIL,
        to_addrs=[HUB_ADDRESS],
        message_id="<interop-tamper@snv.hanoi.gov.vn>",
        date=WORLD_AT,
    )
    (tmp_path / "msg.eml").write_bytes(raw)
    decrypted = openssl(
        "cms", "-decrypt", "-in", tmp_path / "msg.eml",
        "-recip", files / "hub.pem", "-inkey", files / "hub.key",
    )  # fmt: skip
    original = base64.b64encode(b"<note>original</note>")
    forged = base64.b64encode(b"<note>forged!!</note>")
    assert original in decrypted
    (tmp_path / "signed.eml").write_bytes(decrypted.replace(original, forged))
    proc = subprocess.run(
        ["openssl", "cms", "-verify", "-in", str(tmp_path / "signed.eml"),
         "-CAfile", str(files / "root.pem"), "-attime", str(int(WORLD_AT.timestamp()))],
        capture_output=True, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert (
        b"digest failure" in proc.stderr.lower() or b"verification failure" in proc.stderr.lower()
    )
