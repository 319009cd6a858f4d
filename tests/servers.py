"""What the throw-away test servers share (tests/pg.py, tests/dovecot.py, tests/postfix.py)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

_T = TypeVar("_T")

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A port nothing listens on right now (bound and released)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``sig`` when the test process goes away."""

    def arm() -> None:
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, sig)

    return arm


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file, or "" if it cannot be read."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def greets(port: int, prefix: bytes, bye: bytes = b"") -> bool:
    """Whether the server on ``port`` greets with ``prefix`` (then says ``bye``, if given)."""
    with socket.create_connection((HOST, port), timeout=5) as s:
        if s.recv(100).startswith(prefix):
            if bye:
                s.sendall(bye)
            return True
    return False


def wait_ready(
    name: str,
    process: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    log: Callable[[], str],
    *,
    timeout: float = 30.0,
    errors: tuple[type[Exception], ...] = (OSError,),
) -> None:
    """Poll ``ready()`` (``errors`` it raises mean "not yet") until it is true; RuntimeError
    with what the server logged (``log()``) when the process exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log()}")
        try:
            if ready():
                return
            problem = "it did not answer as expected"
        except errors as exc:
            problem = str(exc)
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{name} was not ready within {timeout:.0f} s: {problem}\n{log()}"
            ) from None
        time.sleep(0.05)


def required(variable: str) -> bool:
    """Under CI (``$CI``), or with ``variable`` set, a missing server fails the tests instead
    of skipping them: CI must never skip them silently."""
    return any(
        os.environ.get(var, "").strip().lower() not in ("", "0", "false", "no")
        for var in ("CI", variable)
    )


def start_or_skip(
    start: Callable[[], _T], unavailable: type[Exception], what: str, variable: str
) -> _T:
    """``start()``; when it raises ``unavailable``, skip the test, or fail it where
    :func:`required`."""
    try:
        return start()
    except unavailable as exc:
        if required(variable):
            pytest.fail(f"{what} is required here (CI): {exc}", pytrace=False)
        pytest.skip(f"{what} not available: {exc}")
