"""What a worker spends on one 10 KB submission: filing it, then building its receipt and delivery.

The worker and builder of ``gateway serve`` run in this process on a fresh home (SQLite), with
no server, clients or relay around them: N submissions are taken into the inbox first, then
filed (decrypt, verify, validate the path, parse, archive), then their receipts and deliveries
are built (sign, encrypt, archive). Each phase is measured over the N messages, after a warm-up
of 10 that is filed and built before.

Baseline, measured in the same run: the one RSA-3072 private-key operation each phase cannot do
without (filing decrypts the content key with the hub's key; a receipt is signed with it). What
a phase costs above its RSA operation is the gateway's own overhead, the part code changes move.

Two measures:

- CPU milliseconds per message (``time.process_time``). Quick, but it swings by ±15–25% from one
  run to the next on a shared host, so a change of a few percent cannot be seen in it.
- ``--instructions``: instructions per message counted by valgrind's callgrind (needs
  ``valgrind``; about a minute at the default 50 messages). Repeat runs agree to 0.1%, so a
  change of 1% is visible in one run of each side. Valgrind's CPU lacks some instructions
  (ADX), so its RSA count is not the native one: compare figures above the RSA baseline, and
  only between runs on the same valgrind. It also counts each step of a ``rep stos``/``rep
  movs`` (memset, memcpy) as an instruction, where the CPU does 32 bytes or more a cycle:
  bulk zeroing and copying weigh far more here than in CPU time.

Run:  .venv/bin/python bench/worker_cost.py [--messages N] [--instructions]
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from e2e_bench import KB10, MAIL_FROM, PASSPHRASE, records_for, submission

from archive.records import Transport
from gateway import intake
from gateway import settings as settings_mod
from gateway.demo import HUB_ADDRESS, DemoWorld
from gateway.loading import open_database
from gateway.worker_process import _start_worker

WARM = 10


@dataclass(frozen=True)
class Costs:
    """One measure (ms or instructions) per message, for each phase and its baseline."""

    filing: float
    building: float
    decrypt: float  # one RSA-3072 private-key decryption (PKCS#1 v1.5), the filing's floor
    sign: float  # one RSA-3072 signature (PKCS#1 v1.5, SHA-256), the receipt's floor


class Meter:
    """Measures the regions of a run: CPU time, or callgrind's instruction counter (zeroed
    before a region and dumped after it, through ``callgrind_control``)."""

    def __init__(self, instructions: bool) -> None:
        self.instructions = instructions
        self.began = 0.0
        self.cpu: list[float] = []

    def start(self) -> None:
        gc.collect()
        if self.instructions:
            self._control("-z")
        self.began = time.process_time()

    def stop(self) -> None:
        self.cpu.append(time.process_time() - self.began)
        if self.instructions:
            self._control("-d")

    @staticmethod
    def _control(option: str) -> None:
        subprocess.run(
            ["callgrind_control", option, str(os.getpid())], check=True, capture_output=True
        )


def prepare(home: Path, n: int) -> None:
    """A gateway home with the demo world, and ``WARM + n`` distinct 10 KB submissions."""
    world = DemoWorld.create(datetime.now(UTC))
    world.install(home, PASSPHRASE, relay_port=9, workers=1)
    records = records_for(world, KB10)
    raws = [submission(world, records, 1000 + i) for i in range(WARM + n)]
    (home / "submissions.pickle").write_bytes(pickle.dumps(raws))


def measure(home: Path, n: int, meter: Meter) -> None:
    """The measured run (four regions: filing, building, the decryptions, the signatures)."""
    raws: list[bytes] = pickle.loads((home / "submissions.pickle").read_bytes())
    settings = settings_mod.load(home)
    db = open_database(settings)
    worker, builder, _refresh = _start_worker(settings, db)

    def take(batch: list[bytes]) -> None:
        for raw in batch:
            at = datetime.now(UTC)
            transport = Transport(
                at, "smtp", "127.0.0.1", mail_from=MAIL_FROM, rcpt_to=(HUB_ADDRESS,)
            )
            intake.accept(db, raw, transport)

    def file_all() -> list[str]:
        verdicts: list[str] = []
        while outcomes := worker.run_once():
            verdicts += [o.disposition for o in outcomes]
        return verdicts

    def build_all() -> int:
        rows = 0
        while built := builder.run_once():
            rows += built
        return rows

    take(raws[:WARM])
    file_all()
    build_all()
    take(raws[WARM:])
    gc.freeze()  # the world, the keys and the submissions: not the measured code's garbage

    meter.start()
    verdicts = file_all()
    meter.stop()
    meter.start()
    rows = build_all()
    meter.stop()
    if verdicts != ["accepted"] * n or rows != 2 * n:  # a receipt and a delivery each
        got = ", ".join(f"{k} {v}" for k, v in Counter(verdicts).items())
        sys.exit(f"expected {n} accepted and {2 * n} rows built, got {got} and {rows} rows")

    key = builder.hub.signer[1]
    assert isinstance(key, rsa.RSAPrivateKey)
    sealed = key.public_key().encrypt(os.urandom(32), padding.PKCS1v15())
    meter.start()
    for _ in range(n):
        key.decrypt(sealed, padding.PKCS1v15())
    meter.stop()
    meter.start()
    for i in range(n):
        key.sign(i.to_bytes(8, "big"), padding.PKCS1v15(), hashes.SHA256())
    meter.stop()
    db.dispose()


def per_message(values: list[float], n: int, scale: float) -> Costs:
    filing, building, decrypt, sign = (v / n * scale for v in values)
    return Costs(filing, building, decrypt, sign)


def natively(home: Path, n: int) -> Costs:
    meter = Meter(instructions=False)
    measure(home, n, meter)
    return per_message(meter.cpu, n, 1e3)


def under_callgrind(home: Path, n: int, out: Path) -> Costs:
    """Runs this script's ``--measure`` under callgrind; each dump's ``summary`` is a region's
    instruction count (files ``cg.out.1`` … ``cg.out.4``; ``cg.out`` holds the rest)."""
    command = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out / 'cg.out'}",
        sys.executable,
        __file__,
        "--measure",
        str(home),
        "--messages",
        str(n),
        "--instructions",
    ]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"valgrind run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    counts = []
    for part in range(1, 5):
        text = (out / f"cg.out.{part}").read_text()
        [summary] = [line for line in text.splitlines() if line.startswith("summary:")]
        counts.append(float(summary.split()[1]))
    return per_message(counts, n, 1e-6)


def report(costs: Costs, unit: str, n: int) -> None:
    print(f"  {'phase':<34} {'per message':>14}   baseline (same run)          above it")
    for name, value, floor, what in (
        ("filing (decrypt … archive)", costs.filing, costs.decrypt, "RSA-3072 decrypt"),
        ("building (receipt, delivery)", costs.building, costs.sign, "RSA-3072 sign"),
    ):
        print(
            f"  {name:<34} {value:>9.2f} {unit:<4}   {what:<16} {floor:>7.2f} {unit:<4}   "
            f"{value - floor:>6.2f} {unit} ({(value - floor) / value:.0%})"
        )
    print(f"  {n} messages of 10 KB, after {WARM} to warm up; SQLite; one process.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, help="messages measured (200; --instructions 50)")
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions under callgrind"
    )
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the valgrind child
    args = parser.parse_args()
    n = args.messages or (50 if args.instructions else 200)
    if args.measure:
        measure(args.measure, n, Meter(instructions=args.instructions))
        return
    if args.instructions and not shutil.which("valgrind"):
        sys.exit("--instructions needs valgrind (Debian: apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="worker-cost-") as tmp:
        home = Path(tmp) / "home"
        began = time.perf_counter()
        prepare(home, n)
        print(f"prepared {WARM + n} submissions in {time.perf_counter() - began:.1f} s")
        if args.instructions:
            report(under_callgrind(home, n, Path(tmp)), "M", n)
            print(
                "  M = millions of instructions (callgrind); runs of the same code agree to 0.1%."
            )
        else:
            report(natively(home, n), "ms", n)
            print(
                "  ms = CPU milliseconds (process_time); runs swing ±15–25%: --instructions is exact."
            )


if __name__ == "__main__":
    main()
