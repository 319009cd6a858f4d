"""OCSP evidence: requests to a real responder (``openssl ocsp``), checked answers, the store.

The responder runs as a subprocess on a free port with an ``index.txt`` in openssl's CA
database format (one serial "V" valid, one "R" revoked). openssl stamps its answers with the
real clock, so these tests take "now" from the clock too, once, and pass it down. Answers the
hub must refuse (forged, stale, about another certificate …) are served from a tiny
``http.server`` on loopback.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from archive.db import Database
from formats.errors import ConfigError, InputError, RevocationUnavailable, SignerRevoked
from gateway import settings as settings_mod
from gateway.cli import cli
from gateway.loading import load_context
from keys import evidence, store
from keys import ocsp as ocsp_mod
from keys.directory import Agency
from keys.issuing import Issued, issue_agency, issue_hub, make_root
from keys.trust import TrustStore
from tests.pki import key
from tests.servers import free_port

ACTOR = "test"
PASS = "test-only passphrase"
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


# --- a small PKI whose certificates name an OCSP responder ---------------------------------------


@dataclass(frozen=True)
class World:
    at: datetime
    root: Issued
    good: Issued
    revoked: Issued
    revoked_at: datetime
    db: Database


def _agency(organ_id: str, email: str) -> Agency:
    return Agency(organ_id=organ_id, name_vi=organ_id, name_en=organ_id, emails=frozenset([email]))


def make_world(tmp_path: Path, ocsp_url: str | None, *, enrol_revoked: bool = True) -> World:
    at = datetime.now(UTC).replace(microsecond=0)
    root = make_root("OCSP Test Root", at=at - timedelta(days=1), key=key("ocsp-root", "rsa3072"))

    def agency(organ_id: str, email: str) -> Issued:
        return issue_agency(
            root, email=email, organ_id=organ_id, common_name=organ_id, at=at - timedelta(hours=1),
            key=key(f"ocsp-{organ_id}"), ocsp_url=ocsp_url,
        )  # fmt: skip

    good = agency("H26.SNV", "vanthu@snv.hanoi.gov.vn")
    revoked = agency("H26.STP", "vanthu@stp.hanoi.gov.vn")
    db = Database.open(f"sqlite:///{tmp_path}/a.db")
    with db.session() as s:
        store.add_certificate(s, root.cert, role="anchor", at=at, actor=ACTOR)
        enrol = [("H26.SNV", good), ("H26.STP", revoked)][: 2 if enrol_revoked else 1]
        for organ_id, issued in enrol:
            store.add_agency(s, _agency(organ_id, issued_email(issued)), at=at, actor=ACTOR)
            store.add_certificate(
                s, issued.cert, role="agency", organ_id=organ_id, at=at, actor=ACTOR
            )
    return World(at, root, good, revoked, at - timedelta(minutes=10), db)


def issued_email(issued: Issued) -> str:
    return store.san_emails(issued.cert)[0]


def responder_cert(issuer: Issued, *, eku: bool = True, name: str = "OCSP Responder") -> Issued:
    """A delegated responder (RFC 6960 §4.2.2.2) with id-pkix-ocsp-nocheck, so the path
    validator does not ask for the responder's own revocation status."""
    k = key("ocsp-responder")
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer.cert.subject)
        .public_key(k.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.OCSPNoCheck(), critical=False)
    )
    if eku:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False
        )
    return Issued(builder.sign(issuer.key, hashes.SHA256()), k)


# --- a real responder: openssl ocsp --------------------------------------------------------------


def _utctime(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%y%m%d%H%M%SZ")


def write_index(path: Path, world: World) -> None:
    """openssl's CA database: status, expiry, revocation[,reason], serial (hex, whole bytes —
    as BN_bn2hex prints it, which is what `openssl ocsp` looks up), file, subject."""

    def line(issued: Issued, status: str, revoked: str = "") -> str:
        serial = f"{issued.cert.serial_number:X}"
        serial = serial.zfill(len(serial) + len(serial) % 2)
        subject = "/CN=" + issued.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        expiry = _utctime(issued.cert.not_valid_after_utc)
        return f"{status}\t{expiry}\t{revoked}\t{serial}\tunknown\t{subject}\n"

    revoked = f"{_utctime(world.revoked_at)},keyCompromise"
    path.write_text(line(world.good, "V") + line(world.revoked, "R", revoked))


@contextlib.contextmanager
def openssl_responder(workdir: Path, port: int, *, signer: Issued, ca: Issued) -> Iterator[str]:
    """`openssl ocsp` answering from ``workdir/index.txt``; yields its URL. OpenSSL 3.0's
    ``-port`` takes a number only, so it listens on every interface, not just loopback."""
    (workdir / "rsigner.pem").write_bytes(signer.cert_pem())
    (workdir / "rsigner.key").write_bytes(signer.key_pem())
    (workdir / "ca.pem").write_bytes(ca.cert_pem())
    log_path = workdir / "ocsp.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["openssl", "ocsp", "-index", "index.txt", "-port", str(port),
             "-rsigner", "rsigner.pem", "-rkey", "rsigner.key", "-CA", "ca.pem",
             "-nmin", "5", "-ignore_err"],
            cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while b"waiting for OCSP client connections" not in log_path.read_bytes():
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"openssl ocsp did not start: {log_path.read_text()}")
                time.sleep(0.05)
            yield f"http://127.0.0.1:{port}/"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- a fake responder for answers the hub must refuse ---------------------------------------------


class FakeResponder:
    """Answers every POST with ``body`` and keeps what it was sent."""

    def __init__(self) -> None:
        self.body = b""
        self.code = 200
        self.requests: list[tuple[str, bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                outer.requests.append(
                    (self.headers.get("Content-Type", ""), self.rfile.read(length))
                )
                self.send_response(outer.code)
                self.send_header("Content-Type", "application/ocsp-response")
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args: object) -> None:
                return None

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake() -> Iterator[FakeResponder]:
    server = FakeResponder()
    try:
        yield server
    finally:
        server.close()


def signed_response(
    world: World,
    *,
    about: Issued | None = None,
    signer: Issued | None = None,
    by_name: bool = False,
    this_update: timedelta = -timedelta(minutes=1),
    next_update: timedelta | None = timedelta(hours=1),
    status: ocsp.OCSPCertStatus = ocsp.OCSPCertStatus.GOOD,
) -> bytes:
    """An answer about ``about`` (default: the good certificate) signed by ``signer`` (default:
    the root), named in responderID by key hash or ``by_name``; a signer other than the root
    is carried in the response."""
    signer = signer or world.root
    builder = ocsp.OCSPResponseBuilder().add_response(
        cert=(about or world.good).cert,
        issuer=world.root.cert,
        algorithm=hashes.SHA1(),
        cert_status=status,
        this_update=world.at + this_update,
        next_update=world.at + next_update if next_update is not None else None,
        revocation_time=None,
        revocation_reason=None,
    )
    encoding = ocsp.OCSPResponderEncoding.NAME if by_name else ocsp.OCSPResponderEncoding.HASH
    builder = builder.responder_id(encoding, signer.cert)
    if signer.cert.subject != world.root.cert.subject:
        builder = builder.certificates([signer.cert])
    return builder.sign(signer.key, hashes.SHA256()).public_bytes(Encoding.DER)


def _only(outcomes: list[ocsp_mod.Outcome], issued: Issued) -> ocsp_mod.Outcome:
    [outcome] = [o for o in outcomes if o.serial == f"{issued.cert.serial_number:x}"]
    return outcome


def _fetch(world: World, **kwargs: object) -> list[ocsp_mod.Outcome]:
    with world.db.session() as s:
        return ocsp_mod.refresh(s, at=world.at, actor=ACTOR, **kwargs)  # type: ignore[arg-type]


def _trust(world: World) -> TrustStore:
    with world.db.session() as s:
        return TrustStore(anchors=(world.root.cert,), ocsps=tuple(evidence.latest_ocsps(s)))


# --- against openssl ocsp -------------------------------------------------------------------------


@pytest.mark.interop
@needs_openssl
def test_openssl_answers_decide_validation_without_any_crl(tmp_path: Path) -> None:
    port = free_port()
    world = make_world(tmp_path, f"http://127.0.0.1:{port}/")
    write_index(tmp_path / "index.txt", world)
    with openssl_responder(tmp_path, port, signer=world.root, ca=world.root):
        outcomes = _fetch(world)
        assert _only(outcomes, world.good).status == "stored"
        assert _only(outcomes, world.good).detail == "good"
        assert _only(outcomes, world.revoked).status == "stored"
        assert _only(outcomes, world.revoked).detail.startswith(
            f"revoked {world.revoked_at:%Y-%m-%d %H:%M:%SZ} (keyCompromise)"
        )
        # Still fresh (openssl -nmin 5): not asked again unless forced.
        assert {o.status for o in _fetch(world)} == {"fresh"}
        assert {o.status for o in _fetch(world, force=True)} <= {"stored", "unchanged"}

    with world.db.session() as s:
        assert len(evidence.latest_ocsps(s)) == 2  # one per certificate, however often fetched
        assert evidence.latest_crls(s) == []
        events = [e for e in store.events(s) if e.action == "evidence.ocsp"]
    assert {e.detail["status"] for e in events} == {"good", "revoked"}
    assert {e.subject for e in events} == {"CN=OCSP Test Root"}

    # pyhanko refuses an answer stamped after the moment checked (tolerance 0), and openssl
    # stamped it after `world.at`: check at a moment after the fetch, as the pipeline would.
    checked = datetime.now(UTC)
    trust = _trust(world)
    signer = trust.validate_signer(world.good.cert, at=checked)
    assert signer.revocation_checked
    [response] = signer.evidence
    assert ocsp.load_der_ocsp_response(response).serial_number == world.good.cert.serial_number
    with pytest.raises(SignerRevoked, match="key compromise"):
        trust.validate_signer(world.revoked.cert, at=checked)
    # The OCSP answers are what decided: without them there is no evidence at all.
    with pytest.raises(RevocationUnavailable):
        TrustStore(anchors=(world.root.cert,)).validate_signer(world.good.cert, at=checked)


@pytest.mark.interop
@needs_openssl
def test_delegated_responder_and_both_cert_id_hashes(tmp_path: Path) -> None:
    port = free_port()
    world = make_world(tmp_path, f"http://127.0.0.1:{port}/")
    write_index(tmp_path / "index.txt", world)
    delegated = responder_cert(world.root)
    with openssl_responder(tmp_path, port, signer=delegated, ca=world.root) as url:
        # SHA-1 CertID (RFC 5019 §2.1.1, the default) and SHA-256: openssl 3 answers both.
        for algorithm in (hashes.SHA1(), hashes.SHA256()):
            request = ocsp_mod.build_request(world.good.cert, world.root.cert, algorithm)
            der = ocsp_mod.post(url, request)
            resp = ocsp_mod.verify_response(der, world.good.cert, world.root.cert, at=world.at)
            assert resp.hash_algorithm.name == algorithm.name
            assert resp.certificates == [delegated.cert]
        outcomes = _fetch(world)
    assert [o.status for o in outcomes] == ["stored", "stored"]
    checked, trust = datetime.now(UTC), _trust(world)
    assert trust.validate_signer(world.good.cert, at=checked).revocation_checked
    with pytest.raises(SignerRevoked):
        trust.validate_signer(world.revoked.cert, at=checked)


@pytest.mark.interop
@needs_openssl
def test_cli_fetch_and_list_and_the_pipeline_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    world = make_world(tmp_path, f"http://127.0.0.1:{port}/")
    write_index(tmp_path / "index.txt", world)
    (tmp_path / "gateway.toml").write_text('[database]\nurl = "sqlite:///a.db"\n')
    runner = CliRunner()
    with openssl_responder(tmp_path, port, signer=world.root, ca=world.root):
        result = runner.invoke(cli, ["--home", str(tmp_path), "keys", "ocsp", "fetch", "--json"])
    assert result.exit_code == 0, result.output
    assert {o["status"] for o in json.loads(result.output)} == {"stored"}
    result = runner.invoke(cli, ["--home", str(tmp_path), "keys", "ocsp", "list", "--json"])
    rows = json.loads(result.output)
    assert sorted(r["status"].split()[0] for r in rows) == ["good", "revoked"]
    assert all(r["fresh"] and r["issuer"] == "CN=OCSP Test Root" for r in rows)
    text = runner.invoke(cli, ["--home", str(tmp_path), "keys", "ocsp", "list"]).output
    assert text.count("fresh ") == 2

    # The pipeline's trust store is given the stored answers.
    hub = issue_hub(world.root, email="hub@gateway.localhost", at=world.at, key=key("ocsp-hub"))
    with world.db.session() as s:
        store.add_private_key(
            s, hub.cert, hub.key, role="hub", passphrase=PASS.encode(), at=world.at, actor=ACTOR
        )
        stored = tuple(evidence.latest_ocsps(s))
    monkeypatch.setenv("GATEWAY_KEY_PASSPHRASE", PASS)
    context = load_context(settings_mod.load(tmp_path))
    assert set(context.trust.ocsps) == set(stored)
    checked = datetime.now(UTC)
    assert context.trust.validate_signer(world.good.cert, at=checked).revocation_checked


# --- refused answers (served by a fake responder) -------------------------------------------------


def _impostor(w: World) -> Issued:  # a CA with the root's name and another key
    return make_root("OCSP Test Root", at=w.at - timedelta(days=1), key=key("ocsp-impostor"))


def _forged(w: World) -> bytes:  # names the root as responder, signed by the impostor
    return signed_response(w, signer=_impostor(w), by_name=True)


def _impostor_responder(w: World) -> bytes:  # a responder certificate from the impostor
    return signed_response(w, signer=responder_cert(_impostor(w)))


REFUSED: dict[str, tuple[Callable[[World], bytes], str]] = {
    "forged-signature": (_forged, "signature does not verify"),
    "responder-from-another-ca": (_impostor_responder, "was not issued by"),
    "responder-without-ocsp-signing": (
        lambda w: signed_response(w, signer=responder_cert(w.root, eku=False)),
        "lacks extKeyUsage OCSPSigning",
    ),
    "stale": (
        lambda w: signed_response(
            w, this_update=-timedelta(days=2), next_update=-timedelta(days=1)
        ),
        "is stale",
    ),
    "from-the-future": (
        lambda w: signed_response(w, this_update=timedelta(hours=1)),
        "is in the future",
    ),
    "no-next-update": (lambda w: signed_response(w, next_update=None), "no nextUpdate"),
    "about-another-certificate": (
        lambda w: signed_response(w, about=w.revoked),
        "is about serial",
    ),
    "status-unknown": (
        lambda w: signed_response(w, status=ocsp.OCSPCertStatus.UNKNOWN),
        "status unknown",
    ),
    "unauthorized": (
        lambda w: ocsp.OCSPResponseBuilder.build_unsuccessful(
            ocsp.OCSPResponseStatus.UNAUTHORIZED
        ).public_bytes(Encoding.DER),
        "answered unauthorized",
    ),
    "not-ocsp": (lambda w: b"<html>maintenance</html>", "not a DER OCSP response"),
    "too-large": (lambda w: b"\0" * (ocsp_mod.MAX_OCSP_BYTES + 1), "larger than"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_answers_store_nothing(tmp_path: Path, fake: FakeResponder, case: str) -> None:
    world = make_world(tmp_path, "http://ocsp.invalid/", enrol_revoked=False)
    make_body, message = REFUSED[case]
    fake.body = make_body(world)
    [outcome] = _fetch(world, responder=fake.url)  # the configured responder replaces AIA
    assert (outcome.status, outcome.url) == ("failed", fake.url)
    assert message in outcome.detail
    with world.db.session() as s:
        assert evidence.ocsp_rows(s) == []
        assert not [e for e in store.events(s) if e.action == "evidence.ocsp"]


def test_the_request_is_an_ocsp_post_with_a_sha1_cert_id(
    tmp_path: Path, fake: FakeResponder
) -> None:
    world = make_world(tmp_path, fake.url, enrol_revoked=False)
    fake.body = signed_response(world)
    assert [o.status for o in _fetch(world)] == ["stored"]
    [(content_type, body)] = fake.requests
    request = ocsp.load_der_ocsp_request(body)
    assert content_type == "application/ocsp-request"
    assert request.serial_number == world.good.cert.serial_number
    assert request.hash_algorithm.name == "sha1"
    fake.code = 500
    [outcome] = _fetch(world, force=True)
    assert (outcome.status, outcome.detail) == ("failed", "HTTP 500 Internal Server Error")


def test_an_unreachable_responder_fails_with_a_reason_and_exit_1(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    world = make_world(tmp_path, "http://ocsp.invalid/", enrol_revoked=False)
    (tmp_path / "gateway.toml").write_text(
        f'[database]\nurl = "sqlite:///a.db"\n\n[trust]\nocsp_responder = "http://127.0.0.1:{port}/"\n'
    )
    result = CliRunner().invoke(cli, ["--home", str(tmp_path), "keys", "ocsp", "fetch", "--json"])
    assert result.exit_code == 1
    [outcome] = json.loads(result.output)
    assert outcome["status"] == "failed"
    assert outcome["detail"].startswith("cannot reach http://127.0.0.1:")
    assert "Connection refused" in outcome["detail"]
    assert "refused" in outcome["detail"].lower()
    with world.db.session() as s:
        assert evidence.ocsp_rows(s) == []


def test_a_certificate_without_an_ocsp_url_is_not_asked_about(
    tmp_path: Path, fake: FakeResponder
) -> None:
    # pyhanko consults OCSP only for certificates whose AIA declares it: an answer about this
    # one would never count (and in soft-fail mode would make the check demand one that can't).
    world = make_world(tmp_path, None, enrol_revoked=False)
    fake.body = signed_response(world)
    assert _fetch(world, responder=fake.url) == []
    assert fake.requests == []


# --- the store and the settings -------------------------------------------------------------------


def test_the_store_keeps_each_answer_once_and_serves_the_newest(tmp_path: Path) -> None:
    world = make_world(tmp_path, "http://ocsp.invalid/")
    older = signed_response(world, this_update=-timedelta(hours=2))
    newer = signed_response(world)
    other = signed_response(world, about=world.revoked)
    issuer = world.root.cert.subject
    with world.db.session() as s:
        for der in (newer, older, other):
            assert evidence.add_ocsp(s, der, issuer=issuer, source="t", at=world.at, actor=ACTOR)
        assert not evidence.add_ocsp(s, newer, issuer=issuer, source="t", at=world.at, actor=ACTOR)
        assert sorted(evidence.latest_ocsps(s)) == sorted([newer, other])
        [row] = [r for r in evidence.ocsp_rows(s) if r.der == newer]
        assert (row.kind, row.number) == ("ocsp", f"{world.good.cert.serial_number:x}")
        with pytest.raises(InputError, match="only a successful OCSP response"):
            evidence.add_ocsp(s, b"junk", issuer=issuer, source="t", at=world.at, actor=ACTOR)


def test_the_responder_setting_must_be_an_http_url(tmp_path: Path) -> None:
    assert settings_mod.load(tmp_path).trust.ocsp_responder == ""
    (tmp_path / "gateway.toml").write_text('[trust]\nocsp_responder = "ldap://x"\n')
    with pytest.raises(ConfigError, match="ocsp_responder must be an http"):
        settings_mod.load(tmp_path)
