"""Fixtures of the SMTP listener tests. Loaded for every test module by ``pytest_plugins`` in
conftest.py; a module that defines a fixture of the same name uses its own."""

from __future__ import annotations

import ssl
from datetime import timedelta

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.demo import HUB_ADDRESS
from keys.issuing import issue_agency, make_root
from tests.conftest import WORLD_AT


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts: a throw-away CA and a certificate for 127.0.0.1."""
    home = tmp_path_factory.mktemp("tls")
    root = make_root("Test TLS root", at=WORLD_AT - timedelta(days=1), key_kind="ec-p256")
    leaf = issue_agency(
        root, email=HUB_ADDRESS, organ_id=None, common_name="127.0.0.1",
        at=WORLD_AT - timedelta(days=1), key_kind="ec-p256", eku=(ExtendedKeyUsageOID.SERVER_AUTH,),
    )  # fmt: skip
    (home / "cert.pem").write_bytes(leaf.cert_pem())
    (home / "key.pem").write_bytes(leaf.key_pem())
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(home / "cert.pem", home / "key.pem")
    client = ssl.create_default_context(cadata=root.cert_pem().decode())
    client.check_hostname = False
    return server, client
