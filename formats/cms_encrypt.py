"""CMS EnvelopedData (RFC 5652 §6) and AuthEnvelopedData (RFC 5083): encrypt, for the hub's
receipts, deliveries and reminders and for ``gateway send`` (opening is
:mod:`formats.cms_envelope`).

Recipients are named by issuer and serial number. An RSA certificate gets key transport
(PKCS#1 v1.5 by default, or RSA-OAEP with SHA-256); an EC one (P-256, P-384) ECDH key agreement
(RFC 5753). The content is AES-256, CBC or GCM. The default (AES-256-CBC, PKCS#1 v1.5, RSA
recipients only) is built by ``cryptography``; the rest, which it does not build, is assembled
here with asn1crypto.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from asn1crypto import algos, cms, core
from asn1crypto import keys as asn1_keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.ciphers.algorithms import AES, AES256
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from cryptography.hazmat.primitives.serialization import pkcs7

from formats import algorithms
from formats.cms_envelope import GCMParameters


def encrypt(
    content: bytes,
    recipients: Sequence[x509.Certificate],
    *,
    cipher: str = "aes256_cbc",
    oaep: bool = False,
) -> bytes:
    """A DER ContentInfo encrypting ``content`` to every certificate in ``recipients``.

    The default (AES-256-CBC, RSA PKCS#1 v1.5) is built by ``cryptography``; AES-GCM
    AuthEnvelopedData, RSA-OAEP and EC recipients (ECDH key agreement, :func:`_key_agree`),
    which it does not build, are assembled here.
    """
    if not recipients:
        raise ValueError("encrypt() needs at least one recipient certificate")
    every_rsa = all(isinstance(c.public_key(), rsa.RSAPublicKey) for c in recipients)
    if cipher == "aes256_cbc" and not oaep and every_rsa:
        builder = pkcs7.PKCS7EnvelopeBuilder().set_data(content)
        builder = builder.set_content_encryption_algorithm(AES256)
        for cert in recipients:
            builder = builder.add_recipient(cert)
        return builder.encrypt(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])
    key_size = algorithms.content_key_size(cipher)
    cek = os.urandom(key_size)
    ris = [
        _key_agree(cert, cek)
        if isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        else _key_trans(cert, cek, oaep)
        for cert in recipients
    ]
    if cipher.endswith("_gcm"):
        nonce = os.urandom(12)
        sealed = AESGCM(cek).encrypt(nonce, content, None)
        ciphertext, tag = sealed[:-16], sealed[-16:]
        eci = _eci(cipher, GCMParameters({"aes_nonce": nonce, "aes_icvlen": 16}), ciphertext)
        env = cms.AuthEnvelopedData(
            {
                "version": "v0",
                "recipient_infos": ris,
                "auth_encrypted_content_info": eci,
                "mac": tag,
            }
        )
        info = cms.ContentInfo({"content_type": "authenticated_enveloped_data", "content": env})
        return bytes(info.dump())
    iv = os.urandom(16)
    pad = 16 - len(content) % 16
    encryptor = Cipher(AES(cek), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(content + bytes([pad]) * pad) + encryptor.finalize()
    eci = _eci(cipher, core.OctetString(iv), ciphertext)
    # RFC 5652 §6.1: v0 when every RecipientInfo is v0 (key transport by issuer and serial);
    # a key agreement (v3) makes it v2.
    version = "v0" if all(ri.name == "ktri" for ri in ris) else "v2"
    env = cms.EnvelopedData(
        {"version": version, "recipient_infos": ris, "encrypted_content_info": eci}
    )
    return bytes(cms.ContentInfo({"content_type": "enveloped_data", "content": env}).dump())


def _eci(cipher: str, params: core.Asn1Value, ciphertext: bytes) -> cms.EncryptedContentInfo:
    return cms.EncryptedContentInfo(
        {
            "content_type": "data",
            "content_encryption_algorithm": {"algorithm": cipher, "parameters": params},
            "encrypted_content": ciphertext,
        }
    )


def _key_trans(cert: x509.Certificate, cek: bytes, oaep: bool) -> cms.RecipientInfo:
    public_key = cert.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise ValueError("key transport needs an RSA recipient certificate")
    algorithms.check_public_key(public_key, what="recipient key")
    if oaep:
        pad: padding.AsymmetricPadding = padding.OAEP(
            mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None
        )
        alg = {
            "algorithm": "rsaes_oaep",
            "parameters": algos.RSAESOAEPParams(
                {
                    "hash_algorithm": {"algorithm": "sha256"},
                    "mask_gen_algorithm": {
                        "algorithm": "mgf1",
                        "parameters": {"algorithm": "sha256"},
                    },
                }
            ),
        }
    else:
        pad, alg = padding.PKCS1v15(), {"algorithm": "rsaes_pkcs1v15"}
    return cms.RecipientInfo(
        name="ktri",
        value=cms.KeyTransRecipientInfo(
            {
                "version": "v0",
                "rid": cms.RecipientIdentifier(
                    name="issuer_and_serial_number", value=_issuer_and_serial(cert)
                ),
                "key_encryption_algorithm": alg,
                "encrypted_key": public_key.encrypt(cek, pad),
            }
        ),
    )


#: ECDH key agreement (RFC 5753 §7.1.4, dhSinglePass-stdDH): the key-derivation hash by curve,
#: as RFC 5008 pairs them (the hash no weaker than the curve).
_KDF_SCHEMES: dict[str, tuple[str, type[hashes.HashAlgorithm]]] = {
    "secp256r1": ("1.3.132.1.11.1", hashes.SHA256),  # dhSinglePass-stdDH-sha256kdf-scheme
    "secp384r1": ("1.3.132.1.11.2", hashes.SHA384),  # dhSinglePass-stdDH-sha384kdf-scheme
}


class _EccCmsSharedInfo(core.Sequence):  # type: ignore[misc]
    """ECC-CMS-SharedInfo (RFC 5753 §7.2): the X9.63 KDF's shared info."""

    _fields = [  # noqa: RUF012 — asn1crypto's declaration style
        ("key_info", cms.KeyEncryptionAlgorithm),
        ("entity_u_info", core.OctetString, {"explicit": 0, "optional": True}),
        ("supp_pub_info", core.OctetString, {"explicit": 2}),
    ]


def _key_agree(cert: x509.Certificate, cek: bytes) -> cms.RecipientInfo:
    """A KeyAgreeRecipientInfo for an EC (P-256, P-384) recipient, as RFC 5753 §3.1 has an
    originator send it: a fresh ephemeral key on the recipient's curve; its ECDH secret with
    the recipient's key through the ANSI X9.63 KDF makes an AES-256 key-encryption key, which
    wraps the content key (RFC 3394). The KDF's hash is SHA-256 for P-256 and SHA-384 for
    P-384, as RFC 5008 pairs them (``openssl cms -encrypt`` writes the SHA-1 KDF, which the
    hub does not use); ``openssl cms -decrypt`` and S/MIME clients with EC certificates read
    either."""
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise ValueError("key agreement needs an EC recipient certificate")
    algorithms.check_public_key(public_key, what="recipient key")
    scheme, kdf_hash = _KDF_SCHEMES[public_key.curve.name]
    ephemeral = ec.generate_private_key(public_key.curve)
    wrap = cms.KeyEncryptionAlgorithm({"algorithm": "aes256_wrap"})
    shared_info = _EccCmsSharedInfo(
        {"key_info": wrap, "supp_pub_info": (256).to_bytes(4, "big")}  # KEK bits
    )
    kek = X963KDF(algorithm=kdf_hash(), length=32, sharedinfo=shared_info.dump()).derive(
        ephemeral.exchange(ec.ECDH(), public_key)
    )
    point = ephemeral.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return cms.RecipientInfo(
        name="kari",
        value=cms.KeyAgreeRecipientInfo(
            {
                "version": "v3",
                "originator": cms.OriginatorIdentifierOrKey(
                    name="originator_key",
                    # RFC 5753 §3.1.1: id-ecPublicKey, its parameters absent (the recipient's
                    # curve).
                    value=asn1_keys.PublicKeyInfo(
                        {"algorithm": {"algorithm": "ec"}, "public_key": point}
                    ),
                ),
                "key_encryption_algorithm": {
                    "algorithm": scheme,
                    "parameters": core.Any.load(wrap.dump()),
                },
                "recipient_encrypted_keys": [
                    {
                        "rid": cms.KeyAgreementRecipientIdentifier(
                            name="issuer_and_serial_number", value=_issuer_and_serial(cert)
                        ),
                        "encrypted_key": aes_key_wrap(kek, cek),
                    }
                ],
            }
        ),
    )


def _issuer_and_serial(cert: x509.Certificate) -> dict[str, object]:
    """IssuerAndSerialNumber: how a RecipientInfo names the certificate it is for."""
    asn1_cert = asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))
    return {"issuer": asn1_cert.issuer, "serial_number": asn1_cert.serial_number}
