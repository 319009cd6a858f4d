"""The built-in CA through the command line, checked by the real ``openssl`` CLI.

Every test drives ``gateway --home HOME keys …`` with click's runner on a real SQLite database
in ``tmp_path``; the round trip is issue → PKCS#12 opened by ``openssl pkcs12`` → signed by
``openssl cms -sign`` and encrypted to a hub → accepted by the pipeline → revoked → the same
message refused as revoked. Commands run on the real clock (certificates and CRLs are made
"now"), so the pipeline judges at ``datetime.now``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import func, select

from archive import tables as t
from archive.db import Database
from formats.cms_envelope import RecipientKey
from formats.errors import SignerRevoked
from formats.smime import payload_entity
from gateway import cli, settings  # cli first: it registers the rest
from gateway.pipeline import Context, process
from keys import ca as ca_mod
from keys import evidence, store
from keys.directory import Agency
from keys.issuing import ORGAN_ID_ATTRIBUTE, issue_hub
from tests.payload_samples import work_permit_report
from tests.pki import build_pki, key

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed"),
]

CA_SECRET = "correct horse battery staple"
P12_SECRET = "p12-handover-secret"
HUB = "hub@exchange.hanoi.gov.vn"
SNV = Agency(
    "H26.SNV",
    "Sở Nội vụ thành phố Hà Nội",
    "Hanoi Department of Home Affairs",
    frozenset({"vanthu@snv.hanoi.gov.vn"}),
)
POLICE = Agency("H26.CATP", "Công an thành phố Hà Nội", "", frozenset({"pa08@congan.hanoi.gov.vn"}))
TWO_BOXES = Agency(
    "H26.STP",
    "Sở Tư pháp thành phố Hà Nội",
    "Hanoi Department of Justice",
    frozenset({"vanthu@stp.hanoi.gov.vn", "hotich@stp.hanoi.gov.vn"}),
)
LONG_NAME = Agency(
    "H26.SLDTBXH",
    "Sở Lao động - Thương binh và Xã hội thành phố Hà Nội",
    "Hanoi Department of Labour, War Invalids and Social Affairs (until 2025)",
    frozenset({"vanthu@sldtbxh.hanoi.gov.vn"}),
)
MAILLESS = Agency("H26.SXD", "Sở Xây dựng thành phố Hà Nội", "", frozenset())
RETIRED = Agency(
    "H26.SKHDT",
    "Sở Kế hoạch và Đầu tư (đã hợp nhất)",
    "",
    frozenset({"vanthu@skhdt.hanoi.gov.vn"}),
    valid_to=datetime(2025, 2, 28).date(),
)


def openssl(*args: str | Path, input: bytes | None = None, ok: bool = True) -> str:
    proc = subprocess.run(
        ["openssl", *map(str, args)], input=input, capture_output=True, check=False
    )
    if ok and proc.returncode != 0:
        raise AssertionError(f"openssl {args[:2]} failed: {proc.stderr.decode(errors='replace')}")
    return (proc.stdout + proc.stderr).decode(errors="replace")


@pytest.fixture(autouse=True)
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_KEY_PASSPHRASE", CA_SECRET)
    monkeypatch.setenv("GATEWAY_P12_PASSPHRASE", P12_SECRET)
    monkeypatch.delenv("GATEWAY_CA_CRL_URL", raising=False)


def db_of(home: Path) -> Database:
    return Database.open(settings.load(home).database_url)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A home with the built-in CA (RSA-3072 to keep the test fast) and six agencies."""
    home = tmp_path / "home"
    home.mkdir()
    result = gw(
        home,
        "keys",
        "ca",
        "init",
        "--key",
        "rsa3072",
        "--name",
        "Test Built-in CA",
        "--days",
        "1000",
    )
    assert result.exit_code == 0, result.output
    db = db_of(home)
    with db.session() as s:
        for agency in (SNV, POLICE, TWO_BOXES, LONG_NAME, MAILLESS, RETIRED):
            store.add_agency(s, agency, at=datetime.now(UTC), actor="test")
    db.dispose()
    return home


def gw(home: Path, *args: str | Path) -> Result:
    return CliRunner().invoke(cli.cli, ["--home", str(home), *map(str, args)])


def event_count(home: Path) -> int:
    db = db_of(home)
    with db.session() as s:
        n = s.scalar(select(func.count()).select_from(t.AdminEvent))
    db.dispose()
    assert n is not None
    return n


def issue(home: Path, out: Path, *extra: str, organ: str = SNV.organ_id) -> dict[str, object]:
    result = gw(home, "keys", "issue", organ, "--out", out, "--json", *extra)
    assert result.exit_code == 0, result.output
    data: dict[str, object] = json.loads(result.stdout)
    return data


# --- init ----------------------------------------------------------------------------------------


def test_init_keeps_key_encrypted_trusts_root_and_publishes_first_crl(home: Path) -> None:
    db = db_of(home)
    with db.session() as s:
        (anchor,) = store.certificates(s, role="anchor")
        key_row = s.scalar(select(t.PrivateKey).where(t.PrivateKey.role == "ca"))
        assert key_row is not None
        assert b"ENCRYPTED PRIVATE KEY" in key_row.encrypted_pem
        assert anchor.source == ca_mod.SOURCE
        assert anchor.subject == "CN=Test Built-in CA"
        assert len(evidence.latest_crls(s)) == 1
        evidence.trust_store(s)  # the pipeline finds an anchor
        actions = [e.action for e in store.events(s)]
    db.dispose()
    assert actions[:4] == ["certificate.add.anchor", "ca.init", "evidence.crl", "ca.crl"]


def test_init_refuses_a_second_root_unless_rotating(home: Path) -> None:
    before = event_count(home)
    again = gw(home, "keys", "ca", "init", "--key", "rsa3072")
    assert again.exit_code == 2
    assert "already exists" in again.stderr
    assert "--rotate" in again.stderr
    same_name = gw(home, "keys", "ca", "init", "--rotate", "--name", "Test Built-in CA")
    assert same_name.exit_code == 2
    assert "different --name" in same_name.stderr
    empty = gw(home, "keys", "ca", "init", "--rotate", "--name", " ")
    assert empty.exit_code == 2
    assert "1 to 64 characters" in empty.stderr
    assert event_count(home) == before

    rotated = gw(
        home, "keys", "ca", "init", "--rotate", "--key", "rsa3072", "--name", "G2", "--json"
    )
    assert rotated.exit_code == 0, rotated.output
    assert json.loads(rotated.stdout)["subject"] == "CN=G2"
    db = db_of(home)
    with db.session() as s:
        roots = ca_mod.authorities(s, passphrase=CA_SECRET.encode())
    db.dispose()
    assert [a.name for a in roots] == ["CN=G2", "CN=Test Built-in CA"]  # newest issues
    crl = gw(home, "keys", "crl", "--json")
    assert [c["issuer"] for c in json.loads(crl.stdout)["crls"]] == ["CN=G2", "CN=Test Built-in CA"]


# --- issue ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rsa3072", "ec-p256"])
def test_issued_certificate_has_the_profile_and_openssl_accepts_it(
    home: Path, tmp_path: Path, kind: str
) -> None:
    out = tmp_path / "out"
    info = issue(home, out, "--key", kind)
    assert info["p12_passphrase"] is None  # it came from $GATEWAY_P12_PASSPHRASE
    pem, chain, p12 = out / "H26.SNV.pem", out / "H26.SNV-chain.pem", out / "H26.SNV.p12"
    assert "OK" in openssl("verify", "-purpose", "smimesign", "-CAfile", chain, pem)
    encrypt = openssl("verify", "-purpose", "smimeencrypt", "-CAfile", chain, pem, ok=False)
    if kind == "rsa3072":
        assert pem.name + ": OK" in encrypt
    else:  # OpenSSL 3.0's smimeencrypt purpose insists on keyEncipherment, which RFC 8550
        # §4.4.2 forbids for EC keys (they use keyAgreement): a known OpenSSL limitation.
        assert "unsuitable certificate purpose" in encrypt
    assert p12.stat().st_mode & 0o077 == 0

    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    assert cert.subject.get_attributes_for_oid(ORGAN_ID_ATTRIBUTE)[0].value == "H26.SNV"
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    org = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    assert (cn, org) == (SNV.name_en, SNV.name_vi)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == ["vanthu@snv.hanoi.gov.vn"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.EMAIL_PROTECTION]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature
    assert (ku.key_encipherment, ku.key_agreement) == (
        (True, False) if kind == "rsa3072" else (False, True)
    )
    cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    assert cert.serial_number.bit_length() > 120

    # Modern PKCS#12 (no -legacy): PBES2/PBKDF2/AES-256-CBC, MAC SHA-256, key + cert + CA.
    dump = openssl("pkcs12", "-in", p12, "-passin", f"pass:{P12_SECRET}", "-info", "-nodes")
    assert "AES-256-CBC" in dump
    assert "sha256" in dump.lower()
    assert "PRIVATE KEY" in dump
    assert dump.count("BEGIN CERTIFICATE") == 2
    wrong = openssl("pkcs12", "-in", p12, "-passin", "pass:nope-nope", "-nodes", ok=False)
    assert "mac verify" in wrong.lower()

    db = db_of(home)
    with db.session() as s:
        (stored,) = store.certificates(s, role="agency", organ_id="H26.SNV")
        assert not s.scalars(select(t.PrivateKey).where(t.PrivateKey.role != "ca")).all()
    db.dispose()
    assert stored.serial == info["serial"]
    assert stored.source == ca_mod.SOURCE


def test_issue_generates_a_p12_passphrase_and_embeds_a_crl_url_when_asked(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GATEWAY_P12_PASSPHRASE")
    info = issue(
        home, tmp_path, "--email", "hotich@stp.hanoi.gov.vn", "--crl-url", "http://ca.hanoi.gov.vn/g1.crl",
        organ="H26.STP",
    )  # fmt: skip
    secret = info["p12_passphrase"]
    assert isinstance(secret, str)
    assert len(secret) >= 20
    openssl("pkcs12", "-in", tmp_path / "H26.STP.p12", "-passin", f"pass:{secret}", "-nokeys")
    cert = x509.load_pem_x509_certificate((tmp_path / "H26.STP.pem").read_bytes())
    dp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert dp[0].full_name is not None
    assert dp[0].full_name[0].value == "http://ca.hanoi.gov.vn/g1.crl"
    db = db_of(home)
    with db.session() as s:
        details = json.dumps([e.detail for e in store.events(s)])
    db.dispose()
    assert secret not in details  # the hand-over secret is shown once, never recorded


# --- the round trip ------------------------------------------------------------------------------


def test_openssl_signed_submission_is_accepted_then_refused_once_revoked(
    home: Path, tmp_path: Path
) -> None:
    info = issue(home, tmp_path)
    p12 = tmp_path / "H26.SNV.p12"
    openssl("pkcs12", "-in", p12, "-passin", f"pass:{P12_SECRET}", "-nodes", "-nocerts",
            "-out", tmp_path / "agency.key")  # fmt: skip
    openssl("pkcs12", "-in", p12, "-passin", f"pass:{P12_SECRET}", "-clcerts", "-nokeys",
            "-out", tmp_path / "agency.pem")  # fmt: skip
    hub = hub_from_ca(home)
    (tmp_path / "hub.pem").write_bytes(hub.cert_pem())
    raw = openssl_submission(tmp_path)

    verdict = process(raw, context(home, hub), at=datetime.now(UTC))
    assert verdict.errors == ()
    assert verdict.accepted

    revoked = gw(home, "keys", "revoke", str(info["serial"]), "--reason", "keyCompromise", "--json")
    assert revoked.exit_code == 0, revoked.output
    (crl_info,) = json.loads(revoked.stdout)["crls"]
    assert crl_info["serials"] == [info["serial"]]

    verdict = process(raw, context(home, hub), at=datetime.now(UTC) + timedelta(seconds=1))
    assert not verdict.accepted
    assert any(isinstance(e, SignerRevoked) for e in verdict.errors)
    assert "revoked" in str(verdict.errors[0]).lower()

    db = db_of(home)
    with db.session() as s:
        (stored,) = store.certificates(s, role="agency", organ_id="H26.SNV")
    db.dispose()
    assert stored.retired_at is not None


def hub_from_ca(home: Path) -> ca_mod.Issued:
    db = db_of(home)
    with db.session() as s:
        root = ca_mod.authorities(s, passphrase=CA_SECRET.encode())[0].issued
    db.dispose()
    return issue_hub(root, email=HUB, at=datetime.now(UTC), key=key("hub", "rsa3072"))


def context(home: Path, hub: ca_mod.Issued) -> Context:
    assert isinstance(hub.key, rsa.RSAPrivateKey)
    db = db_of(home)
    with db.session() as s:
        ctx = Context(
            keys=(RecipientKey(hub.cert, hub.key),),
            trust=evidence.trust_store(s),
            directory=store.directory(s),
            enrolled=store.enrolled(s),
        )
    db.dispose()
    return ctx


def openssl_submission(d: Path) -> bytes:
    xml = work_permit_report(datetime.now(UTC).date())
    (d / "entity").write_bytes(payload_entity(xml))
    signed = openssl("cms", "-sign", "-md", "sha256", "-in", d / "entity",
                     "-signer", d / "agency.pem", "-inkey", d / "agency.key")  # fmt: skip
    (d / "signed").write_text(signed)
    encrypted = openssl("cms", "-encrypt", "-in", d / "signed", "-aes-256-cbc",
                        "-from", "vanthu@snv.hanoi.gov.vn", "-to", HUB, "-subject", "built-in CA",
                        "-recip", d / "hub.pem")  # fmt: skip
    return f"Message-ID: <{uuid.uuid4()}@snv.hanoi.gov.vn>\n".encode() + encrypted.encode()


# --- CRLs ----------------------------------------------------------------------------------------


def test_crl_verifies_with_openssl_lists_reasons_and_numbers_increase(
    home: Path, tmp_path: Path
) -> None:
    first = issue(home, tmp_path / "a")
    second = issue(home, tmp_path / "b", "--email", "vanthu@stp.hanoi.gov.vn", organ="H26.STP")
    assert gw(home, "keys", "revoke", str(first["serial"]), "--reason", "superseded").exit_code == 0
    earlier = datetime.now(UTC).isoformat()  # --at: the moment it happened
    done = gw(
        home, "keys", "revoke", str(second["serial"]), "--reason", "unspecified", "--at", earlier
    )
    assert done.exit_code == 0, done.output

    out = tmp_path / "ca.crl.pem"
    result = gw(home, "keys", "crl", "--out", out, "--days", "3", "--json")
    assert result.exit_code == 0, result.output
    (info,) = json.loads(result.stdout)["crls"]
    assert info["number"] == 4  # init, two revocations, this one
    assert sorted(info["serials"]) == sorted([first["serial"], second["serial"]])
    chain = tmp_path / "a/H26.SNV-chain.pem"
    text = openssl("crl", "-in", out, "-verify", "-CAfile", chain, "-noout", "-text")
    assert "verify OK" in text
    assert str(first["serial"]).upper() in text.replace(":", "").upper()
    assert "Superseded" in text
    assert text.count("CRL Reason Code") == 1  # RFC 5280 §5.3.1: no code for unspecified
    assert "X509v3 Authority Key Identifier" in text
    assert "X509v3 CRL Number" in text

    db = db_of(home)
    with db.session() as s:
        evidence = s.scalars(select(t.RevocationEvidence).order_by(t.RevocationEvidence.id)).all()
    db.dispose()
    assert [e.number for e in evidence] == ["1", "2", "3", "4"]
    assert {e.source for e in evidence} == {ca_mod.SOURCE}
    nxt = evidence[-1].next_update
    assert nxt is not None
    assert nxt - evidence[-1].this_update == timedelta(days=3)


# --- refusals ------------------------------------------------------------------------------------

BAD_ISSUES = {
    "unknown agency": (["H26.NOPE"], "no agency 'H26.NOPE'"),
    "several mailboxes": (["H26.STP"], "hotich@stp.hanoi.gov.vn, vanthu@stp.hanoi.gov.vn"),
    "foreign mailbox": (["H26.SNV", "--email", "x@example.vn"], "is not a mailbox of agency"),
    "no mailbox": (["H26.SXD"], "has no e-mail address"),
    "retired agency": (["H26.SKHDT"], "is not active on"),
    "outlives the CA": (["H26.SNV", "--days", "1200"], "would outlive the CA"),
    "name too long for a CN": (["H26.SLDTBXH"], "longer than the 64 characters"),
    "bad days": (["H26.SNV", "--days", "0"], "between 1 and"),
    "bad crl url": (["H26.SNV", "--crl-url", "file:///etc/passwd"], "must be an http"),
}


@pytest.mark.parametrize("case", list(BAD_ISSUES))
def test_bad_issue_says_why_and_changes_nothing(home: Path, tmp_path: Path, case: str) -> None:
    args, message = BAD_ISSUES[case]
    before = event_count(home)
    result = gw(home, "keys", "issue", *args, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert event_count(home) == before
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_secrets_problems_say_why_and_change_nothing(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = event_count(home)
    monkeypatch.setenv("GATEWAY_KEY_PASSPHRASE", "wrong")
    wrong = gw(home, "keys", "issue", "H26.SNV", "--out", tmp_path)
    assert wrong.exit_code == 2
    assert "wrong or missing passphrase" in wrong.stderr
    monkeypatch.delenv("GATEWAY_KEY_PASSPHRASE")
    missing = gw(home, "keys", "crl")
    assert missing.exit_code == 2
    assert "no passphrase for the CA key" in missing.stderr
    monkeypatch.setenv("GATEWAY_KEY_PASSPHRASE", CA_SECRET)
    monkeypatch.setenv("GATEWAY_P12_PASSPHRASE", "short")
    short = gw(home, "keys", "issue", "H26.SNV", "--out", tmp_path)
    assert short.exit_code == 2
    assert "at least 8 characters" in short.stderr
    assert event_count(home) == before
    assert list(tmp_path.glob("*.p12")) == []


def test_issue_never_overwrites_a_bundle(home: Path, tmp_path: Path) -> None:
    (tmp_path / "H26.SNV.p12").write_bytes(b"the agency's current key")
    before = event_count(home)
    result = gw(home, "keys", "issue", "H26.SNV", "--out", tmp_path)
    assert result.exit_code == 2
    assert "already exist" in result.stderr
    assert event_count(home) == before
    assert (tmp_path / "H26.SNV.p12").read_bytes() == b"the agency's current key"


def test_bad_revocations_say_why_and_change_nothing(home: Path, tmp_path: Path) -> None:
    issued = issue(home, tmp_path)
    assert (
        gw(home, "keys", "revoke", str(issued["serial"]), "--reason", "superseded").exit_code == 0
    )
    pki = build_pki()  # another CA's certificate, known to the store
    db = db_of(home)
    with db.session() as s:
        store.add_certificate(s, pki.agency.cert, role="agency", at=datetime.now(UTC), actor="t")
        root_serial = ca_mod.certificates(s)[0].serial
    db.dispose()
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    cases = {
        "deadbeef": "no stored certificate has serial deadbeef",
        "not-hex": "is not a hexadecimal serial number",
        str(issued["serial"]): "was already revoked",
        f"{pki.agency.cert.serial_number:x}": "not by the built-in CA",
        root_serial: "built-in CA's own root",
    }
    before = event_count(home)
    for serial, message in cases.items():
        result = gw(home, "keys", "revoke", serial, "--reason", "keyCompromise")
        assert result.exit_code == 2, serial
        assert message in result.stderr, result.stderr
    late = gw(home, "keys", "revoke", "deadbeef", "--reason", "superseded", "--at", future)
    assert "in the future" in late.stderr
    bad_reason = gw(home, "keys", "revoke", "deadbeef", "--reason", "lostIt")
    assert bad_reason.exit_code == 2
    assert event_count(home) == before


def test_commands_without_a_ca_say_how_to_make_one(tmp_path: Path) -> None:
    for args in (["crl"], ["revoke", "01", "--reason", "superseded"], ["issue", "H26.SNV"]):
        result = gw(tmp_path, "keys", *args)
        assert result.exit_code == 2
        assert "gateway keys ca init" in result.stderr or "no agency" in result.stderr
    assert "Traceback" not in result.output


def test_commands_are_reachable_under_the_ca_group_too(home: Path) -> None:
    result = gw(home, "keys", "ca", "crl", "--json")
    assert result.exit_code == 0, result.output
    assert os.environ["GATEWAY_KEY_PASSPHRASE"] == CA_SECRET
