"""keys.files: reading certificates, keys, CRLs and PKCS#12 files, and saying what is wrong."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7, pkcs12

from formats.errors import InputError
from keys.files import load_certificates, load_crl, load_pkcs12, load_private_key
from tests.pki import Pki, write_pem

PASS = b"correct horse"


def test_pem_with_several_certificates(tmp_path: Path, pki: Pki) -> None:
    path = write_pem(tmp_path / "chain.pem", pki.agency.cert, pki.inter.cert, pki.root.cert)
    assert load_certificates(path) == [pki.agency.cert, pki.inter.cert, pki.root.cert]


def test_der_certificate(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "root.cer"
    path.write_bytes(pki.root.cert.public_bytes(Encoding.DER))
    assert load_certificates(path) == [pki.root.cert]


@pytest.mark.parametrize("encoding", [Encoding.PEM, Encoding.DER])
def test_pkcs7_bundle(tmp_path: Path, pki: Pki, encoding: Encoding) -> None:
    path = tmp_path / "bundle.p7b"
    path.write_bytes(pkcs7.serialize_certificates([pki.inter.cert, pki.root.cert], encoding))
    assert set(load_certificates(path)) == {pki.inter.cert, pki.root.cert}


@pytest.mark.interop
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI missing")
def test_pkcs7_bundle_made_by_openssl(tmp_path: Path, pki: Pki) -> None:
    chain = write_pem(tmp_path / "chain.pem", pki.inter.cert, pki.root.cert)
    out = tmp_path / "bundle.p7b"
    subprocess.run(
        ["openssl", "crl2pkcs7", "-nocrl", "-certfile", str(chain), "-out", str(out)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    assert set(load_certificates(out)) == {pki.inter.cert, pki.root.cert}


def test_not_a_certificate(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"hello")
    with pytest.raises(InputError, match=r"^notes\.txt: not a certificate file") as caught:
        load_certificates(path)
    assert "\n" not in caught.value.message


def test_pem_key_is_not_a_certificate(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(pki.agency.key_pem())
    with pytest.raises(InputError, match=r"key\.pem: not a certificate file"):
        load_certificates(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"^absent\.pem: no such file"):
        load_certificates(tmp_path / "absent.pem")
    with pytest.raises(InputError, match="is a directory"):
        load_crl(tmp_path)


def test_private_key_round_trip(tmp_path: Path, pki: Pki) -> None:
    plain = tmp_path / "plain.pem"
    plain.write_bytes(pki.agency.key_pem())
    locked = tmp_path / "locked.pem"
    locked.write_bytes(pki.agency.key_pem(PASS))
    der = tmp_path / "key.der"
    der.write_bytes(
        pki.agency.key.private_bytes(
            Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    public = pki.agency.key.public_key()
    assert load_private_key(plain).public_key() == public
    assert load_private_key(locked, PASS).public_key() == public
    assert load_private_key(der).public_key() == public


@pytest.mark.parametrize("form", ["pkcs8-pem", "traditional-pem", "pkcs8-der"])
def test_a_wrong_passphrase_is_named_whatever_the_library_says(
    tmp_path: Path, pki: Pki, form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decrypted with a wrong passphrase, an encrypted key's padding comes out valid about once
    in 270 tries; the garbage then fails to parse, and the library says "Could not deserialize
    key data", which read as "not a private key". It is a wrong passphrase."""
    key = pki.agency.key
    pem = (
        serialization.PrivateFormat.PKCS8
        if form != "traditional-pem"
        else (serialization.PrivateFormat.TraditionalOpenSSL)
    )
    encoding = serialization.Encoding.DER if form == "pkcs8-der" else serialization.Encoding.PEM
    path = tmp_path / "locked.key"
    path.write_bytes(key.private_bytes(encoding, pem, serialization.BestAvailableEncryption(PASS)))

    def garbled(*_args: Any, **_kw: Any) -> Any:
        raise ValueError("Could not deserialize key data. The data may be in an incorrect format")

    monkeypatch.setattr(serialization, "load_pem_private_key", garbled)
    monkeypatch.setattr(serialization, "load_der_private_key", garbled)
    with pytest.raises(InputError, match=r"^locked\.key: wrong passphrase$"):
        load_private_key(path, b"nope")
    plain = tmp_path / "plain.key"
    plain.write_bytes(b"not a key at all")
    with pytest.raises(InputError, match="not a private key"):
        load_private_key(plain, b"nope")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_a_key_under_a_cipher_the_library_lacks_is_not_a_wrong_passphrase(
    tmp_path: Path, pki: Pki
) -> None:
    """Encrypted with Camellia, the right passphrase given: the library cannot decrypt it at
    all. Saying "wrong passphrase" would send the admin looking for another one."""
    plain = tmp_path / "plain.pem"
    plain.write_bytes(pki.agency.key_pem())
    locked = tmp_path / "camellia.pem"
    subprocess.run(
        ["openssl", "pkcs8", "-topk8", "-v2", "camellia-256-cbc", "-in", plain, "-out", locked,
         "-passout", "pass:" + PASS.decode()],
        check=True, capture_output=True,
    )  # fmt: skip
    with pytest.raises(InputError) as refused:
        load_private_key(locked, PASS)
    assert "wrong passphrase" not in refused.value.message
    assert "not a private key" in refused.value.message


def test_private_key_passphrase_errors(tmp_path: Path, pki: Pki) -> None:
    locked = tmp_path / "locked.pem"
    locked.write_bytes(pki.agency.key_pem(PASS))
    plain = tmp_path / "plain.pem"
    plain.write_bytes(pki.agency.key_pem())
    with pytest.raises(InputError, match=r"^locked\.pem: wrong passphrase$"):
        load_private_key(locked, b"nope")
    with pytest.raises(InputError, match="encrypted; give its passphrase"):
        load_private_key(locked)
    with pytest.raises(InputError, match="not encrypted; omit the passphrase"):
        load_private_key(plain, PASS)


def test_certificate_is_not_a_private_key(tmp_path: Path, pki: Pki) -> None:
    path = write_pem(tmp_path / "cert.pem", pki.agency.cert)
    with pytest.raises(InputError, match=r"cert\.pem: not a private key"):
        load_private_key(path)
    junk = tmp_path / "junk.der"
    junk.write_bytes(b"\x30\x03\x02\x01\x00")
    with pytest.raises(InputError, match=r"junk\.der: not a private key"):
        load_private_key(junk)


@pytest.mark.parametrize("encoding", [Encoding.PEM, Encoding.DER])
def test_crl(tmp_path: Path, pki: Pki, encoding: Encoding) -> None:
    path = tmp_path / "inter.crl"
    path.write_bytes(pki.inter_crl.public_bytes(encoding))
    assert load_crl(path) == pki.inter_crl


def test_not_a_crl(tmp_path: Path, pki: Pki) -> None:
    path = write_pem(tmp_path / "cert.pem", pki.root.cert)
    with pytest.raises(InputError, match=r"cert\.pem: not a CRL"):
        load_crl(path)


def test_pkcs12(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "agency.p12"
    path.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"agency",
            pki.agency.key,
            pki.agency.cert,
            [pki.inter.cert],
            serialization.BestAvailableEncryption(PASS),
        )
    )
    bundle = load_pkcs12(path, PASS)
    assert bundle.cert == pki.agency.cert
    assert bundle.chain == (pki.inter.cert,)
    assert bundle.key.public_key() == pki.agency.key.public_key()
    with pytest.raises(InputError, match=r"^agency\.p12: cannot open .* wrong passphrase"):
        load_pkcs12(path, b"nope")


def test_pkcs12_without_key(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "certs.p12"
    path.write_bytes(
        pkcs12.serialize_key_and_certificates(
            None, None, None, [pki.root.cert], serialization.NoEncryption()
        )
    )
    with pytest.raises(InputError, match="holds no private key"):
        load_pkcs12(path, None)
