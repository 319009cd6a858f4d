"""The algorithm allow-list of our S/MIME profile (DESIGN §3).

Everything not listed is refused *before* any expensive work (an RSA operation, a decryption),
with a message that names the algorithm and what to use instead. Names are asn1crypto's.

* Digests: SHA-256/384/512 (RFC 8551 §2.1 requires SHA-256 support; SHA-1 and MD5 are refused).
* Signatures: RSA PKCS#1 v1.5, RSA-PSS (RFC 4056), ECDSA on P-256/P-384 (RFC 5753).
* Content encryption: AES-CBC (RFC 3565) and AES-GCM AuthEnvelopedData (RFC 5083/5084).
  Outbound, AES-256-CBC by default, AES-256-GCM to a partner whose signatures advertise it
  (:func:`outbound_cipher`).
* Key transport: RSA PKCS#1 v1.5 and RSA-OAEP with SHA-256 or better (RFC 3560).
* RSA keys of at least 2048 bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from formats.errors import KeyTooSmall, WeakAlgorithm

MIN_RSA_BITS: Final = 2048
ALLOWED_CURVES: Final = ("secp256r1", "secp384r1")

_DIGESTS: Final[dict[str, type[hashes.HashAlgorithm]]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}

#: Combined signature OIDs (sha256_rsa …) name their digest; plain ones (rsassa_pkcs1v15) do not.
_SIGNATURES: Final = {
    "rsassa_pkcs1v15": "rsa",
    "sha256_rsa": "rsa",
    "sha384_rsa": "rsa",
    "sha512_rsa": "rsa",
    "rsassa_pss": "pss",
    "ecdsa": "ecdsa",
    "sha256_ecdsa": "ecdsa",
    "sha384_ecdsa": "ecdsa",
    "sha512_ecdsa": "ecdsa",
}

#: Content-encryption algorithms and their key sizes in bytes.
CONTENT_CIPHERS: Final = {
    "aes128_cbc": 16,
    "aes192_cbc": 24,
    "aes256_cbc": 32,
    "aes128_gcm": 16,
    "aes192_gcm": 24,
    "aes256_gcm": 32,
}

#: What the hub encrypts with: AES-256-CBC, which every S/MIME client reads (RFC 8551 §2.7), is
#: the default; AES-256-GCM is used for a partner that advertises it.
DEFAULT_OUTBOUND_CIPHER: Final = "aes256_cbc"
OUTBOUND_CIPHERS: Final = ("aes256_gcm", "aes256_cbc")

#: How the receipts, the archive and the CLI name the content ciphers.
CIPHER_NAMES: Final = {
    "aes128_cbc": "AES-128-CBC",
    "aes192_cbc": "AES-192-CBC",
    "aes256_cbc": "AES-256-CBC",
    "aes128_gcm": "AES-128-GCM",
    "aes192_gcm": "AES-192-GCM",
    "aes256_gcm": "AES-256-GCM",
}

_FRIENDLY: Final = {
    "md5": "MD5",
    "sha1": "SHA-1",
    "md2": "MD2",
    "tripledes_3key": "3DES",
    "des": "DES",
    "rc2": "RC2",
    "rc4": "RC4",
    "md5_rsa": "MD5 with RSA",
    "sha1_rsa": "SHA-1 with RSA",
    "sha1_ecdsa": "SHA-1 with ECDSA",
}


def _name(algo: str) -> str:
    return _FRIENDLY.get(algo, algo)


def digest(name: str) -> hashes.HashAlgorithm:
    """The hash for an allowed digest algorithm name, or :class:`WeakAlgorithm`."""
    try:
        return _DIGESTS[name]()
    except KeyError:
        raise WeakAlgorithm(
            f"digest algorithm {_name(name)} is not allowed; sign with SHA-256"
        ) from None


def signature_kind(name: str) -> str:
    """``rsa``, ``pss`` or ``ecdsa`` for an allowed signature algorithm name."""
    try:
        return _SIGNATURES[name]
    except KeyError:
        raise WeakAlgorithm(
            f"signature algorithm {_name(name)} is not allowed; use RSA (PKCS#1 v1.5 or PSS) "
            "or ECDSA P-256 with SHA-256"
        ) from None


def content_key_size(name: str) -> int:
    try:
        return CONTENT_CIPHERS[name]
    except KeyError:
        raise WeakAlgorithm(
            f"content encryption {_name(name)} is not allowed; encrypt with AES-256-CBC or AES-256-GCM"
        ) from None


def outbound_cipher(capabilities: Sequence[str]) -> str:
    """The content cipher to encrypt to a partner with: the first of :data:`OUTBOUND_CIPHERS`
    in the partner's SMIMECapabilities (RFC 8551 §2.5.2: listed in its order of preference),
    :data:`DEFAULT_OUTBOUND_CIPHER` when it lists neither, or advertised nothing."""
    for name in capabilities:
        if name in OUTBOUND_CIPHERS:
            return name
    return DEFAULT_OUTBOUND_CIPHER


def check_public_key(key: object, *, what: str = "signer key") -> None:
    """Refuse RSA below 2048 bits and curves other than P-256/P-384."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyTooSmall(
                f"{what} is RSA-{key.key_size}; at least RSA-{MIN_RSA_BITS} is required "
                "(re-issue the certificate with RSA-3072)"
            )
        return
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ALLOWED_CURVES:
            raise KeyTooSmall(f"{what} uses curve {key.curve.name}; use P-256 or P-384")
        return
    raise WeakAlgorithm(f"{what} type {type(key).__name__} is not allowed; use RSA or ECDSA P-256")


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """``cert`` names ``issuer`` as its issuer and carries its valid signature (nothing more:
    validity, constraints and revocation are the caller's)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True
