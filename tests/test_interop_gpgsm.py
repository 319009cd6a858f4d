"""Interop with the real ``gpgsm`` (GnuPG's S/MIME tool), both directions (DESIGN §3).

gateway → gpgsm: a message made by :func:`build_message` decrypts with ``gpgsm --decrypt`` and
its detached signature verifies with ``gpgsm --verify``, chain to the demo root included.
gpgsm → gateway: gpgsm signs (detached) and encrypts; the pipeline accepts the message. A
control shows the pipeline refuses a gpgsm signature over content changed after signing.

gpgsm runs in a throw-away GNUPGHOME (set only in the child's environment) with CRL and policy
checks off, the demo root trusted in ``trustlist.txt``, loopback pinentry (the passphrase comes
on stdin through ``--passphrase-fd 0``) and its clock set to WORLD_AT. Assertions are on exit
status and ``--status-fd`` lines, never on gpgsm's human-readable text.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from formats.errors import SignatureInvalid
from formats.smime import build_message, payload_entity, wrap_enveloped
from gateway.demo import HUB_ADDRESS, DemoWorld
from gateway.pipeline import Context, process
from keys.issuing import Issued
from tests.conftest import WORLD_AT

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(shutil.which("gpgsm") is None, reason="gpgsm not installed"),
]

SENDER = "H26.SNV"
SENDER_EMAIL = "vanthu@snv.hanoi.gov.vn"
PASSPHRASE = b"gpgsm-interop"
#: gpgsm parses an ISO time "YYYYMMDDTHHMMSS" (UTC). Unlike gpg, gpgsm 2.2 has no trailing "!"
#: to freeze the clock: with one the string is not an ISO time, and gpgsm falls back to reading
#: the leading digits as seconds since 1970. The clock starts at WORLD_AT and runs on.
FAKED_TIME = WORLD_AT.strftime("%Y%m%dT%H%M%S")


def fingerprint(issued: Issued) -> str:
    """The SHA-1 fingerprint as gpgsm prints it in status lines (upper-case hex)."""
    return issued.cert.fingerprint(hashes.SHA1()).hex().upper()


@dataclass(frozen=True)
class Run:
    returncode: int
    status: list[list[str]]  # "[GNUPG:] KEYWORD args..." lines, split, prefix dropped
    stderr: str

    def keywords(self) -> list[str]:
        return [line[0] for line in self.status]

    def lines(self, keyword: str) -> list[list[str]]:
        return [line[1:] for line in self.status if line[0] == keyword]


@dataclass(frozen=True)
class GnupgHome:
    path: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "GNUPGHOME": str(self.path), "LC_ALL": "C"}

    def run(self, *args: str | Path) -> Run:
        """``gpgsm`` with status lines on stdout; data goes through files (``--output``)."""
        proc = subprocess.run(
            ["gpgsm", "--batch", "--no-tty", "--status-fd", "1",
             "--pinentry-mode", "loopback", "--passphrase-fd", "0",
             "--faked-system-time", FAKED_TIME, *map(str, args)],
            input=PASSPHRASE + b"\n", capture_output=True, env=self.env, timeout=60, check=False,
        )  # fmt: skip
        prefix = "[GNUPG:] "
        status = [
            line[len(prefix) :].split()
            for line in proc.stdout.decode(errors="replace").splitlines()
            if line.startswith(prefix)
        ]
        return Run(proc.returncode, status, proc.stderr.decode(errors="replace"))

    def ok(self, *args: str | Path) -> Run:
        result = self.run(*args)
        if result.returncode != 0:
            raise AssertionError(
                f"gpgsm {args[0]} exited {result.returncode}\n"
                f"status: {result.status}\nstderr: {result.stderr}"
            )
        return result

    def kill_agent(self) -> None:
        for component in ("gpg-agent", "dirmngr"):
            subprocess.run(
                ["gpgconf", "--kill", component],
                env=self.env, capture_output=True, timeout=30, check=False,
            )  # fmt: skip


def p12(issued: Issued, root: Issued, name: str) -> bytes:
    """PKCS#12 that gpgsm 2.2 can read: 3DES/SHA-1 PBE.

    GnuPG 2.2.40's PKCS#12 reader refuses what ``BestAvailableEncryption`` makes (PBES2 with
    PBKDF2-HMAC-SHA256): "encryptedData error at pkcs5PBES2-params".
    """
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
        .hmac_hash(hashes.SHA1())
        .build(PASSPHRASE)
    )
    return pkcs12.serialize_key_and_certificates(
        name.encode(),
        issued.key,  # type: ignore[arg-type]
        issued.cert,
        [root.cert],
        encryption,
    )


def p12_gpgsm_reads(issued: Issued, root: Issued, name: str, base: Path) -> bytes:
    """:func:`p12`, made again until gpgsm 2.2.40 can decrypt it.

    That gpgsm derives a wrong key from the PKCS#12 KDF for some random salts (about one file
    in twelve fails with "possibly bad passphrase given", always the same file, while
    ``openssl pkcs12`` opens it). Each candidate is tried on a throw-away GnuPG home first, and
    a refused one must open with openssl — so this never hides a file that is really broken.
    """
    for attempt in range(8):
        data = p12(issued, root, name)
        probe = GnupgHome(base / f"probe-{name}-{attempt}")
        probe.path.mkdir(mode=0o700)
        (probe.path / "gpg-agent.conf").write_text("allow-loopback-pinentry\n")
        candidate = base / f"probe-{name}-{attempt}.p12"
        candidate.write_bytes(data)
        try:
            if probe.run("--import", candidate).returncode == 0:
                return data
        finally:
            probe.kill_agent()
        opened = subprocess.run(
            ["openssl", "pkcs12", "-in", candidate, "-noout", "-legacy",
             "-passin", "pass:" + PASSPHRASE.decode()],
            capture_output=True, check=False,
        )  # fmt: skip
        assert opened.returncode == 0, f"our PKCS#12 is broken: {opened.stderr!r}"
    raise AssertionError("gpgsm refused 8 PKCS#12 files in a row that openssl opens")


@pytest.fixture(scope="module")
def gpgsm(world: DemoWorld, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GnupgHome]:
    base = tmp_path_factory.mktemp("gpgsm")
    home = GnupgHome(base / "home")
    home.path.mkdir(mode=0o700)
    (home.path / "gpgsm.conf").write_text("disable-crl-checks\ndisable-policy-checks\n")
    (home.path / "gpg-agent.conf").write_text("allow-loopback-pinentry\n")
    fpr = fingerprint(world.root)
    colons = ":".join(fpr[i : i + 2] for i in range(0, len(fpr), 2))
    (home.path / "trustlist.txt").write_text(f"{colons} S relax\n")
    try:
        (base / "root.der").write_bytes(world.root.cert.public_bytes(serialization.Encoding.DER))
        imported = home.ok("--import", base / "root.der")
        assert ["1", fpr] in imported.lines("IMPORT_OK")
        for name, issued in (("hub", world.hub), (SENDER, world.agencies[SENDER])):
            (base / f"{name}.p12").write_bytes(p12_gpgsm_reads(issued, world.root, name, base))
            imported = home.ok("--import", base / f"{name}.p12")
            assert ["1", fingerprint(issued)] in imported.lines("IMPORT_OK"), imported
            # IMPORT_RES field 11 is "secret keys imported".
            assert imported.lines("IMPORT_RES")[0][10] == "1", imported
        yield home
    finally:
        home.kill_agent()


def payload_xml(world: DemoWorld) -> bytes:
    raw = world.submission(SENDER)
    opened = process(raw, world.context(), at=WORLD_AT).opened
    assert opened is not None
    return opened.payload


def body_of(message: bytes) -> bytes:
    """The base64 body of an RFC 5322 message whose only body is base64, decoded."""
    _, _, body = message.partition(b"\r\n\r\n")
    return base64.b64decode(body, validate=False)


def split_signed(entity: bytes) -> tuple[bytes, bytes]:
    """(signed content, signature DER) of a CRLF multipart/signed entity (RFC 1847)."""
    head, _, body = entity.partition(b"\r\n\r\n")
    boundary = re.search(rb'boundary="?([^";\r\n]+)"?', head)
    assert boundary is not None, head
    delimiter = b"--" + boundary.group(1)
    _, content, signature, *_ = body.split(delimiter)
    assert content.startswith(b"\r\n") and content.endswith(b"\r\n")
    sig_part = signature[2:-2]
    assert b"application/pkcs7-signature" in sig_part.partition(b"\r\n\r\n")[0].lower()
    return content[2:-2], body_of(sig_part)


def multipart_signed(content: bytes, signature_der: bytes) -> bytes:
    """An RFC 1847 / RFC 8551 §3.5.3 entity around ``content`` exactly as it was signed."""
    boundary = b"gpgsm-interop-" + uuid.uuid4().hex.encode()
    b64 = base64.encodebytes(signature_der).replace(b"\n", b"\r\n")
    return (
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; '
        b'micalg=sha-256; boundary="' + boundary + b'"\r\n\r\n'
        b"This is a cryptographically signed message in MIME format.\r\n\r\n"
        b"--" + boundary + b"\r\n" + content + b"\r\n"
        b"--" + boundary + b"\r\n"
        b'Content-Type: application/pkcs7-signature; name="smime.p7s"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="smime.p7s"\r\n\r\n' + b64 + b"\r\n"
        b"--" + boundary + b"--\r\n"
    )


def gpgsm_sign(gpgsm: GnupgHome, signer: Issued, entity: bytes, work: Path) -> bytes:
    (work / "entity").write_bytes(entity)
    signed = gpgsm.ok(
        "--sign", "--detach-sign", "--digest-algo", "SHA256", "--local-user",
        fingerprint(signer), "--output", work / "entity.p7s", work / "entity",
    )  # fmt: skip
    # SIG_CREATED type pubkey-algo hash-algo class time fpr: detached, RSA, SHA-256.
    [created] = signed.lines("SIG_CREATED")
    assert created[:3] == ["D", "1", "8"], signed
    assert created[-1] == fingerprint(signer), signed
    return (work / "entity.p7s").read_bytes()


def gpgsm_encrypt(gpgsm: GnupgHome, hub: Issued, data: bytes, work: Path, *opts: str) -> bytes:
    (work / "signed.mime").write_bytes(data)
    gpgsm.ok(
        "--encrypt", *opts, "--recipient", fingerprint(hub),
        "--output", work / "enveloped.der", work / "signed.mime",
    )  # fmt: skip
    return (work / "enveloped.der").read_bytes()


def wrap(der: bytes) -> bytes:
    return wrap_enveloped(
        der,
        smime_type="enveloped-data",
        from_addr=SENDER_EMAIL,
        to_addrs=[HUB_ADDRESS],
        message_id=f"<{uuid.uuid4()}@snv.hanoi.gov.vn>",
        date=WORLD_AT,
        subject="gpgsm interop",
    )


# --- gateway → gpgsm ----------------------------------------------------------------------------


def test_our_submission_opens_with_gpgsm(
    world: DemoWorld, gpgsm: GnupgHome, tmp_path: Path
) -> None:
    signer = world.agencies[SENDER]
    xml = '<?xml version="1.0" encoding="UTF-8"?>\n<note>xin chào</note>\n'.encode()
    raw = build_message(
        xml,
        signer_cert=signer.cert,
        signer_key=signer.key,  # type: ignore[arg-type]
        recipients=[world.hub.cert],
        from_addr=SENDER_EMAIL,
        to_addrs=[HUB_ADDRESS],
        message_id="<interop-gpgsm@snv.hanoi.gov.vn>",
        date=WORLD_AT,
    )
    (tmp_path / "msg.p7m").write_bytes(body_of(raw))

    decrypted = gpgsm.ok("--decrypt", "--output", tmp_path / "signed.mime", tmp_path / "msg.p7m")
    assert "DECRYPTION_OKAY" in decrypted.keywords(), decrypted
    # gpgsm 2.2 names the recipient by the last 16 hex digits of its keygrip, not the cert.
    assert len(decrypted.lines("ENC_TO")) == 1, decrypted
    assert "DECRYPTION_FAILED" not in decrypted.keywords(), decrypted

    content, sig_der = split_signed((tmp_path / "signed.mime").read_bytes())
    (tmp_path / "content").write_bytes(content)
    (tmp_path / "smime.p7s").write_bytes(sig_der)
    verified = gpgsm.ok("--verify", tmp_path / "smime.p7s", tmp_path / "content")
    assert [line[0] for line in verified.lines("GOODSIG")] == [fingerprint(signer)], verified
    validsig = verified.lines("VALIDSIG")
    assert len(validsig) == 1, verified
    # VALIDSIG fpr date time expires version reserved pubkey-algo hash-algo class: RSA, SHA-256.
    assert validsig[0][0] == fingerprint(signer), verified
    assert validsig[0][6:8] == ["1", "8"], verified
    # The chain ends at the root marked trusted in trustlist.txt.
    assert "TRUST_FULLY" in verified.keywords(), verified
    assert "BADSIG" not in verified.keywords(), verified
    assert "ERRSIG" not in verified.keywords(), verified
    assert content == payload_entity(xml)


# --- gpgsm → gateway ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cipher_opts", "expected_cipher"),
    [((), None), (("--cipher-algo", "AES256"), "aes256_cbc")],
    ids=["gpgsm-default-cipher", "aes256"],
)
def test_gpgsm_made_submission_is_accepted(
    world: DemoWorld,
    world_ctx: Context,
    gpgsm: GnupgHome,
    tmp_path: Path,
    cipher_opts: tuple[str, ...],
    expected_cipher: str | None,
) -> None:
    xml = payload_xml(world)
    entity = payload_entity(xml)
    sig_der = gpgsm_sign(gpgsm, world.agencies[SENDER], entity, tmp_path)
    der = gpgsm_encrypt(gpgsm, world.hub, multipart_signed(entity, sig_der), tmp_path, *cipher_opts)

    verdict = process(wrap(der), world_ctx, at=WORLD_AT)

    assert verdict.errors == ()
    assert verdict.accepted
    assert verdict.opened is not None
    assert verdict.opened.payload == xml
    assert verdict.opened.signature.content == entity
    assert verdict.opened.style == "detached"
    assert verdict.opened.key_transport == "rsaes_pkcs1v15"
    assert verdict.opened.cipher.startswith("aes")
    if expected_cipher is not None:
        assert verdict.opened.cipher == expected_cipher
    assert verdict.opened.signer == world.agencies[SENDER].cert


def test_gpgsm_signature_over_altered_content_is_refused(
    world: DemoWorld, world_ctx: Context, gpgsm: GnupgHome, tmp_path: Path
) -> None:
    """The control for the test above: the pipeline really checks what gpgsm signed."""
    xml = payload_xml(world)
    entity = payload_entity(xml)
    sig_der = gpgsm_sign(gpgsm, world.agencies[SENDER], entity, tmp_path)
    # A signed record changed after signing: the MIME structure stays, only the XML differs.
    assert xml.count(b"HN-2026-004512") == 1
    altered = payload_entity(xml.replace(b"HN-2026-004512", b"HN-2026-004513"))
    assert altered != entity

    # gpgsm itself agrees the signature no longer matches.
    (tmp_path / "altered").write_bytes(altered)
    (tmp_path / "altered.p7s").write_bytes(sig_der)
    checked = gpgsm.run("--verify", tmp_path / "altered.p7s", tmp_path / "altered")
    assert checked.returncode != 0
    assert "BADSIG" in checked.keywords(), checked
    assert "VALIDSIG" not in checked.keywords(), checked

    der = gpgsm_encrypt(gpgsm, world.hub, multipart_signed(altered, sig_der), tmp_path)
    verdict = process(wrap(der), world_ctx, at=WORLD_AT)

    assert not verdict.accepted
    assert [type(e) for e in verdict.errors] == [SignatureInvalid]
