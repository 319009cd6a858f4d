"""keys.issuing: the profile of what we issue, checked by reading it back and by openssl."""

from __future__ import annotations

import shutil
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keys.issuing import ORGAN_ID_ATTRIBUTE, generate_key, issue_hub, make_crl
from tests.pki import AGENCY_EMAIL, AGENCY_ORGAN_ID, CRL_NEXT, CRL_THIS, T0, Pki, key, write_pem

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI missing")


def ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension:  # type: ignore[type-arg]
    return cert.extensions.get_extension_for_class(kind)


def test_root_is_a_self_signed_ca(pki: Pki) -> None:
    root = pki.root.cert
    assert root.subject == root.issuer
    assert ext(root, x509.BasicConstraints).value.ca
    assert ext(root, x509.BasicConstraints).critical
    usage = ext(root, x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature


def test_intermediate_chains_by_key_identifier(pki: Pki) -> None:
    aki = ext(pki.inter.cert, x509.AuthorityKeyIdentifier).value
    ski = ext(pki.root.cert, x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert ext(pki.inter.cert, x509.BasicConstraints).value.path_length == 0


def test_agency_certificate_profile(pki: Pki) -> None:
    cert = pki.agency.cert
    assert cert.subject.get_attributes_for_oid(ORGAN_ID_ATTRIBUTE)[0].value == AGENCY_ORGAN_ID
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == [AGENCY_EMAIL]
    usage = ext(cert, x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and not usage.key_agreement
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.EMAIL_PROTECTION]
    assert not ext(cert, x509.BasicConstraints).value.ca
    assert isinstance(cert.public_key(), rsa.RSAPublicKey)
    assert cert.public_key().key_size == 3072


def test_ec_agency_uses_key_agreement(pki: Pki) -> None:
    cert = pki.leaf(key=key("ec", "ec-p256")).cert
    usage = ext(cert, x509.KeyUsage).value
    assert usage.digital_signature and usage.key_agreement and not usage.key_encipherment
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)


def test_options_change_what_they_say(pki: Pki) -> None:
    start = T0 - timedelta(days=3)
    cert = pki.leaf(
        not_before=start,
        not_after=T0,
        eku=(ExtendedKeyUsageOID.SERVER_AUTH,),
        with_email_san=False,
        key_usage="sign",
        crl_url=None,
        organ_id=None,
    ).cert
    assert cert.not_valid_before_utc == start
    assert cert.not_valid_after_utc == T0
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not ext(cert, x509.KeyUsage).value.key_encipherment
    assert not cert.subject.get_attributes_for_oid(ORGAN_ID_ATTRIBUTE)
    for kind in (x509.SubjectAlternativeName, x509.CRLDistributionPoints):
        with pytest.raises(x509.ExtensionNotFound):
            ext(cert, kind)


def test_crl_lists_serials_with_reasons(pki: Pki) -> None:
    when = T0 - timedelta(days=2)
    crl = make_crl(
        pki.inter,
        revoked=[(7, when), (8, when, x509.ReasonFlags.key_compromise)],
        this_update=CRL_THIS,
        next_update=CRL_NEXT,
        number=5,
    )
    assert crl.is_signature_valid(pki.inter.cert.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(7) is not None
    entry = crl.get_revoked_certificate_by_serial_number(8)
    assert entry is not None
    assert entry.revocation_date_utc == when
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.key_compromise
    )
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 5


def test_generate_key_kinds() -> None:
    assert isinstance(generate_key("ec-p384"), ec.EllipticCurvePrivateKey)
    with pytest.raises(ValueError, match="unknown key kind"):
        generate_key("dsa")  # type: ignore[arg-type]


def test_naive_instants_are_refused(pki: Pki) -> None:
    with pytest.raises(ValueError, match="naive"):
        pki.leaf(at=datetime(2026, 1, 1))


# --- interop: the real openssl CLI ------------------------------------------------------------


def openssl_verify(tmp_path: Path, pki: Pki, leaf: x509.Certificate, *args: str) -> str:
    root = write_pem(tmp_path / "root.pem", pki.root.cert)
    inter = write_pem(tmp_path / "inter.pem", pki.inter.cert)
    target = write_pem(tmp_path / "leaf.pem", leaf)
    attime = str(int(T0.timestamp()))
    cmd = ["openssl", "verify", "-attime", attime, "-CAfile", str(root), "-untrusted", str(inter)]
    done = subprocess.run(
        [*cmd, *args, str(target)], capture_output=True, text=True, check=False, timeout=30
    )
    return done.stdout + done.stderr


@needs_openssl
@pytest.mark.interop
@pytest.mark.parametrize("purpose", ["smimesign", "smimeencrypt"])
def test_openssl_accepts_agency_certificate(tmp_path: Path, pki: Pki, purpose: str) -> None:
    out = openssl_verify(tmp_path, pki, pki.agency.cert, "-purpose", purpose)
    assert out.strip().endswith("leaf.pem: OK"), out


@needs_openssl
@pytest.mark.interop
@pytest.mark.parametrize("purpose", ["smimesign", "smimeencrypt"])
def test_openssl_accepts_hub_certificate(tmp_path: Path, pki: Pki, purpose: str) -> None:
    hub = issue_hub(pki.inter, email="hub@hanoi.gov.vn", at=T0 - timedelta(days=1), key=key("hub"))
    out = openssl_verify(tmp_path, pki, hub.cert, "-purpose", purpose)
    assert out.strip().endswith("leaf.pem: OK"), out


@needs_openssl
@pytest.mark.interop
def test_openssl_accepts_ec_agency_for_signing(tmp_path: Path, pki: Pki) -> None:
    cert = pki.leaf(key=key("ec", "ec-p256")).cert
    out = openssl_verify(tmp_path, pki, cert, "-purpose", "smimesign")
    assert out.strip().endswith("leaf.pem: OK"), out


@needs_openssl
@pytest.mark.interop
def test_openssl_refuses_server_only_certificate(tmp_path: Path, pki: Pki) -> None:
    cert = pki.leaf(eku=(ExtendedKeyUsageOID.SERVER_AUTH,)).cert
    out = openssl_verify(tmp_path, pki, cert, "-purpose", "smimesign")
    assert "unsuitable certificate purpose" in out, out


@needs_openssl
@pytest.mark.interop
def test_openssl_reads_our_crls(tmp_path: Path, pki: Pki) -> None:
    revoked = pki.leaf()
    crl = pki.inter_crl_with((revoked.cert.serial_number, T0 - timedelta(hours=1)))
    crls = tmp_path / "crls.pem"
    crls.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in (pki.root_crl, crl)))
    flags = ("-purpose", "smimesign", "-crl_check_all", "-CRLfile", str(crls))
    assert openssl_verify(tmp_path, pki, pki.agency.cert, *flags).strip().endswith("OK")
    assert "certificate revoked" in openssl_verify(tmp_path, pki, revoked.cert, *flags)
