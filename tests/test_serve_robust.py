"""``gateway serve`` when things go wrong around it: a supervisor killed with kill -9, an
address already in use, a worker that cannot start. Real processes, read through /proc.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway import worker_process
from gateway.demo import DemoWorld
from tests import served

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


@pytest.fixture(scope="module")
def live_world() -> DemoWorld:
    """A PKI made now: the gateway judges certificates by the real clock."""
    return DemoWorld.create(datetime.now(UTC))


@pytest.fixture(scope="module")
def home(live_world: DemoWorld, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("robust") / "home"
    live_world.install(home, b"throw-away passphrase", relay_port=served.free_port())
    return home


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, session id) of a process; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rpartition(")")[2].split()
    return fields[0], int(fields[1]), int(fields[3])


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")  # a zombie has exited


def _processes() -> Iterator[tuple[int, tuple[str, int, int]]]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            yield int(entry.name), stat


def children(pid: int) -> list[int]:
    return [p for p, (state, ppid, _) in _processes() if ppid == pid and state != "Z"]


def in_session(sid: int) -> list[int]:
    """Live processes of the session ``served.start`` (start_new_session) made."""
    return [p for p, (state, _, session) in _processes() if session == sid and state != "Z"]


def wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


def _kill_session(sid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sid, signal.SIGKILL)


# --- kill -9 of the supervisor -------------------------------------------------------------


def test_workers_exit_when_the_supervisor_is_killed_with_sigkill(
    live_world: DemoWorld, tmp_path: Path
) -> None:
    """Only the supervisor is killed (not its process group): nobody tells the workers to
    stop, yet they go, rather than run on unsupervised next to the next `gateway serve`."""
    home = tmp_path / "home"
    live_world.install(home, b"throw-away passphrase", relay_port=served.free_port())
    gateway = served.start(home)
    supervisor = gateway.process.pid
    try:
        workers = [p for p in children(supervisor) if _alive(p)]
        assert len(workers) >= 2  # two workers (and multiprocessing's resource tracker)
        os.kill(supervisor, signal.SIGKILL)
        gateway.process.wait(30)
        wait_for(lambda: not any(_alive(p) for p in workers), 60, f"workers {workers} exit")
        wait_for(lambda: not in_session(supervisor), 60, "every process of the service exits")
    finally:
        _kill_session(supervisor)


def test_a_worker_whose_parent_is_already_gone_does_not_start(tmp_path: Path) -> None:
    """The race PR_SET_PDEATHSIG leaves open: the parent died before the worker asked."""
    stop = mp.get_context("spawn").Event()
    assert worker_process.WorkerStop(stop, os.getppid()).is_set() is False
    gone = worker_process.WorkerStop(stop, parent=os.getpid() + 1_000_000)  # no such process
    assert gone.orphaned() and gone.is_set()
    assert gone.wait(30) is True  # at once, not after 30 s


# --- an address already in use -------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "setting"),
    [("--smtp", "[listen] smtp"), ("--lmtp", "[listen] lmtp"), ("--metrics", "[serve] metrics")],
)
def test_an_address_in_use_is_one_line_and_leaves_nothing_running(
    home: Path, option: str, setting: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--home", str(home), "serve", "--log-format",
             "json", option, address],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
            env=dict(os.environ, PYTHONPATH=str(served.ROOT)),
        )  # fmt: skip
        try:
            _, stderr = process.communicate(timeout=120)
        finally:
            _kill_session(process.pid)
    assert process.returncode == 2, stderr
    assert "Traceback" not in stderr and "internal error" not in stderr
    assert stderr.strip().splitlines()[-1] == f"Error: {setting}: {address} is already in use"
    # No worker was started, or all were stopped (multiprocessing's resource tracker, if it
    # was started, follows its parent by itself).
    wait_for(lambda: not in_session(process.pid), 30, "every process of the service exits")


# --- a worker that cannot start ------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "says", "traceback"),
    [
        ("", "the hub has no key pair", False),  # a GatewayError: its one line
        # Anything else (here an OSError from deep inside): the traceback, inside the record.
        ('[database]\nurl = "sqlite:////proc/1/no-such-dir/x.db"\n', "could not start", True),
    ],
)
def test_a_worker_that_cannot_start_logs_json(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], config: str, says: str, traceback: bool
) -> None:
    (tmp_path / "gateway.toml").write_text(config, encoding="utf-8")
    spawn = mp.get_context("spawn")
    stop = spawn.Event()  # kept referenced until the worker has it
    worker = spawn.Process(
        target=worker_process.worker_main, args=(str(tmp_path), 0, stop, "json", "info")
    )
    worker.start()
    worker.join(120)
    assert worker.exitcode == worker_process.EXIT_START_FAILED
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert lines
    records = [json.loads(line) for line in lines]  # every line a JSON record, no bare traceback
    [failed] = [r for r in records if r["level"] == "error"]
    assert failed["logger"] == "gateway.serve"
    assert failed["message"].startswith("worker 0 could not start")
    assert says in failed["message"]
    assert ("Traceback" in failed.get("error", "")) == traceback


# --- a home that is not there ----------------------------------------------------------------


def test_serve_refuses_a_home_that_does_not_exist(tmp_path: Path) -> None:
    """A mistyped --home is an error, not a new empty home with a new archive master key."""
    typo = tmp_path / "gatway-home"
    done = served.gateway(typo, "serve", "--log-format", "json")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"Error: no gateway home at {typo} (run `gateway init --home {typo}` first)"
    ]
    assert not typo.exists()
