"""Faults: kill -9 in the middle of a burst, a full disk. Nothing that got 250 is lost or doubled.

The burst runs against a real ``gateway serve`` (supervisor and worker processes), killed with
SIGKILL — the whole process group — at moments chosen at random, and started again on the same
home, while clients keep sending (as a mail server would: a message without 250 is sent again).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from archive import tables as t
from archive.db import Database
from formats.limits import Limits
from gateway import smtp as listener
from gateway.demo import HUB_ADDRESS, DemoWorld
from tests import served

SNV = "vanthu@snv.hanoi.gov.vn"
BURST = 240
CLIENTS = 4
KILLS = 3


@pytest.fixture(scope="module")
def live_world() -> DemoWorld:
    return DemoWorld.create(datetime.now(UTC))


def test_kill_9_during_a_burst_loses_nothing_and_files_nothing_twice(
    live_world: DemoWorld, tmp_path: Path
) -> None:
    relay = served.Relay()
    controller, relay_port = relay.start()
    home = tmp_path / "home"
    live_world.install(home, b"throw-away passphrase", relay_port=relay_port)
    messages = [live_world.submission("H26.SNV") for _ in range(BURST)]
    process = served.start(home)
    port = [process.smtp_port]
    clients = [
        served.Resender(messages[i::CLIENTS], port, mail_from=SNV, to=HUB_ADDRESS)
        for i in range(CLIENTS)
    ]
    for c in clients:
        c.start()
    rng = random.Random(os.environ.get("FAULT_SEED", "serve-faults"))
    db = Database.open(f"sqlite:///{home / 'archive.db'}", migrate=False)
    try:
        for _ in range(KILLS):
            target = sum(len(c.acknowledged) for c in clients) + rng.randint(
                10, BURST // (KILLS + 1)
            )
            while sum(len(c.acknowledged) for c in clients) < min(target, BURST - 5):
                time.sleep(0.01)
            time.sleep(rng.random() * 0.2)
            process.kill()
            process = served.start(home, "--smtp", f"127.0.0.1:{port[0]}")
        for c in clients:
            c.join(timeout=300)
            assert not c.is_alive()
        served.wait_until_settled(db, timeout=300)
        digests = served.archived_digests(db)
        acknowledged = [raw for c in clients for raw in c.acknowledged]
        assert len(acknowledged) == BURST
        # every message that got 250 is in the archive exactly once
        expected = sorted(hashlib.sha256(raw).hexdigest() for raw in acknowledged)
        assert sorted(digests) == expected
        assert sum(c.attempts for c in clients) > BURST  # the kills did break sessions
        # every sender got its receipt (one sent again for a message it had to send again)
        receipts = relay.to(SNV)
        assert len(receipts) >= BURST
        verify = served.gateway(home, "archive", "verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        with contextlib.suppress(Exception):
            process.stop()
        db.dispose()
        controller.stop()


# --- a full disk ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a real file system that runs out of space."""
    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(path: Path) -> None:
    with path.open("wb") as f:
        chunk = b"\0" * 65536
        while True:
            try:
                f.write(chunk)
                f.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return


def test_a_full_disk_answers_451_never_250(small_disk: Path) -> None:
    db = Database.open(f"sqlite:///{small_disk / 'archive.db'}")
    server = listener.start(
        db, host="127.0.0.1", port=0, hub_addresses=[HUB_ADDRESS], limits=Limits()
    )
    big = (
        f"From: {SNV}\r\nTo: {HUB_ADDRESS}\r\nMessage-ID: <full@snv>\r\nSubject: x\r\n\r\n".encode()
        + (b"A" * 76 + b"\r\n") * 20000  # 1.5 MB: more than the WAL holds already
    )
    try:
        filler = small_disk / "filler"
        with contextlib.suppress(OSError):
            _fill(filler)
        code, text = served.submit(server.port, big, mail_from=SNV, to=HUB_ADDRESS)
        assert (code, text.split()[0]) == (451, b"4.3.0"), (code, text)
        with db.session(read_only=True) as s:
            assert s.scalars(select(t.Intake)).all() == []
        filler.unlink()
        code, _ = served.submit(server.port, big, mail_from=SNV, to=HUB_ADDRESS)
        assert code == 250  # space again: the same message is taken
    finally:
        server.stop()
        db.dispose()


def test_a_relay_the_sender_cannot_use_stops_start_up(
    live_world: DemoWorld, tmp_path: Path
) -> None:
    """A [relay] that names a user but no password (the service's environment lacks it) is a
    start-up error, like missing keys: not a sender thread that dies after serve said ready,
    while mail is still taken in and nothing can be sent (nor the admin told)."""
    home = tmp_path / "home"
    live_world.install(home, b"throw-away passphrase", relay_port=2525)
    config = home / "gateway.toml"
    config.write_text(
        config.read_text().replace(
            'security = "none"\n',
            'security = "none"\nusername = "hub"\npassword_env = "GATEWAY_TEST_UNSET"\n',
        )
    )
    os.environ.pop("GATEWAY_TEST_UNSET", None)
    with pytest.raises(RuntimeError, match="did not start") as failed:
        served.start(home).kill()  # killed, should it start: the test then fails
    assert "[relay] username = 'hub' but there is no password" in str(failed.value)
    assert "Traceback" not in str(failed.value)


def test_the_session_caps_of_the_settings_apply(live_world: DemoWorld, tmp_path: Path) -> None:
    """``[listen] max_sessions_per_ip = 1``: a second connection from 127.0.0.1, while the first
    is open, is told 421 at once (the caps reach the listener from the settings)."""
    home = tmp_path / "home"
    live_world.install(home, b"throw-away passphrase", relay_port=2525)
    config = home / "gateway.toml"
    config.write_text(
        config.read_text().replace("[listen]\n", "[listen]\nmax_sessions_per_ip = 1\n", 1)
    )
    gateway = served.start(home)
    try:
        with socket.create_connection(("127.0.0.1", gateway.smtp_port), timeout=30) as first:
            assert first.recv(512).startswith(b"220")
            with socket.create_connection(("127.0.0.1", gateway.smtp_port), timeout=30) as second:
                assert second.recv(512).startswith(b"421 4.7.0")
    finally:
        gateway.stop()
