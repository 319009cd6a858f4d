"""SignedData fields a sender chooses freely end in a typed refusal, never in a crash.

The signatures here are put together field by field (:func:`tests.hostile.crafted_signature`),
since ``cryptography``'s signer never writes what is tested: a declared RSA-PSS salt length other
than the one used, a signer certificate altered after it was issued.
"""

from __future__ import annotations

from typing import Any

import pytest
from asn1crypto import x509 as asn1_x509
from cryptography.hazmat.primitives import serialization

from formats import cms_signed
from formats.errors import SignatureInvalid, UntrustedSigner, WeakAlgorithm
from gateway.demo import DemoWorld
from tests.hostile import crafted_signature, unknown_key_algorithm_cert

ENTITY = b"Content-Type: text/plain\r\n\r\nsigned\r\n"
#: RFC 8017 §9.1.2: the demo agencies' RSA-3072 keys and SHA-256 leave room for
#: 384 - 32 - 2 bytes of salt.
MOST_SALT = 350


@pytest.mark.parametrize("salt", [0, 32, MOST_SALT])
def test_pss_salt_lengths_that_fit_the_key_verify(world: DemoWorld, salt: int) -> None:
    signer = world.agencies["H26.SNV"]
    assert signer.cert.public_key().key_size == 3072  # type: ignore[union-attr]
    der = crafted_signature(ENTITY, signer, pss_salt=salt, used_salt=salt)
    check = cms_signed.verify_signed_data(der, detached=ENTITY)
    assert check.signature_algorithm == "rsassa_pss"


@pytest.mark.parametrize("declared", [MOST_SALT + 1, 2**31, 2**64, -1])
def test_impossible_pss_salt_lengths_are_refused_by_name(world: DemoWorld, declared: int) -> None:
    """2**31 reached ``cryptography`` as it came and overflowed there (an InternalError)."""
    der = crafted_signature(ENTITY, world.agencies["H26.SNV"], pss_salt=declared)
    with pytest.raises(
        SignatureInvalid, match=rf"salt length {declared} is impossible .* 0 to {MOST_SALT}\)"
    ):
        cms_signed.verify_signed_data(der, detached=ENTITY)


def test_a_signer_key_of_an_unknown_algorithm_is_not_allowed(world: DemoWorld) -> None:
    """``cryptography`` raises UnsupportedAlgorithm (not a ValueError) for a key it does not
    implement; it is off our allow-list too."""
    signer = world.agencies["H26.SNV"]
    der = crafted_signature(ENTITY, signer, cert_der=unknown_key_algorithm_cert(signer))
    with pytest.raises(WeakAlgorithm, match=r"signer key algorithm 1\.2\.840\.113549\.1\.1\.99"):
        cms_signed.verify_signed_data(der, detached=ENTITY)


def test_the_crafted_signature_is_genuine_otherwise(world: DemoWorld) -> None:
    """The control: without the one altered field, the same construction verifies."""
    signer = world.agencies["H26.SNV"]
    check = cms_signed.verify_signed_data(crafted_signature(ENTITY, signer), detached=ENTITY)
    assert check.signer == signer.cert


def _issuer(world: DemoWorld) -> asn1_x509.Name:
    der = world.agencies["H26.SNV"].cert.public_bytes(serialization.Encoding.DER)
    return asn1_x509.Certificate.load(der).issuer


def test_a_signer_named_by_its_issuer_encoded_otherwise_is_found(world: DemoWorld) -> None:
    """RFC 5280 §7.1: names compare by value, not by encoding. The same issuer written with
    PrintableStrings instead of the certificate's UTF8Strings still names the signer."""
    signer = world.agencies["H26.SNV"]
    issuer = _issuer(world)
    printable = asn1_x509.Name.build(issuer.native, use_printable=True)
    assert printable.dump() != issuer.dump()  # really encoded otherwise
    der = crafted_signature(ENTITY, signer, issuer=printable)
    assert cms_signed.verify_signed_data(der, detached=ENTITY).signer == signer.cert


def test_a_signer_named_by_another_issuer_is_not_found(world: DemoWorld) -> None:
    signer = world.agencies["H26.SNV"]
    other = asn1_x509.Name.build({**_issuer(world).native, "common_name": "Some Other CA"})
    der = crafted_signature(ENTITY, signer, issuer=other)
    with pytest.raises(UntrustedSigner, match=r"issuer .*Some Other CA.*, serial [0-9a-f]+\)"):
        cms_signed.verify_signed_data(der, detached=ENTITY)


def test_a_signer_whose_certificate_the_message_leaves_out_is_found_among_the_known(
    world: DemoWorld,
) -> None:
    signer = world.agencies["H26.SNV"]
    der = crafted_signature(ENTITY, signer, carry=False)
    known = [a.cert for a in world.agencies.values()]
    assert signer.cert in known[1:]  # not the first looked at
    assert cms_signed.verify_signed_data(der, detached=ENTITY, known=known).signer == signer.cert
    with pytest.raises(UntrustedSigner, match="neither in the message nor known to the hub"):
        cms_signed.verify_signed_data(der, detached=ENTITY, known=known[:1])


class _Unread:
    """A certificate of the hub's directory that must not be looked at."""

    def public_bytes(self, encoding: object) -> bytes:
        raise AssertionError("a known certificate was encoded")


def test_the_known_certificates_are_not_read_when_the_message_carries_its_signers(
    world: DemoWorld,
) -> None:
    """The hub knows one certificate per agency, old ones too: encoding each of them for every
    message cost CPU in proportion to the directory (and past the cache's 256, parsing)."""
    signer = world.agencies["H26.SNV"]
    known: Any = [_Unread()] * 1000
    check = cms_signed.verify_signed_data(
        crafted_signature(ENTITY, signer), detached=ENTITY, known=known
    )
    assert check.signer == signer.cert
