"""The thin edge: certificates, keys and CRLs read from files.

Each loader reads one file and returns values for the pure core. Every failure is an
:class:`~formats.errors.InputError` whose message is one line naming the file and what is
wrong with it (wrong passphrase, not a certificate, ...).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from asn1crypto import keys as asn1_keys
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7, pkcs12

from formats.errors import InputError
from keys.issuing import PrivateKey

_PEM_CERT = b"-----BEGIN CERTIFICATE-----"
_PEM_PKCS7 = (b"-----BEGIN PKCS7-----", b"-----BEGIN CMS-----")


@dataclass(frozen=True)
class KeyBundle:
    """What a PKCS#12 file holds: a key, its certificate, and the CA chain that came along."""

    key: PrivateKey
    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...]


def load_certificates(path: str | Path) -> list[x509.Certificate]:
    """All certificates in a PEM file (one or many), a DER certificate, or a PKCS#7 bundle."""
    path, data = _read(path)
    try:
        if any(marker in data for marker in _PEM_PKCS7):
            certs = _pkcs7(data.replace(b" CMS-", b" PKCS7-"), pem=True)
        elif _PEM_CERT in data:
            certs = x509.load_pem_x509_certificates(data)
        elif data.lstrip().startswith(b"-----BEGIN"):
            raise ValueError("PEM without a CERTIFICATE or PKCS7 block")
        else:
            certs = _load_der_certificates(data)
    except ValueError as exc:
        raise InputError(
            f"{path.name}: not a certificate file (expected PEM, DER or PKCS#7): {_why(exc)}"
        ) from None
    if not certs:
        raise InputError(f"{path.name}: contains no certificate")
    return list(certs)


def load_private_key(path: str | Path, passphrase: bytes | None = None) -> PrivateKey:
    """A PEM or DER private key (PKCS#8 or traditional), decrypted with ``passphrase``.

    Load keys once: parsing an RSA-3072 key costs ~90 ms (DESIGN §3).
    """
    path, data = _read(path)
    pem = data.lstrip().startswith(b"-----BEGIN")
    if pem and b"PRIVATE KEY-----" not in data:
        raise InputError(f"{path.name}: not a private key (no PRIVATE KEY block)")
    loader = serialization.load_pem_private_key if pem else serialization.load_der_private_key
    try:
        key = loader(data, password=passphrase)
    except TypeError as exc:  # passphrase missing, or given for an unencrypted key
        if passphrase is None:
            raise InputError(f"{path.name}: the key is encrypted; give its passphrase") from None
        raise InputError(f"{path.name}: the key is not encrypted; omit the passphrase") from exc
    except ValueError as exc:
        encrypted = _encrypted_key(data, pem=pem)
        raise InputError(f"{path.name}: {_key_error(exc, passphrase, encrypted)}") from None
    return _supported(path, key)


def _encrypted_key(data: bytes, *, pem: bool) -> bool:
    """Whether ``data`` holds an encrypted private key (PKCS#8 EncryptedPrivateKeyInfo, or a
    traditional PEM key with its Proc-Type header)."""
    if pem:
        return b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data or b"Proc-Type: 4,ENCRYPTED" in data
    try:
        info = asn1_keys.EncryptedPrivateKeyInfo.load(data, strict=True)
        info["encryption_algorithm"]["algorithm"].native  # noqa: B018 — parses it, or raises
    except (ValueError, TypeError, KeyError):
        return False
    return True


def load_crl(path: str | Path) -> x509.CertificateRevocationList:
    """A CRL in PEM or DER."""
    path, data = _read(path)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise InputError(f"{path.name}: not a CRL (expected PEM or DER): {_why(exc)}") from None


def load_pkcs12(path: str | Path, passphrase: bytes | None) -> KeyBundle:
    """A PKCS#12 (.p12/.pfx) file holding one key, its certificate and optional CA chain."""
    path, data = _read(path)
    try:
        loaded = pkcs12.load_pkcs12(data, passphrase)
    except ValueError:
        raise InputError(
            f"{path.name}: cannot open the PKCS#12 file — wrong passphrase, or not a PKCS#12 file"
        ) from None
    if loaded.key is None or loaded.cert is None:
        missing = "private key" if loaded.key is None else "certificate"
        raise InputError(f"{path.name}: the PKCS#12 file holds no {missing}")
    key = _supported(path, loaded.key)
    if loaded.cert.certificate.public_key() != key.public_key():
        raise InputError(f"{path.name}: the certificate does not belong to the private key")
    chain = tuple(c.certificate for c in loaded.additional_certs)
    return KeyBundle(key=key, cert=loaded.cert.certificate, chain=chain)


# --- helpers ----------------------------------------------------------------------------------


def _read(path: str | Path) -> tuple[Path, bytes]:
    path = Path(path)
    try:
        return path, path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path.name}: no such file ({path})") from None
    except IsADirectoryError:
        raise InputError(f"{path.name}: is a directory, not a file") from None
    except PermissionError:
        raise InputError(f"{path.name}: permission denied") from None
    except OSError as exc:
        raise InputError(f"{path.name}: cannot be read ({exc.strerror})") from None


def _load_der_certificates(data: bytes) -> list[x509.Certificate]:
    try:
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        return _pkcs7(data, pem=False)


def _pkcs7(data: bytes, *, pem: bool) -> list[x509.Certificate]:
    # `openssl crl2pkcs7` writes the certificate SET unsorted (BER, not DER); cryptography then
    # parses it as BER and warns. Such files are ordinary, so accept them quietly.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "PKCS#7 certificates could not be parsed as DER")
        if pem:
            return pkcs7.load_pem_pkcs7_certificates(data)
        return pkcs7.load_der_pkcs7_certificates(data)


def _supported(path: Path, key: object) -> PrivateKey:
    if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        return key
    raise InputError(f"{path.name}: a {type(key).__name__} key; only RSA and EC keys are used")


def _key_error(exc: ValueError, passphrase: bytes | None, encrypted: bool) -> str:
    """What a key that did not load means. An encrypted key that the library says it could
    not deserialize, a passphrase given, is a wrong passphrase: with a wrong key, decryption
    yields a valid padding about once in 270 tries, and the garbage then fails to parse. (A
    cipher the library lacks says so, and is reported as it says.)"""
    text = str(exc).lower()
    garbled = encrypted and "could not deserialize" in text  # (not an unknown cipher, say)
    if passphrase is not None and (garbled or "decrypt" in text or "password" in text):
        return "wrong passphrase"
    return f"not a private key (expected PEM or DER, PKCS#8 or traditional): {_why(exc)}"


def _why(exc: Exception) -> str:
    first = str(exc).strip().splitlines()
    return first[0] if first else type(exc).__name__
