"""deploy/imap (IMAP mode) end to end: ``gateway serve`` configured with
deploy/imap/gateway.toml.snippet (only the host, port, user, password file and CA replaced)
takes a submission from a real Dovecot mailbox over IMAPS, files it, moves it to the done
mailbox unread, and sends the receipt through its relay."""

from __future__ import annotations

import contextlib
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from archive import tables as t
from archive.db import Database
from gateway.demo import DemoWorld
from tests import dovecot, served

pytestmark = [pytest.mark.interop, pytest.mark.slow]

SNIPPET = Path(__file__).resolve().parent.parent / "deploy" / "imap" / "gateway.toml.snippet"
SNV = "vanthu@snv.hanoi.gov.vn"


server = dovecot.module_fixture()


def configured(text: str, **values: str | int) -> str:
    """The snippet with each ``key = …`` line (commented out or not) set to ``values[key]``."""
    for key, value in values.items():
        line = f"{key} = {value if isinstance(value, int) else chr(34) + value + chr(34)}"
        text, n = re.subn(rf"(?m)^#?{key} = .*$", line, text)
        assert n == 1, f"deploy/imap/gateway.toml.snippet has no {key} line"
    return text


def test_gateway_serve_takes_mail_in_from_a_dovecot_mailbox_as_deploy_imap_says(
    server: dovecot.DovecotServer, tmp_path: Path
) -> None:
    user, password = server.add_user()
    home = tmp_path / "home"
    relay = served.Relay()
    controller, relay_port = relay.start()
    process: served.Served | None = None
    world = DemoWorld.create(datetime.now(UTC))
    snippet = configured(
        SNIPPET.read_text(encoding="utf-8"),
        host=dovecot.HOST,
        port=server.tls_port,
        username=user,
        password_file="keys/imap-password",
        ca_file=str(server.ca_file),
        poll_seconds=1,
    )
    # install() writes its own [listen]; the snippet's replaces it.
    world.install(home, b"throw-away passphrase", relay_port=relay_port)
    config = home / "gateway.toml"
    text = re.sub(r'(?m)^\[listen\]\nsmtp = ".*"\n', "", config.read_text(encoding="utf-8"))
    config.write_text(text + "\n" + snippet, encoding="utf-8")
    secret = home / "keys" / "imap-password"
    secret.write_text(password + "\n", encoding="utf-8")
    secret.chmod(0o600)
    db = Database.open(f"sqlite:///{home / 'archive.db'}", migrate=False)
    client = server.client(user, tls=True)
    try:
        process = served.start(home, name="imap")
        assert "smtp" not in process.info["listeners"]  # mail comes from the mailbox only
        raw = world.submission("H26.SNV")
        client.append("INBOX", raw)
        deadline = time.monotonic() + 60
        while True:
            with db.session(read_only=True) as s:
                done = s.scalar(
                    select(func.count()).select_from(t.Intake).where(t.Intake.state == "done")
                )
            if done and relay.to(SNV):
                break
            assert time.monotonic() < deadline, process.log.read_text()[-3000:]
            time.sleep(0.1)
        with db.session(read_only=True) as s:
            entry = s.scalars(select(t.LogEntry).where(t.LogEntry.kind == "message")).one()
            transport = s.scalars(select(t.Intake.transport)).one()
        assert entry.status == "accepted"
        assert transport["protocol"] == "imap" and transport["tls"], transport
        client.select_folder("INBOX", readonly=True)
        assert client.search("ALL") == []
        client.select_folder("Gateway.Processed", readonly=True)
        moved = client.fetch(client.search("ALL"), ["BODY.PEEK[]", "FLAGS"])
        assert [m[b"BODY[]"] for m in moved.values()] == [raw]
        assert all(b"\\Seen" not in m[b"FLAGS"] for m in moved.values())  # moved unread
    finally:
        with contextlib.suppress(Exception):
            client.logout()
        if process is not None:
            assert process.stop() == 0, process.log.read_text()[-3000:]
        db.dispose()
        controller.stop()
