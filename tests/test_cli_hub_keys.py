"""The hub's own keys through the CLI, on a real home: one rule for the hub keys usable at an
instant (not retired, inside the certificate's validity and the admin's ``keys window``), kept
by decryption and signing alike, whether a key pair is in the key store, in the ``[hub]``
files, or both; ``keys hub import`` and ``keys hub new`` store only a certificate that is the
hub's (its address, a path to a trust anchor); lifetimes and horizons are range-checked.

The PKI is made at test time (keys.issuing) around the moment the module loads, since the CLI
judges at its own clock; no test asserts on that clock.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    pkcs12,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from archive.db import Database
from formats.payload import Organ, build_payload
from gateway import cli, worker_process
from gateway import doctor as doctor_mod
from gateway import settings as settings_mod
from gateway.demo import HUB_ADDRESS, WORK_PERMITS, DemoWorld
from gateway.loading import load_context, usable_hub_fingerprints
from gateway.worker_process import hub_signer
from keys import evidence, store
from keys.issuing import Issued, issue_agency, issue_hub, make_crl, make_intermediate, make_root
from tests.pki import key
from tests.test_outbound_recipients import _openssl_opens

PASS = b"hub keys test passphrase"
SNV = "vanthu@snv.hanoi.gov.vn"
#: When this module's PKI is made: everything is valid from a day or two before it.
T = datetime.now(UTC).replace(microsecond=0)


@dataclass(frozen=True)
class Pki:
    root: Issued
    hub_a: Issued  # in the key store and in the [hub] files (as the demo home has it)
    hub_b: Issued  # in the key store only, newer
    snv: Issued
    crl: x509.CertificateRevocationList


@pytest.fixture(scope="module")
def pki() -> Pki:
    root = make_root("Hub keys test root", at=T - timedelta(days=3), key=key("hk-root"))
    return Pki(
        root=root,
        hub_a=issue_hub(
            root,
            email=HUB_ADDRESS,
            at=T - timedelta(days=2),
            common_name="Hub A",
            key=key("hk-hub-a"),
        ),
        hub_b=issue_hub(
            root,
            email=HUB_ADDRESS,
            at=T - timedelta(days=1),
            common_name="Hub B",
            key=key("hk-hub-b"),
        ),
        snv=issue_agency(
            root,
            email=SNV,
            organ_id="H26.SNV",
            common_name="Hanoi Department of Home Affairs",
            at=T - timedelta(days=2),
            key=key("hk-snv"),
        ),
        crl=make_crl(
            root,
            revoked=[],
            this_update=T - timedelta(hours=1),
            next_update=T + timedelta(days=7),
            number=1,
        ),
    )


@pytest.fixture
def home(tmp_path: Path, pki: Pki, world: DemoWorld) -> Path:
    """Hub keys A (store and files) and B (store), the Hanoi demo directory, H26.SNV enrolled."""
    home = tmp_path / "home"
    (home / "keys").mkdir(parents=True, mode=0o700)
    (home / "keys/passphrase").write_bytes(PASS + b"\n")
    (home / "keys/hub.pem").write_bytes(pki.hub_a.cert_pem())
    (home / "keys/hub.key").write_bytes(pki.hub_a.key_pem(PASS))
    (home / "gateway.toml").write_text(
        f'[hub]\naddress = "{HUB_ADDRESS}"\npassphrase_file = "keys/passphrase"\n',
        encoding="utf-8",
    )
    db = Database.open(f"sqlite:///{home / 'archive.db'}")
    try:
        with db.session() as s:
            for agency in world.directory:
                store.add_agency(s, agency, at=T, actor="test")
            store.add_certificate(s, pki.root.cert, role="anchor", at=T, actor="test")
            evidence.add_crl(s, pki.crl, source="test", at=T, actor="test")
            store.add_certificate(
                s, pki.snv.cert, role="agency", organ_id="H26.SNV", at=T, actor="test"
            )
            for hub in (pki.hub_a, pki.hub_b):
                store.add_private_key(
                    s, hub.cert, hub.key, role="hub", passphrase=PASS, at=T, actor="test"
                )
    finally:
        db.dispose()
    return home


def run(home: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli.cli, ["--home", str(home), *args], env=env)


def refused(result: Result) -> str:
    """A clean refusal: exit 2 and one line, not an exception escaping the command."""
    assert result.exit_code == 2, (result.exception, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert len(result.output.strip().splitlines()) == 1, result.output
    return result.output


def fp(issued: Issued) -> str:
    return store.fingerprint(issued.cert)


def message_to(home: Path, world: DemoWorld, pki: Pki, hub: Issued) -> Path:
    """A signed work-permit submission from H26.SNV, encrypted to ``hub`` alone."""
    path = home / f"to-{hub.cert.serial_number:x}.eml"
    path.write_bytes(world.submission("H26.SNV", signer=pki.snv, to=[hub.cert]))
    return path


def verdict(home: Path, message: Path) -> dict[str, object]:
    result = run(home, "check", str(message), "--json")
    assert result.exit_code in (0, 1), (result.exception, result.output)
    out: dict[str, object] = json.loads(result.stdout)
    return out


def reason_codes(v: dict[str, object]) -> list[str]:
    return [r["code"] for r in v["reasons"]]  # type: ignore[attr-defined]


def context_keys(home: Path) -> set[str]:
    ctx = load_context(settings_mod.load(home))
    return {store.fingerprint(k.cert) for k in ctx.keys}


# --- 5. retiring a key the [hub] files also hold ------------------------------------------------


def test_retiring_a_hub_key_that_the_hub_files_also_hold_ends_it(
    home: Path, world: DemoWorld, pki: Pki
) -> None:
    to_a, to_b = message_to(home, world, pki, pki.hub_a), message_to(home, world, pki, pki.hub_b)
    assert verdict(home, to_a)["disposition"] == "accepted"
    assert context_keys(home) == {fp(pki.hub_a), fp(pki.hub_b)}  # A once, though held twice

    result = run(home, "keys", "hub", "retire", fp(pki.hub_a)[:16])
    assert result.exit_code == 0, result.output
    assert f"retired hub key {fp(pki.hub_a)[:16]}; 1 key(s) remain" in result.output
    assert "keys/hub.pem (named in [hub]) holds the same certificate" in result.output

    # docs/keys.md: `keys hub retire OLD-REF` ends that — the files' copy included.
    v = verdict(home, to_a)
    assert v["disposition"] != "accepted" and reason_codes(v) == ["not-for-us"], v
    assert verdict(home, to_b)["disposition"] == "accepted"
    assert context_keys(home) == {fp(pki.hub_b)}
    settings = settings_mod.load(home)
    db = Database.open(settings.database_url)
    try:
        line, _ = doctor_mod.hub_keys(settings, db, datetime.now(UTC))
    finally:
        db.dispose()
    assert line.status == "OK" and line.message.startswith("1 hub key pair(s) decrypt"), line


def test_gateway_send_encrypts_only_to_the_hub_keys_of_now(
    home: Path, pki: Pki, tmp_path: Path
) -> None:
    """`gateway send` for an agency without a mail client: after `keys hub retire A` (A is in
    the [hub] files too), the message is encrypted to B alone."""
    assert run(home, "keys", "hub", "retire", fp(pki.hub_a)[:16]).exit_code == 0
    payload = build_payload(
        "work-permit", sender=Organ("H26.SNV"), recipients=[Organ("H26.CATP")],
        records=WORK_PERMITS, document_number="10/SNV", issued_on=T.date(), period="2026-10",
        message_id=uuid.uuid4(),
    )  # fmt: skip
    (tmp_path / "payload.xml").write_bytes(payload.to_xml())
    p12 = _p12(tmp_path / "snv.p12", pki.snv)
    out = tmp_path / "out.eml"
    result = run(
        home, "send", str(tmp_path / "payload.xml"), "--as", "H26.SNV", "--to", "H26.CATP",
        "--key", str(p12), "--output", str(out), env={"GATEWAY_SEND_PASSPHRASE": "p12"},
    )  # fmt: skip
    assert result.exit_code == 0, (result.exception, result.output)
    assert verdict(home, out)["disposition"] == "accepted"  # B decrypts it
    message = out.read_bytes()
    assert _openssl_opens(message, pki.hub_b, tmp_path)
    assert not _openssl_opens(message, pki.hub_a, tmp_path)  # openssl: not encrypted to A


def test_the_last_usable_hub_key_cannot_be_retired(home: Path, pki: Pki) -> None:
    assert run(home, "keys", "hub", "retire", fp(pki.hub_b)[:16]).exit_code == 0
    assert "last key usable now" in refused(run(home, "keys", "hub", "retire", fp(pki.hub_a)))
    assert context_keys(home) == {fp(pki.hub_a)}


# --- 6. the admin's window holds for serve's signer and for decryption ------------------------


@pytest.mark.parametrize(
    "window",
    [
        ("--until", (T - timedelta(days=1) + timedelta(hours=1)).isoformat()),  # ended
        ("--from", (T + timedelta(days=1)).isoformat()),  # not started
    ],
)
def test_a_hub_keys_window_holds_for_signing_and_decryption(
    home: Path, world: DemoWorld, pki: Pki, window: tuple[str, str]
) -> None:
    to_a, to_b = message_to(home, world, pki, pki.hub_a), message_to(home, world, pki, pki.hub_b)
    assert verdict(home, to_b)["disposition"] == "accepted"
    before = load_context(settings_mod.load(home))
    assert hub_signer(before, datetime.now(UTC))[0] == pki.hub_b.cert  # the newest signs

    result = run(home, "keys", "window", fp(pki.hub_b)[:16], *window)
    assert result.exit_code == 0, result.output

    # gateway serve's signer (receipts, checkpoints) and `archive checkpoint` agree: A.
    ctx = load_context(settings_mod.load(home))
    assert hub_signer(ctx, datetime.now(UTC))[0] == pki.hub_a.cert
    result = run(home, "archive", "checkpoint", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["signer"] == pki.hub_a.cert.subject.rfc4514_string()
    # … and B no longer decrypts.
    assert {store.fingerprint(k.cert) for k in ctx.keys} == {fp(pki.hub_a)}
    v = verdict(home, to_b)
    assert v["disposition"] != "accepted" and reason_codes(v) == ["not-for-us"], v
    assert verdict(home, to_a)["disposition"] == "accepted"


def test_a_running_worker_signs_with_the_key_of_now_without_a_restart(
    home: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker signs receipts, deliveries and checkpoints with B; the admin ends B's window
    while it runs: its next cycle signs with A, as `gateway archive checkpoint` would."""
    monkeypatch.setattr(worker_process, "CONTEXT_CHECK", 0.0)  # look at every call
    settings = settings_mod.load(home)
    db = Database.open(settings.database_url)
    try:
        worker, builder, refresh = worker_process._start_worker(settings, db)
        assert builder.hub.signer[0] == pki.hub_b.cert
        assert worker.archive.signer is not None and worker.archive.signer[0] == pki.hub_b.cert
        end = (T - timedelta(days=1) + timedelta(hours=1)).isoformat()
        assert run(home, "keys", "window", fp(pki.hub_b)[:16], "--until", end).exit_code == 0
        refresh()
        assert builder.hub.signer[0] == pki.hub_a.cert
        assert worker.archive.signer is not None and worker.archive.signer[0] == pki.hub_a.cert
    finally:
        db.dispose()


def test_the_usable_hub_keys_follow_the_instant_asked_about(home: Path, pki: Pki) -> None:
    """What a running worker compares to reload its keys when a window starts or ends."""
    end = T - timedelta(days=1) + timedelta(hours=1)
    assert run(home, "keys", "window", fp(pki.hub_b), "--until", end.isoformat()).exit_code == 0
    settings = settings_mod.load(home)
    db = Database.open(settings.database_url)
    try:
        with db.session(read_only=True) as s:
            inside = usable_hub_fingerprints(settings, s, end - timedelta(minutes=30))
            after = usable_hub_fingerprints(settings, s, end + timedelta(seconds=1))
            before_a = usable_hub_fingerprints(settings, s, T - timedelta(days=2, seconds=1))
    finally:
        db.dispose()
    assert inside == {fp(pki.hub_a), fp(pki.hub_b)}
    assert after == {fp(pki.hub_a)}
    assert before_a == frozenset()  # neither certificate is valid yet


# --- 7. `keys hub import` stores only the hub's certificate ------------------------------------


def _self_signed(email: str) -> Issued:
    k = key("hk-self-signed")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Not the hub")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(k.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(T - timedelta(days=1))
        .not_valid_after(T + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
        )
        .sign(k, hashes.SHA256())
    )
    return Issued(cert, k)


def _p12(path: Path, issued: Issued, chain: tuple[x509.Certificate, ...] = ()) -> Path:
    path.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"hub",
            issued.key,
            issued.cert,
            list(chain) or None,
            BestAvailableEncryption(b"p12"),
        )
    )
    return path


def _hub_rows(home: Path) -> list[str]:
    result = run(home, "keys", "hub", "list", "--all", "--json")
    assert result.exit_code == 0, result.output
    return [row["sha256"] for row in json.loads(result.stdout)]


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (  # the reviewer's: self-signed, someone else's address
            lambda pki: _self_signed("someone@else.example"),
            [
                "names someone@else.example, not the hub's address " + HUB_ADDRESS,
                "its path does not validate to a trust anchor of the hub",
            ],
        ),
        (  # the hub's address, but vouched for by nobody the hub trusts
            lambda pki: _self_signed(HUB_ADDRESS),
            ["its path does not validate to a trust anchor of the hub"],
        ),
        (  # a CA the hub does not trust
            lambda pki: issue_hub(
                make_root("Some other root", at=T - timedelta(days=1), key=key("hk-other")),
                email=HUB_ADDRESS,
                at=T - timedelta(days=1),
                key=key("hk-hub-c"),
            ),
            ["its path does not validate to a trust anchor of the hub"],
        ),
        (  # the hub's own CA, another mailbox
            lambda pki: issue_hub(
                pki.root,
                email="someone@exchange.hanoi.gov.vn",
                at=T - timedelta(days=1),
                key=key("hk-hub-c"),
            ),
            ["names someone@exchange.hanoi.gov.vn, not the hub's address"],
        ),
        (  # an agency's certificate, however well it chains
            lambda pki: pki.snv,
            ["names " + SNV + ", not the hub's address"],
        ),
    ],
)
def test_hub_import_refuses_a_certificate_that_is_not_the_hubs(
    home: Path, pki: Pki, make: object, says: list[str]
) -> None:
    issued = make(pki)  # type: ignore[operator]
    rows = _hub_rows(home)
    result = run(
        home,
        "keys",
        "hub",
        "import",
        str(_p12(home / "x.p12", issued)),
        env={"GATEWAY_P12_PASSPHRASE": "p12"},
    )
    message = refused(result)
    assert "cannot be imported as the hub's certificate" in message
    for text in says:
        assert text in message
    assert _hub_rows(home) == rows  # nothing stored
    assert hub_signer(load_context(settings_mod.load(home)), datetime.now(UTC))[0] in (
        pki.hub_a.cert,
        pki.hub_b.cert,
    )


def test_hub_import_takes_the_hubs_certificate_with_its_chain(home: Path, pki: Pki) -> None:
    """Issued through a sub-CA the key store does not hold: the PKCS#12 file carries it."""
    sub = make_intermediate(pki.root, "Hub sub-CA", at=T - timedelta(days=1), key=key("hk-sub"))
    hub = issue_hub(sub, email=HUB_ADDRESS, at=T - timedelta(hours=1), key=key("hk-hub-d"))
    p12 = _p12(home / "hub.p12", hub, (sub.cert,))
    result = run(
        home, "keys", "hub", "import", str(p12), "--json", env={"GATEWAY_P12_PASSPHRASE": "p12"}
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["sha256"] == fp(hub)
    without_chain = issue_hub(sub, email=HUB_ADDRESS, at=T - timedelta(hours=1), key=key("hk-e"))
    result = run(
        home,
        "keys",
        "hub",
        "import",
        str(_p12(home / "bare.p12", without_chain)),
        env={"GATEWAY_P12_PASSPHRASE": "p12"},
    )
    assert "does not validate to a trust anchor" in refused(result)


# --- 10. `keys hub new`: the same check, and a lifetime within the CA's ---------------------------


@pytest.fixture
def ca_home(tmp_path: Path) -> Path:
    """A home from `gateway init` with a built-in CA valid for a year."""
    home = tmp_path / "ca-home"
    assert run(home, "init").exit_code == 0
    (home / "keys").mkdir(exist_ok=True, mode=0o700)
    (home / "keys/passphrase").write_bytes(PASS + b"\n")
    config = home / "gateway.toml"
    hub = f'[hub]\naddress = "{HUB_ADDRESS}"\npassphrase_file = "keys/passphrase"\n'
    config.write_text(config.read_text(encoding="utf-8").replace("[hub]\n", hub), "utf-8")
    result = run(
        home, "keys", "ca", "init", "--name", "Test CA", "--days", "365", "--key", "rsa3072"
    )
    assert result.exit_code == 0, result.output
    return home


def test_hub_new_checks_its_lifetime_and_makes_a_certificate_that_passes_import(
    ca_home: Path,
) -> None:
    for days in ("0", "-1", "3651", "99999"):
        message = refused(run(ca_home, "keys", "hub", "new", "--days", days))
        assert f"--days {days}: give a number of days between 1 and 3650" in message
    assert "would outlive the CA (CN=Test CA" in refused(
        run(ca_home, "keys", "hub", "new", "--days", "366")
    )
    assert "must name its address " + HUB_ADDRESS in refused(
        run(ca_home, "keys", "hub", "new", "--email", "other@exchange.hanoi.gov.vn")
    )
    assert _hub_rows(ca_home) == []

    result = run(ca_home, "keys", "hub", "new", "--days", "300", "--json")
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert row["emails"] == [HUB_ADDRESS]
    assert _hub_rows(ca_home) == [row["sha256"]]
