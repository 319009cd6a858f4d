"""keys.trust: signer path validation at a moment, its typed refusals, and the result cache."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from formats.errors import (
    CertificateExpired,
    CertificateNotYetValid,
    ConfigError,
    KeyTooSmall,
    RevocationUnavailable,
    SignerRevoked,
    UntrustedSigner,
    WeakAlgorithm,
    WrongKeyUsage,
)
from keys.issuing import make_crl, make_intermediate, make_root
from keys.trust import TrustStore, check_algorithms, validate_signer
from tests.pki import (
    AGENCY_EMAIL,
    AGENCY_ORGAN_ID,
    CRL_NEXT,
    CRL_THIS,
    ROOT_FROM,
    T0,
    Pki,
    key,
    ocsp_response,
    resign,
    self_signed_agency,
)


def der(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(Encoding.DER)


def store_with(pki: Pki, inter_crl: x509.CertificateRevocationList, **kw: object) -> TrustStore:
    return TrustStore(
        anchors=(pki.root.cert,),
        intermediates=(pki.inter.cert,),
        crls=(pki.root_crl, inter_crl),
        **kw,  # type: ignore[arg-type]
    )


# --- the good path ----------------------------------------------------------------------------


def test_valid_chain_passes(pki: Pki) -> None:
    signer = validate_signer(pki.store(), pki.agency.cert, at=T0)
    assert signer.cert == pki.agency.cert
    assert signer.path == (pki.agency.cert, pki.inter.cert, pki.root.cert)  # leaf first
    assert signer.emails == (AGENCY_EMAIL,)
    assert signer.organ_id == AGENCY_ORGAN_ID
    assert set(signer.evidence) == {der(pki.root_crl), der(pki.inter_crl)}
    assert signer.revocation_checked
    # [latest notBefore on the path, earliest of notAfter / CRL nextUpdate)
    assert signer.valid_from == CRL_THIS  # the CRLs' thisUpdate is later than any notBefore
    assert signer.valid_until == CRL_NEXT


def test_intermediate_carried_in_message_chains_to_configured_root(pki: Pki) -> None:
    store = pki.store(intermediates=False)
    signer = validate_signer(store, pki.agency.cert, carried=[pki.inter.cert], at=T0)
    assert signer.path[-1] == pki.root.cert


def test_mixed_case_domain_is_normalised_local_part_kept(pki: Pki) -> None:
    cert = pki.leaf(email="VanThu@SoTuPhap.HaNoi.gov.VN").cert
    signer = validate_signer(pki.store(), cert, at=T0)
    assert signer.emails == ("VanThu@sotuphap.hanoi.gov.vn",)


def test_ec_p256_signer_passes(pki: Pki) -> None:
    cert = pki.leaf(key=key("ec", "ec-p256")).cert
    assert validate_signer(pki.store(), cert, at=T0).path[0] == cert


# --- refusals ---------------------------------------------------------------------------------


def test_revoked_by_crl(pki: Pki) -> None:
    leaf = pki.leaf()
    when = T0 - timedelta(days=1, hours=1)
    crl = pki.inter_crl_with(
        (leaf.cert.serial_number, when, x509.ReasonFlags.key_compromise),
        this_update=T0 - timedelta(hours=2),
    )
    with pytest.raises(SignerRevoked) as caught:
        validate_signer(store_with(pki, crl), leaf.cert, at=T0)
    message = caught.value.message
    assert f"serial 0x{leaf.cert.serial_number:X}" in message
    assert "Sở Tư pháp Hà Nội" in message
    assert f"{when:%Y-%m-%d %H:%M:%S}" in message
    assert "key compromise" in message.lower()
    assert "new certificate" in message


def test_revoked_intermediate_is_named(pki: Pki) -> None:
    root_crl = make_crl(
        pki.root,
        revoked=[(pki.inter.cert.serial_number, T0 - timedelta(days=2))],
        this_update=CRL_THIS,
        next_update=CRL_NEXT,
        number=9,
    )
    store = TrustStore(
        anchors=(pki.root.cert,), intermediates=(pki.inter.cert,), crls=(root_crl, pki.inter_crl)
    )
    with pytest.raises(SignerRevoked, match="Test Agency CA G1"):
        validate_signer(store, pki.agency.cert, at=T0)


def test_expired(pki: Pki) -> None:
    cert = pki.leaf(not_before=T0 - timedelta(days=60), not_after=T0 - timedelta(days=1)).cert
    with pytest.raises(CertificateExpired, match=r"expired on .*renew") as caught:
        validate_signer(pki.store(), cert, at=T0)
    assert f"0x{cert.serial_number:X}" in caught.value.message


def test_not_yet_valid(pki: Pki) -> None:
    cert = pki.leaf(not_before=T0 + timedelta(days=1), not_after=T0 + timedelta(days=30)).cert
    with pytest.raises(CertificateNotYetValid, match="not valid until"):
        validate_signer(pki.store(), cert, at=T0)


@pytest.mark.parametrize(
    "variant",
    [
        {"eku": (ExtendedKeyUsageOID.SERVER_AUTH,)},
        {"eku": ()},
        {"key_usage": "encrypt"},
    ],
    ids=["server-auth-only", "no-eku", "encrypt-only"],
)
def test_wrong_key_usage(pki: Pki, variant: dict[str, object]) -> None:
    cert = pki.leaf(**variant).cert
    with pytest.raises(WrongKeyUsage, match="emailProtection"):
        validate_signer(pki.store(), cert, at=T0)


def test_self_signed_certificate_carried_in_message_is_not_trusted(pki: Pki) -> None:
    fake = self_signed_agency().cert
    with pytest.raises(UntrustedSigner, match="trust anchor"):
        validate_signer(pki.store(), fake, carried=[fake], at=T0)


def test_rogue_chain_carried_in_message_is_not_trusted(pki: Pki) -> None:
    rogue_root = make_root("Test Root CA G1", at=ROOT_FROM, key=key("rogue-root"))
    rogue_inter = make_intermediate(
        rogue_root, "Test Agency CA G1", at=ROOT_FROM, key=key("rogue-inter")
    )
    leaf = pki.leaf(key=key("rogue-leaf"))  # same names, but issued below by the rogue CA
    from keys.issuing import issue_agency

    forged = issue_agency(
        rogue_inter,
        email=AGENCY_EMAIL,
        organ_id=AGENCY_ORGAN_ID,
        common_name="Sở Tư pháp Hà Nội",
        at=T0 - timedelta(days=1),
        key=leaf.key,
    ).cert
    store = pki.store(intermediates=False)
    with pytest.raises(UntrustedSigner):
        validate_signer(store, forged, carried=[rogue_inter.cert, rogue_root.cert], at=T0)


def test_missing_intermediate_is_untrusted(pki: Pki) -> None:
    with pytest.raises(UntrustedSigner, match="Test Agency CA G1"):
        validate_signer(pki.store(intermediates=False), pki.agency.cert, at=T0)


def test_hard_fail_without_crl_is_revocation_unavailable(pki: Pki) -> None:
    with pytest.raises(RevocationUnavailable, match="refresh the CRLs") as caught:
        validate_signer(pki.store(crls=False), pki.agency.cert, at=T0)
    assert caught.value.smtp.startswith("451")  # try again later, not a rejection


def test_hard_fail_with_only_the_root_crl_names_the_uncovered_certificate(pki: Pki) -> None:
    store = TrustStore(
        anchors=(pki.root.cert,), intermediates=(pki.inter.cert,), crls=(pki.root_crl,)
    )
    with pytest.raises(RevocationUnavailable, match=f"0x{pki.agency.cert.serial_number:X}"):
        validate_signer(store, pki.agency.cert, at=T0)


def test_stale_crl_is_revocation_unavailable(pki: Pki) -> None:
    with pytest.raises(RevocationUnavailable):
        validate_signer(pki.store(), pki.agency.cert, at=CRL_NEXT + timedelta(hours=1))


def test_soft_fail_without_crl_passes_unchecked(pki: Pki) -> None:
    signer = validate_signer(pki.store(mode="soft-fail", crls=False), pki.agency.cert, at=T0)
    assert not signer.revocation_checked
    assert signer.evidence == ()


def test_soft_fail_still_honours_crls_it_has(pki: Pki) -> None:
    leaf = pki.leaf()
    crl = pki.inter_crl_with((leaf.cert.serial_number, T0 - timedelta(hours=3)))
    with pytest.raises(SignerRevoked):
        validate_signer(store_with(pki, crl, revocation_mode="soft-fail"), leaf.cert, at=T0)
    soft_leaf_only = TrustStore(
        anchors=(pki.root.cert,),
        intermediates=(pki.inter.cert,),
        crls=(crl,),  # no root CRL: the intermediate is let through, the leaf is checked
        revocation_mode="soft-fail",
    )
    with pytest.raises(SignerRevoked):
        validate_signer(soft_leaf_only, leaf.cert, at=T0)


def test_soft_fail_checks_the_path_when_the_signer_carries_its_own_certificate(pki: Pki) -> None:
    """Every openssl-signed message carries the signer's certificate. The root's fresh CRL
    revokes the intermediate, which publishes no CRL of its own: soft-fail lets the leaf's
    missing evidence through, never the revoked CA above it."""
    root_crl = make_crl(
        pki.root, revoked=[(pki.inter.cert.serial_number, T0 - timedelta(days=2))],
        this_update=CRL_THIS, next_update=CRL_NEXT, number=5,
    )  # fmt: skip
    store = TrustStore(
        anchors=(pki.root.cert,), intermediates=(pki.inter.cert,), crls=(root_crl,),
        revocation_mode="soft-fail",
    )  # fmt: skip
    for carried in ((), (pki.agency.cert,), (pki.agency.cert, pki.inter.cert)):
        with pytest.raises(SignerRevoked, match="Test Agency CA G1"):
            store.validate_signer(pki.agency.cert, carried=carried, at=T0)


def test_a_crl_issued_after_the_message_arrived_tells_its_status_then(pki: Pki) -> None:
    """A message decided after its day's CRL was replaced (a backlog, a restart, a release):
    the newer CRL, which lists revocation dates, proves the status at receipt, under
    hard-fail too. Revoked after the message arrived: still valid for it."""
    arrived = CRL_THIS - timedelta(hours=6)  # before the stored CRLs were issued
    assert pki.root_crl.last_update_utc > arrived
    signer = validate_signer(pki.store(), pki.agency.cert, at=arrived)
    assert signer.revocation_checked and der(pki.inter_crl) in signer.evidence
    later = pki.inter_crl_with((pki.agency.cert.serial_number, arrived + timedelta(hours=1)))
    assert store_with(pki, later).validate_signer(pki.agency.cert, at=arrived)
    earlier = pki.inter_crl_with((pki.agency.cert.serial_number, arrived - timedelta(hours=1)))
    with pytest.raises(SignerRevoked):  # but revoked before it arrived: refused
        store_with(pki, earlier).validate_signer(pki.agency.cert, at=arrived)


def test_certificates_carried_in_layers_do_not_multiply_the_work(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message may carry certificates that share names in layers (m per layer, k layers:
    m**k paths, each validated): at most MAX_PATHS are tried before the signer is untrusted."""
    import pyhanko_certvalidator

    from keys import trust

    tried = []
    real = pyhanko_certvalidator.async_validate_path

    async def counting(*args: object, **kw: object) -> object:
        tried.append(1)
        return await real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(pyhanko_certvalidator, "async_validate_path", counting)
    forger = key("forger")

    def forged(subject: x509.Name, issuer: x509.Name) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())  # each its own
            .serial_number(x509.random_serial_number())
            .not_valid_before(T0 - timedelta(days=1))
            .not_valid_after(T0 + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(forger, hashes.SHA256())
        )

    # leaf → 3 × "Test Agency CA G1" → 3 × "Layer 1" → 3 × "Layer 2" → 3 × "Layer 3" → root
    names = [pki.agency.cert.issuer] + [
        x509.Name.from_rfc4514_string(f"CN=Layer {i}") for i in (1, 2, 3)
    ]
    issuers = [*names[1:], pki.root.cert.subject]
    layers = [[forged(n, i) for _ in range(3)] for n, i in zip(names, issuers, strict=True)]
    carried = [c for layer in layers for c in layer]  # 3**4 = 81 candidate paths
    store = TrustStore(anchors=(pki.root.cert,), crls=(pki.root_crl,))
    with pytest.raises(UntrustedSigner):
        store.validate_signer(pki.agency.cert, carried=carried, at=T0)
    assert len(tried) == trust.MAX_PATHS == 8  # not 81


def test_a_carried_certificate_whose_name_cannot_be_decoded_is_ignored(pki: Pki) -> None:
    """The set of carried certificates is not signed: anyone may add one whose UTF8String name
    is not UTF-8 (cryptography loads it, asn1crypto cannot decode it)."""
    raw = pki.inter.cert.public_bytes(Encoding.DER)
    assert raw.count(b"Test Agency CA G1") == 1  # the subject (the issuer is the root)
    bad = x509.load_der_x509_certificate(raw.replace(b"Agency", b"Ag\xe1\x41cy", 1))
    signer = pki.store().validate_signer(pki.agency.cert, carried=(bad, pki.agency.cert), at=T0)
    assert signer.cert == pki.agency.cert
    with pytest.raises(UntrustedSigner, match=r"cannot be decoded|unreadable"):
        pki.store().validate_signer(bad, carried=(), at=T0)


def test_soft_fail_reports_an_unchecked_intermediate(pki: Pki) -> None:
    store = TrustStore(
        anchors=(pki.root.cert,),
        intermediates=(pki.inter.cert,),
        crls=(pki.inter_crl,),  # the leaf is covered, the intermediate is not
        revocation_mode="soft-fail",
    )
    signer = validate_signer(store, pki.agency.cert, at=T0)
    assert not signer.revocation_checked
    assert signer.evidence == (der(pki.inter_crl),)


def ocsp_store(pki: Pki, response: bytes) -> TrustStore:
    return TrustStore(
        anchors=(pki.root.cert,),
        intermediates=(pki.inter.cert,),
        crls=(pki.root_crl,),  # the leaf is covered by OCSP only
        ocsps=(response,),
    )


def test_ocsp_good_covers_the_leaf(pki: Pki) -> None:
    leaf = pki.leaf(crl_url=None, ocsp_url="http://ocsp.example.vn")
    response = ocsp_response(leaf.cert, pki.inter)
    signer = validate_signer(ocsp_store(pki, response), leaf.cert, at=T0)
    assert set(signer.evidence) == {der(pki.root_crl), response}
    assert signer.valid_until == CRL_NEXT


def test_ocsp_revoked(pki: Pki) -> None:
    leaf = pki.leaf(crl_url=None, ocsp_url="http://ocsp.example.vn")
    response = ocsp_response(leaf.cert, pki.inter, revoked_at=T0 - timedelta(hours=5))
    with pytest.raises(SignerRevoked, match="key compromise"):
        validate_signer(ocsp_store(pki, response), leaf.cert, at=T0)


def test_rsa_1024_is_too_small(pki: Pki) -> None:
    cert = pki.leaf(key=key("small", "rsa1024")).cert
    with pytest.raises(KeyTooSmall, match="1024-bit"):
        validate_signer(pki.store(), cert, at=T0)


def test_other_curves_are_refused(pki: Pki) -> None:
    cert = pki.leaf(key=ec.generate_private_key(ec.SECP521R1())).cert
    with pytest.raises(KeyTooSmall, match="secp521r1"):
        validate_signer(pki.store(), cert, at=T0)


@pytest.mark.parametrize("algorithm", ["sha1", "md5"])
def test_weak_signature_hash_is_refused_before_path_validation(pki: Pki, algorithm: str) -> None:
    weak = resign(pki.agency.cert, pki.inter, algorithm)
    assert weak.signature_hash_algorithm is not None
    assert weak.signature_hash_algorithm.name == algorithm
    with pytest.raises(WeakAlgorithm, match=algorithm.upper()):
        validate_signer(pki.store(), weak, at=T0)
    with pytest.raises(WeakAlgorithm):
        check_algorithms(weak)  # the same check, with no store at all


def test_naive_moment_is_a_programming_error(pki: Pki) -> None:
    with pytest.raises(ValueError, match="naive"):
        validate_signer(pki.store(), pki.agency.cert, at=datetime(2026, 3, 1))


def test_store_needs_an_anchor() -> None:
    with pytest.raises(ConfigError, match="trust anchor"):
        TrustStore(anchors=())


def test_store_is_a_value(pki: Pki) -> None:
    assert pki.store() == pki.store()
    assert hash(pki.store()) == hash(pki.store())
    assert pki.store().crls == (der(pki.root_crl), der(pki.inter_crl))  # kept as DER
    refreshed = pki.store(crls=False).with_revocation(crls=[der(pki.root_crl), pki.inter_crl])
    assert validate_signer(refreshed, pki.agency.cert, at=T0).revocation_checked


# --- the cache --------------------------------------------------------------------------------


def test_cache_returns_the_same_answer_fast(pki: Pki) -> None:
    store = pki.store()
    first = validate_signer(store, pki.agency.cert, at=T0)
    later = T0 + timedelta(days=2)
    again = validate_signer(store, pki.agency.cert, at=later)
    assert again is first  # same interval → same object, no re-validation
    started = time.perf_counter()
    for _ in range(200):
        validate_signer(store, pki.agency.cert, at=later)
    assert (time.perf_counter() - started) / 200 < 0.001  # generous; ~10 µs measured


def test_cache_is_keyed_by_the_carried_certificates(pki: Pki) -> None:
    store = pki.store(intermediates=False)
    ok = validate_signer(store, pki.agency.cert, carried=[pki.inter.cert], at=T0)
    assert ok.revocation_checked
    with pytest.raises(UntrustedSigner):
        validate_signer(store, pki.agency.cert, at=T0)


def test_cache_not_used_after_the_certificate_expires(pki: Pki) -> None:
    cert = pki.leaf(not_before=T0 - timedelta(days=10), not_after=T0 + timedelta(days=1)).cert
    store = pki.store()
    signer = validate_signer(store, cert, at=T0)
    assert signer.valid_until == cert.not_valid_after_utc
    with pytest.raises(CertificateExpired):
        validate_signer(store, cert, at=T0 + timedelta(days=1, seconds=1))


def test_cache_not_used_after_crl_next_update(pki: Pki) -> None:
    store = pki.store()
    validate_signer(store, pki.agency.cert, at=T0)
    with pytest.raises(RevocationUnavailable):
        validate_signer(store, pki.agency.cert, at=CRL_NEXT + timedelta(seconds=1))


def test_cache_not_used_before_the_certificate_starts(pki: Pki) -> None:
    start = pki.agency.cert.not_valid_before_utc
    old_root_crl = make_crl(pki.root, this_update=ROOT_FROM, next_update=CRL_NEXT, number=3)
    store = pki.store().with_revocation(
        crls=[old_root_crl, pki.inter_crl_with(this_update=ROOT_FROM)]
    )
    signer = validate_signer(store, pki.agency.cert, at=T0)
    assert signer.valid_from == start
    assert validate_signer(store, pki.agency.cert, at=start) is signer
    with pytest.raises(CertificateNotYetValid):
        validate_signer(store, pki.agency.cert, at=start - _1S)


def test_cache_not_used_once_a_future_revocation_takes_effect(pki: Pki) -> None:
    leaf = pki.leaf()
    when = T0 + timedelta(hours=6)  # a CRL may list a revocation that takes effect later
    store = store_with(pki, pki.inter_crl_with((leaf.cert.serial_number, when)))
    signer = validate_signer(store, leaf.cert, at=T0)
    assert signer.valid_until == when
    assert validate_signer(store, leaf.cert, at=when) is not None  # revoked *after* `when`
    with pytest.raises(SignerRevoked):
        validate_signer(store, leaf.cert, at=when + _1S)


def test_failures_are_not_cached(pki: Pki) -> None:
    cert = pki.leaf(not_before=T0 + timedelta(days=1), not_after=T0 + timedelta(days=30)).cert
    store = pki.store()
    with pytest.raises(CertificateNotYetValid):
        validate_signer(store, cert, at=T0)
    assert validate_signer(store, cert, at=T0 + timedelta(days=2)).path[0] == cert


_1S = timedelta(seconds=1)


# --- revocation on record: what the hub must not encrypt to (keys.recipients) ---------------


def test_a_revocation_stays_on_record_once_its_crl_is_past_its_next_update(pki: Pki) -> None:
    """Soft-fail reads only current evidence: past the CRL's nextUpdate the certificate passes
    as one with no evidence. The CRL still proves the revocation it lists."""
    leaf = pki.leaf()
    revoked = T0 - timedelta(days=2)
    crl = pki.inter_crl_with((leaf.cert.serial_number, revoked, x509.ReasonFlags.key_compromise))
    store = store_with(pki, crl, revocation_mode="soft-fail")
    stale = CRL_NEXT + timedelta(days=30)
    assert validate_signer(store, leaf.cert, at=stale).path[0] == leaf.cert
    why = store.revoked_on_record(leaf.cert, stale)
    assert why is not None
    assert f"serial 0x{leaf.cert.serial_number:X}" in why
    assert f"{revoked:%Y-%m-%d %H:%M:%S}" in why and "key compromise" in why
    assert store.revoked_on_record(leaf.cert, T0) is not None  # and while it is current
    assert store.revoked_on_record(leaf.cert, revoked) is None  # not before it took effect
    assert store.revoked_on_record(pki.agency.cert, stale) is None  # another serial


def test_a_crl_not_signed_by_the_issuer_the_store_holds_records_nothing(pki: Pki) -> None:
    """A CRL under the issuer's name but signed by another key (a forgery, or a CA the store
    does not hold) is no evidence."""
    leaf = pki.leaf()
    impostor = make_intermediate(
        pki.root, "Test Agency CA G1", at=ROOT_FROM, key=key("impostor", "rsa3072")
    )
    forged = make_crl(
        impostor,
        revoked=[(leaf.cert.serial_number, T0 - timedelta(days=2))],
        this_update=CRL_THIS,
        next_update=CRL_NEXT,
        number=9,
    )
    assert forged.issuer == pki.inter.cert.subject
    store = store_with(pki, forged, revocation_mode="soft-fail")
    assert store.revoked_on_record(leaf.cert, CRL_NEXT + timedelta(days=30)) is None


def test_a_revoked_ocsp_response_stays_on_record_past_its_next_update(pki: Pki) -> None:
    leaf = pki.leaf(crl_url=None, ocsp_url="http://ocsp.example.vn")
    response = ocsp_response(leaf.cert, pki.inter, revoked_at=T0 - timedelta(hours=5))
    store = ocsp_store(pki, response)
    why = store.revoked_on_record(leaf.cert, CRL_NEXT + timedelta(days=30))
    assert why is not None and "key compromise" in why and "OCSP" in why
    good = ocsp_store(pki, ocsp_response(leaf.cert, pki.inter))
    assert good.revoked_on_record(leaf.cert, CRL_NEXT + timedelta(days=30)) is None


def test_a_hold_is_not_on_record_once_its_evidence_is_past(pki: Pki) -> None:
    """A certificate hold may be lifted (RFC 5280 §5.3.1): an old CRL that put the certificate
    on hold says nothing of now; only current evidence does (a current hold still refuses)."""
    leaf = pki.leaf()
    held = pki.inter_crl_with(
        (leaf.cert.serial_number, T0 - timedelta(days=2), x509.ReasonFlags.certificate_hold)
    )
    store = store_with(pki, held, revocation_mode="soft-fail")
    assert store.revoked_on_record(leaf.cert, CRL_NEXT + timedelta(days=30)) is None
    with pytest.raises(SignerRevoked, match="certificate hold"):
        validate_signer(store, leaf.cert, at=T0)  # while that CRL is current
