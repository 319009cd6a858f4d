"""Claimants' names, and which claims a supervisor judges its own to give back."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from archive import tables as t
from archive.db import Database
from archive.service import Archive
from gateway import claims
from gateway import worker as worker_module
from gateway.claims import claimant, release_stale_claims, this_host
from gateway.demo import DemoWorld
from tests.conftest import WORLD_AT
from tests.outbox_world import archive_on
from tests.test_worker import _receive

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def archive(tmp_path: Path, world: DemoWorld) -> Archive:
    return archive_on(Database.open(f"sqlite:///{tmp_path}/a.db"), world)


def _claimed_by(archive: Archive, world: DemoWorld, name: str) -> int:
    number = _receive(archive, world.submission("H26.SNV"))
    with archive.db.session() as s:
        assert worker_module.claim(s, name, WORLD_AT, 10)[0] == [number]
    return number


def _state(archive: Archive, number: int) -> tuple[str, str | None]:
    with archive.db.session(read_only=True) as s:
        row = s.execute(select(t.Intake.state, t.Intake.worker).where(t.Intake.id == number)).one()
    return row.state, row.worker


def test_a_claimant_is_named_by_its_host_its_pid_namespace_its_pid_and_its_start() -> None:
    host, _, process = claimant().rpartition(":")
    assert host == this_host()
    assert host.startswith(socket.gethostname()[: claims.HOST_NAME_KEPT])
    namespace = os.readlink("/proc/self/ns/pid").removeprefix("pid:[").removesuffix("]")
    assert host.endswith(f"/{namespace}")
    pid, _, started = process.partition("@")
    assert int(pid) == os.getpid() and started.isdigit()


def test_a_pid_used_again_by_a_later_process_is_not_the_claimant(
    archive: Archive, world: DemoWorld
) -> None:
    """A PID is reused (a container started again numbers its processes as before, a host
    after a reboot): the process that has it now is not the one that claimed. Judged alive by
    its PID alone, the claim waited out its lease."""
    here = _claimed_by(archive, world, claimant())
    before = _claimed_by(archive, world, f"{this_host()}:{os.getpid()}@1")  # started at boot
    assert release_stale_claims(archive.db, this_host()) == 1
    assert _state(archive, before) == ("new", None)
    assert _state(archive, here) == ("working", claimant())


def test_a_claim_from_another_pid_namespace_of_the_same_host_name_is_not_judged(
    archive: Archive, world: DemoWorld
) -> None:
    """Two containers given one host name each number their processes from 1: one's
    supervisor, not finding the other's worker in its own process table, gave its claims back
    while it worked (counted: three times, and the message was set aside unchecked)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    command = [
        *("unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc"),
        *(sys.executable, "-c", "from gateway.claims import claimant; print(claimant())"),
    ]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        pytest.skip(f"cannot start a process in a PID namespace of its own: {run.stderr}")
    other, _, process = run.stdout.strip().rpartition(":")
    assert other != this_host() and other.split("/")[0] == this_host().split("/")[0]
    assert process.startswith("1@")  # the first process of its namespace
    # A claimant of that namespace with a PID this one does not have: not ours to judge.
    number = _claimed_by(archive, world, f"{other}:999999999")
    assert release_stale_claims(archive.db, this_host()) == 0
    assert _state(archive, number) == ("working", f"{other}:999999999")
    # The same PID in this namespace's name: gone, given back.
    gone = _claimed_by(archive, world, f"{this_host()}:999999999")
    assert release_stale_claims(archive.db, this_host()) == 1
    assert _state(archive, gone) == ("new", None)


def test_claims_of_the_run_before_an_upgrade_are_given_back_at_its_start(
    archive: Archive, world: DemoWorld
) -> None:
    """Names given before PID namespaces were named (``host:pid``) are this host's still: the
    claims the previous version's run left were otherwise waited out, lease by lease."""
    elsewhere = _claimed_by(archive, world, "another-host:999999999")
    assert release_stale_claims(archive.db, this_host(), at_start=True) == 0
    number = _claimed_by(archive, world, f"{socket.gethostname()}:999999999")
    assert release_stale_claims(archive.db, this_host(), at_start=True) == 1
    assert _state(archive, number) == ("new", None)
    assert _state(archive, elsewhere)[0] == "working"


def test_a_process_keeps_one_name_though_proc_fails_it_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sender's rows are given back under the name it claimed them with, read again when
    its thread is started again: read while /proc failed (out of descriptors), that name
    lacked its start, and the rows were not found."""
    name = claimant()
    monkeypatch.setattr(claims, "_started", lambda pid: None)
    assert claimant() == name
