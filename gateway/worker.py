"""Pipeline workers: take messages from the durable inbox, decide, file, and say what is owed.

Exactly-once in the archive (DESIGN §5 rule 8). A worker *claims* a batch of inbox rows (a short
write transaction: ``working``, its name, a lease), runs the pipeline on them outside any
transaction (the slow, pure part), then in ONE transaction files the entries, records their
replay keys, adds what the hub now owes (a receipt to the sender, a delivery to each recipient
agency: :mod:`gateway.outbound`) and marks the rows done. A crash anywhere leaves a row either
claimed (its lease runs out and it is claimed again) or done with its archive entry — never
filed twice, never lost. A row whose lease ran out while its worker was still busy is filed by
whoever holds the claim; the late worker finds the claim gone and files nothing.

A message whose processing kills its worker (the OOM killer, a crash in a native library) must
not do so for ever, nor take the messages claimed with it down each time. Each claim is counted
on the row (``claims``) and a decision resets the count: a row claimed before without a decision
is claimed alone, and one claimed :data:`MAX_CLAIMS` times without a decision is quarantined
unchecked (:class:`~formats.errors.InternalError`), its bytes kept for an administrator. A
worker whose cycle fails on the database's or the disk's trouble, and lives on, gives its
claims back uncounted (:class:`gateway.claims.Unsettled`): that is no message's doing.

A duplicate (same signer and payload, or same sender agency and payload MessageId: DESIGN §5
rule 3, whichever of the agency's mailboxes sends) is not filed again: its row points at the
original entry, and the original receipt is sent again. The keys are of what the signature
covers, never of the outer headers, which anyone on the mail path may rewrite. A rejected
original is matched only as the same signed message (:func:`recorded_keys`): the same payload
sent again, corrected or once the hub's side is fixed, is judged anew. A payload reusing its
sender's MessageId for a different document is rejected
(:class:`~formats.errors.MessageIdReused`), not taken for a duplicate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import Select, or_, select, update
from sqlalchemy.orm import Session

from archive import tables as t
from archive.db import insert_rows, update_rows
from archive.log import Item
from archive.records import Transport
from archive.service import Archive
from formats.errors import InternalError, MessageIdReused, is_transient
from formats.vntime import local_day
from gateway import intake, obligation_store, outbound
from gateway.claims import Unsettled, claimant
from gateway.filing import message_item
from gateway.obligations import Obligation, fulfilled_by
from gateway.pipeline import Context, process
from gateway.verdict import Verdict, failed_inside
from keys import capabilities

log = logging.getLogger("gateway.worker")

T = TypeVar("T")

#: A message still undecided this long after its 250 (a transient failure: no fresh CRL, the
#: database) is worth an admin alert.
WAIT_ALERT = timedelta(hours=1)

#: How long a claim holds before another worker may take the rows over.
LEASE = timedelta(minutes=2)
#: A claimed batch stops growing at this many bytes of raw messages (memory stays bounded).
BATCH_BYTES = 32 * 1024 * 1024
#: At most this many messages per claim. A claim and a filing are one write transaction (and
#: one fsync) each, waiting their turn behind intake's commits: in a burst of 10 KB messages,
#: 64 rather than 32 archived 3–19% more in four side-by-side pairs (bench/e2e_bench.py).
BATCH_ROWS = 64
#: Claims without a decision (its worker died, or ran past its lease, each time) after which a
#: message is quarantined without being checked again.
MAX_CLAIMS = 3
#: A claim of this many messages or bytes is a long cycle's work: a backlog.
BACKLOG_ROWS = 8
BACKLOG_BYTES = 4 * 1024 * 1024
#: A claim takes at least this many bytes of what is waiting (when there is that much), or its
#: share among the workers, whichever is more (:func:`claim`).
SHARE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Outcome:
    intake_id: int
    disposition: str  # accepted | rejected | quarantined | retry | duplicate | done-elsewhere
    archive_seq: int | None


def replay_keys(verdict: Verdict) -> list[str]:
    """The keys that identify a submission a second time, all of what its signature covers
    (DESIGN §5 rule 3): its sender agency and payload MessageId (``sender:``: a MessageId is
    the agency's, whichever of its mailboxes sends, each with a certificate of its own), its
    signer and payload (``signed:``), and the signed message itself (``copy:``, the decrypted
    entity: payload, attachments and signature). Which of them a filed submission records is
    :func:`recorded_keys`."""
    keys = []
    if verdict.signer is not None and verdict.opened is not None:
        if verdict.payload is not None and verdict.agency is not None:
            message_id = str(verdict.payload.header.message_id)
            keys.append(_key("sender", "agency", verdict.agency.organ_id, message_id))
        signer = hashlib.sha256(verdict.signer.cert.public_bytes(Encoding.DER)).hexdigest()
        keys.append(_key("signed", signer, verdict.opened.payload_sha256))
        keys.append(_key("copy", hashlib.sha256(verdict.opened.decrypted).hexdigest()))
    return keys


def keys_of_before(verdict: Verdict) -> list[str]:
    """The ``sender:`` keys entries filed before it named the agency were recorded under: a
    mailbox and the MessageId, for each of the agency's mailboxes (any of them may have sent
    the original). Looked for, never recorded: a copy of one of those is still known."""
    if verdict.signer is None or verdict.opened is None or verdict.payload is None:
        return []
    mailboxes = {e.lower() for e in verdict.agency.emails} if verdict.agency else set()
    if verdict.from_addr:
        mailboxes.add(verdict.from_addr.lower())
    message_id = str(verdict.payload.header.message_id)
    return [_key("sender", mailbox, message_id) for mailbox in sorted(mailboxes)]


def recorded_keys(verdict: Verdict, keys: Sequence[str]) -> list[str]:
    """Those of a filed submission's ``keys`` that later copies are found by. An accepted one
    by its payload (``signed:``) and its MessageId (``sender:``). A rejected one only as the
    same signed message (``copy:``): the same payload sent again in a new signed message (with
    the attachment it lacked, or once the hub's side is fixed) is judged anew, not answered
    with the old refusal; nor can a replay of it, under another outer Message-ID, make a later
    message look like a copy."""
    if verdict.disposition == "accepted":
        return [k for k in keys if not k.startswith("copy:")]
    return [k for k in keys if k.startswith("copy:")]


def reused(verdict: Verdict) -> Verdict:
    """The verdict on a payload whose MessageId its sender used before for another document."""
    assert verdict.payload is not None
    message_id = verdict.payload.header.message_id
    error = MessageIdReused(
        f"the MessageId {message_id} was used before by this sender for a different document; "
        "a new document needs a new MessageId",
        message_vi=f"MessageId {message_id}",
    )
    return dataclasses.replace(verdict, disposition="rejected", errors=(error,))


def _key(kind: str, *parts: str) -> str:
    return f"{kind}:" + hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def worker_name() -> str:
    """The name this process claims under (:func:`gateway.claims.claimant`)."""
    return claimant()


def recipients_of(verdict: Verdict, obligations: Iterable[Obligation] = ()) -> list[str]:
    """Agencies an accepted payload goes to: its ``To`` list, then, for a payload with a
    period, the recipients of each of ``obligations`` it is owed under (its sender's, same
    category and cadence, in force on the period's last day: what compliance counts it for);
    each once, without the sender itself."""
    if verdict.payload is None:
        return []
    header, exchange = verdict.payload.header, verdict.payload.exchange
    sender = header.sender.organ_id
    wanted = [o.organ_id for o in header.recipients]
    if exchange.period_end is not None:
        day = exchange.period_end
        wanted += [
            organ_id
            for ob in obligations
            if fulfilled_by(ob, sender, exchange.category, exchange.cadence, day)
            for organ_id in ob.recipients
        ]
    out: list[str] = []
    for organ_id in wanted:
        if organ_id != sender and organ_id not in out:
            out.append(organ_id)
    return out


@dataclass
class _Job:
    number: int
    raw: bytes
    transport: Transport
    verdict: Verdict
    keys: list[str] = field(default_factory=list)  # its replay keys: copies of what it is
    recorded: list[str] = field(default_factory=list)  # those later copies will find it by
    #: Its verdict before filing found its MessageId taken (:func:`reused`): what it is judged
    #: on again should that filing fail (the other document may then not be filed at all).
    as_judged: Verdict | None = None


@dataclass
class Worker:
    archive: Archive
    context: Callable[[], Context]
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    name: str = field(default_factory=worker_name)
    #: Which agencies an accepted payload is delivered to, given its sender's obligations.
    recipients: Callable[[Verdict, Sequence[Obligation]], Sequence[str]] = recipients_of
    #: How many workers share the intake (this instance's): each claims its share of a
    #: backlog of big messages (:func:`claim`).
    peers: int = 1
    #: The last claim left rows waiting (it stopped at its count or byte limit), or took
    #: :data:`BACKLOG_ROWS` or :data:`BACKLOG_BYTES`: a backlog.
    backlog: bool = False
    #: Where to say that messages taken in have waited :data:`WAIT_ALERT` or more for a
    #: transient failure to clear (once a day, naming the first); ``""``: only logged.
    admin: str = ""
    #: Claims a failed cycle left, to give back uncounted.
    unsettled: Unsettled = field(default_factory=lambda: Unsettled(t.Intake, "working", "new"))

    def run_once(self, limit: int = BATCH_ROWS) -> list[Outcome]:
        """Claim what is waiting now, process it, file it; returns what happened to each. A
        failure after the claim gives the claim back (uncounted if it is the database's or
        the disk's) and is raised (:class:`gateway.claims.Unsettled`)."""
        db = self.archive.db
        self.unsettled.give_back(db, self.name)  # what a failed cycle could not give back
        # Idle polls never take the write lock: they look first. After a backlog, the claim
        # is tried at once (at worst, once, it finds nothing).
        if not self.backlog:
            with db.session(read_only=True) as s:
                if not s.execute(_waiting(self.clock()).limit(1)).first():
                    return []
        self.backlog = False  # until a claim finds one
        # Before the claim: keys, trust or a directory that cannot be loaded is no message's
        # doing, and must not count against the messages claimed.
        ctx = self.context()
        with db.session() as s:
            numbers, self.backlog = claim(s, self.name, self.clock(), limit, self.peers)
        if not numbers:
            return []
        try:
            with db.session(read_only=True) as s:
                columns = (t.Intake.raw, t.Intake.received_at, t.Intake.transport, t.Intake.claims)
                rows = s.execute(
                    select(t.Intake.id, *columns)
                    .where(t.Intake.id.in_(numbers))
                    .order_by(t.Intake.id)
                ).all()
            jobs = [self._job(r.id, r.raw, r.transport, r.received_at, r.claims, ctx) for r in rows]
            return self._settle(jobs)
        except Exception as exc:
            self.unsettled.keep(db, self.name, numbers, exc)
            raise

    def _job(
        self,
        number: int,
        raw: bytes,
        transport: dict[str, Any],
        at: datetime,
        claims: int,
        ctx: Context,
    ) -> _Job:
        """The verdict on one message; a defect of ours quarantines it (and only it), and so
        does a message claimed :data:`MAX_CLAIMS` times without a decision (not checked again:
        checking it is what stopped its workers)."""
        if claims > MAX_CLAIMS:
            verdict = set_aside(raw, claims - 1)
        else:
            try:
                verdict = process(raw, ctx, at=at)
            except Exception as exc:
                verdict = failed_inside(raw, "checking it", exc)
        for err in verdict.errors:
            if isinstance(err, InternalError):
                log.error("intake %d: %s", number, err.message, exc_info=err.__cause__)
        return _Job(number, raw, Transport.from_dict(transport), verdict)

    def _settle(self, jobs: list[_Job], *, bare: bool = False) -> list[Outcome]:
        """File ``jobs`` in one transaction. If that fails for a reason other than the
        database or the disk (:func:`gateway.outbound.environmental`: raised, the claim given
        back) — the database refusing a row is not its trouble but a message's — one of them
        is poison: the jobs are filed one by one, and one that still
        cannot be is quarantined with only its bytes — it never holds up the messages behind
        it."""
        items: dict[int, Item] = {}
        for job in jobs:  # (a filing that failed found nothing: judged as before it)
            if job.as_judged is not None:
                job.verdict, job.as_judged = job.as_judged, None
        for job in jobs:  # made, and their blobs compressed, before the write transaction
            if job.verdict.disposition == "retry":
                continue
            try:
                items[job.number] = message_item(job.verdict, job.raw, job.transport)
            except Exception as exc:
                self._quarantine(job, "filing it", exc)
                items[job.number] = message_item(job.verdict, job.raw, job.transport)
        self.archive.prepare(items.values())
        try:
            with self.archive.db.session() as s:
                return self._file(s, jobs, items)
        except Exception as exc:
            if outbound.environmental(exc):
                raise
            if len(jobs) > 1:
                log.warning("a batch of %d could not be filed (%r): one by one", len(jobs), exc)
                return [outcome for job in jobs for outcome in self._settle([job])]
            if bare:
                raise  # even its bytes alone cannot be filed: not this message's doing
            self._quarantine(jobs[0], "filing it", exc)
            return self._settle(jobs, bare=True)

    def _quarantine(self, job: _Job, what: str, exc: Exception) -> None:
        job.verdict, job.as_judged = failed_inside(job.raw, what, exc), None
        log.error("intake %d: %s", job.number, job.verdict.errors[0].message, exc_info=exc)

    def _alert_waiting(self, s: Session, job: _Job, now: datetime) -> None:
        """A message taken in (it got its 250) still cannot be decided: say so, once a day."""
        since = job.transport.received_at
        log.warning("intake %d has waited since %s: %s", job.number, since, _reason(job.verdict))
        if self.admin:
            day = local_day(now)
            outbound.add_alert(
                s,
                f"intake-waiting:{day}",
                f"Messages taken in are waiting to be processed ({day}): the first, intake "
                f"{job.number}, since {since:%Y-%m-%d %H:%M} UTC: {_reason(job.verdict)}. They "
                "are tried again, at most an hour apart, until this clears; the metric "
                'gateway_intake_queue{state="retry"} counts them.',
                now,
            )

    def _file(self, s: Session, jobs: list[_Job], made: dict[int, Item]) -> list[Outcome]:
        """File the batch under the write lock: entries, replay keys, what is owed, and the
        inbox rows' new states, each as one statement for the whole batch."""
        now = self.clock()
        query = select(t.Intake.id, t.Intake.state, t.Intake.worker, t.Intake.attempts).where(
            t.Intake.id.in_([j.number for j in jobs])
        )
        if s.get_bind().dialect.name == "postgresql":
            query = query.with_for_update()  # a claim taking them over waits, then skips them
        rows = {
            number: (state, worker, attempts)
            for number, state, worker, attempts in s.execute(query)
        }
        for job in jobs:
            v = job.verdict
            # Only an authenticated sender can claim a Message-ID or a payload: a forgery that
            # reuses them must not suppress (or be suppressed by) the genuine message. And only
            # a decided message (a receipt answers it): one quarantined for a defect of ours,
            # sender authenticated or not, is no original to a copy or to its own release.
            authenticated = v.agency is not None and v.signer is not None
            if v.disposition in ("accepted", "rejected") and authenticated:
                job.keys = replay_keys(v)
                job.recorded = recorded_keys(v, job.keys)
                job.keys += keys_of_before(v)  # looked for, not recorded
            else:  # (one quarantined since an earlier try at filing it keeps none of its keys)
                job.keys, job.recorded = [], []
        if s.get_bind().dialect.name == "postgresql" and any(j.keys for j in jobs):
            # Look for copies under the append lock: two workers each holding a copy of one
            # submission must not both find it new (the second's replay key would then fail
            # the whole batch at insert). SQLite writers are serialised already.
            self.archive.log.lock(s)
        seen = _seen(s, [k for j in jobs for k in j.keys])

        def filed_payload(seq: int) -> str | None:
            return self.archive.log.entry(s, seq).fields.get("payload_sha256")

        outcomes: dict[int, Outcome] = {}
        changes: list[dict[str, Any]] = []  # the inbox rows' new values
        owed: list[dict[str, Any]] = []  # outbox rows
        fresh: list[_Job] = []
        twins: dict[int, tuple[_Job, _Job]] = {}  # a duplicate of one earlier in this batch
        first_of: dict[str, _Job] = {}

        def duplicate(job: _Job, original: int) -> None:
            """Not filed again: the original receipt is sent again (to the agency it answers:
            a duplicate's keys are its authenticated sender's)."""
            agency = job.verdict.agency.organ_id if job.verdict.agency else None
            if not outbound.unanswered(job.verdict):  # (the original got no receipt either)
                owed.append(outbound.resend(job.number, original, agency, now))
            changes.append(_done(job.number, original, now))
            outcomes[job.number] = Outcome(job.number, "duplicate", original)

        for job in jobs:
            state, worker, attempts = rows.get(job.number, (None, None, 0))
            if state != "working" or worker != self.name:
                outcomes[job.number] = Outcome(job.number, "done-elsewhere", None)
                continue
            if job.verdict.disposition == "retry":
                changes.append(_retry(job.number, attempts + 1, now))
                outcomes[job.number] = Outcome(job.number, "retry", None)
                if now - job.transport.received_at >= WAIT_ALERT:
                    self._alert_waiting(s, job, now)
                continue
            original, conflict = _copy_of(job, seen, filed_payload)
            if original is not None:
                duplicate(job, original)
                continue
            earlier, taken = _copy_of(job, first_of, _payload_of)
            if earlier is not None:
                twins[job.number] = (job, earlier)
                continue
            if conflict or taken:  # its sender's MessageId, for another document
                job.as_judged, job.verdict = job.verdict, reused(job.verdict)
                job.recorded = recorded_keys(job.verdict, replay_keys(job.verdict))
                made[job.number] = message_item(job.verdict, job.raw, job.transport)
            for k in job.recorded:
                first_of[k] = job
            fresh.append(job)
        providers = {
            j.verdict.agency.organ_id for j in fresh if j.verdict.agency and j.verdict.accepted
        }
        owes = obligation_store.of_providers(s, providers)
        items = [made[j.number] for j in fresh]
        entries = self.archive.file_in(s, items, at=now) if items else []
        seq_of = {j.number: e.seq for j, e in zip(fresh, entries, strict=True)}
        keys: list[dict[str, Any]] = []
        for job in fresh:
            seq = seq_of[job.number]
            keys += [{"key": k, "archive_seq": seq} for k in job.recorded]
            to = self.recipients(job.verdict, owes) if job.verdict.accepted else []
            owed += outbound.owed_for(job.verdict, seq, to, now)
            changes.append(_done(job.number, seq, now))
            outcomes[job.number] = Outcome(job.number, job.verdict.disposition, seq)
        for twin, earlier in twins.values():
            duplicate(twin, seq_of[earlier.number])
        advertised: dict[str, tuple[datetime, int, tuple[str, ...]]] = {}
        for job in fresh:
            if (ad := job.verdict.advertised) is not None:
                mine = (job.transport.received_at, seq_of[job.number], ad[1])
                if ad[0] not in advertised or mine[:2] > advertised[ad[0]][:2]:
                    advertised[ad[0]] = mine
        capabilities.record(s, advertised, now)
        if keys:
            insert_rows(s, t.Seen, keys)
        if owed:
            insert_rows(s, t.Outbox, owed)
        if changes:
            update_rows(s, t.Intake, changes)  # by primary key, one statement per shape
        return [outcomes[j.number] for j in jobs]


def set_aside(raw: bytes, claims: int) -> Verdict:
    """The verdict on a message that was claimed ``claims`` times and never decided."""
    error = InternalError(
        f"the worker checking it stopped {claims} times before deciding it (its process died, "
        f"or took longer than its {LEASE.total_seconds() / 60:g}-minute lease); the message is "
        "kept for an administrator without being checked again"
    )
    return dataclasses.replace(failed_inside(raw, "checking it", error), errors=(error,))


def _copy_of(
    job: _Job, found: Mapping[str, T], payload: Callable[[T], str | None]
) -> tuple[T, bool] | tuple[None, bool]:
    """What ``job`` is a copy of among ``found`` (filed entries, or jobs earlier in the batch,
    by replay key), and whether its sender's MessageId is taken there by another document
    (``payload``: the payload digest of what was found).

    A ``copy:`` key is recorded for a rejected message only. The same signed message that is
    accepted now (the hub's side fixed meanwhile: the recipient agency entered in the
    directory, a schema brought up to date) is no copy of that refusal: it is filed, and its
    sender receipted ``03``; rejected again, it gets the old receipt again."""
    hits = {k.partition(":")[0]: found[k] for k in job.keys if k in found}
    # Several sender keys may be found (the agency's, and those of before it, one a mailbox):
    # one with this payload is the original, if any is.
    senders = [found[k] for k in job.keys if k in found and k.startswith("sender:")]
    same = [f for f in senders if payload(f) == _payload_of(job)]
    if senders:
        hits["sender"] = (same or senders)[0]

    def taken() -> bool:  # its sender's MessageId, found under another payload
        return payload(hits["sender"]) != _payload_of(job)

    # (Its MessageId taken by another document, it is rejected again, as it was: a copy.)
    if job.verdict.accepted and "copy" in hits and not ("sender" in hits and taken()):
        del hits["copy"]
    for kind in ("signed", "copy"):
        if kind in hits:
            return hits[kind], False
    if "sender" not in hits:
        return None, False
    if not taken():  # the same payload signed again
        return hits["sender"], False
    return None, True


def _payload_of(job: _Job) -> str | None:
    opened = job.verdict.opened
    return opened.payload_sha256 if opened is not None else None


def _reason(verdict: Verdict) -> str:
    return next((e.message for e in verdict.errors if is_transient(e)), "a transient failure")


def _waiting(now: datetime) -> Select[int, int, int]:
    """Rows a worker may claim: new, due retries, and claims whose lease ran out."""
    return select(t.Intake.id, t.Intake.size, t.Intake.claims).where(
        or_(
            t.Intake.state == "new",
            (t.Intake.state == "retry") & (t.Intake.next_attempt_at <= now),
            (t.Intake.state == "working") & (t.Intake.lease_until < now),
        )
    )


def claim(
    s: Session, worker: str, now: datetime, limit: int, peers: int = 1
) -> tuple[list[int], bool]:
    """Claim up to ``limit`` waiting rows (new, due retries, expired claims), oldest first, and
    up to :data:`BATCH_BYTES`; and whether that is a backlog (rows left, or a long batch).

    Of what it sees waiting, a worker takes its share among ``peers`` (but at least
    :data:`SHARE_BYTES`): of 31 MB waiting, 16 MB, not all of it, so that at the end of a burst
    of big messages one worker does not work through a long batch alone while the others idle.
    Small messages are claimed as before: 33 of them are far below :data:`SHARE_BYTES`.

    A row claimed before without a decision (``claims``: its worker died, or its lease ran out)
    is claimed alone: if it is what stops its workers, it stops no other message with it.
    """
    # One more row than it may take: is any left? (On PostgreSQL that row is locked until this
    # short transaction commits; a concurrent claim skips it meanwhile, as it would a taken one.)
    query = _waiting(now).order_by(t.Intake.id).limit(limit + 1)
    if s.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    rows = s.execute(query).all()
    numbers: list[int] = []
    total = 0
    share = max(SHARE_BYTES, -(-sum(size for _, size, _ in rows) // max(1, peers)))
    for number, size, claims in rows[:limit]:
        if numbers and (total + size > BATCH_BYTES or total >= share or claims):
            break
        numbers.append(number)
        total += size
        if claims:
            break  # alone
    if numbers:
        s.execute(
            update(t.Intake)
            .where(t.Intake.id.in_(numbers))
            .values(
                state="working",
                worker=worker,
                lease_until=now + LEASE,
                updated_at=now,
                claims=t.Intake.claims + 1,
            )
        )
    long = len(numbers) >= BACKLOG_ROWS or total >= BACKLOG_BYTES
    return numbers, long or len(rows) > len(numbers)


def _seen(s: Session, keys: list[str]) -> dict[str, int]:
    """The entries already filed under any of ``keys``, in one query per 500 keys."""
    found: dict[str, int] = {}
    for chunk in range(0, len(keys), 500):
        query = select(t.Seen.key, t.Seen.archive_seq).where(
            t.Seen.key.in_(keys[chunk : chunk + 500])
        )
        found.update((key, seq) for key, seq in s.execute(query))
    return found


def _retry(number: int, attempts: int, now: datetime) -> dict[str, Any]:
    """A transient failure: the row waits and is claimed again later."""
    return {
        "id": number,
        "state": "retry",
        "attempts": attempts,
        "next_attempt_at": now + intake.backoff(attempts),
        "worker": None,
        "lease_until": None,
        "updated_at": now,
        "claims": 0,
    }


def _done(number: int, seq: int, now: datetime) -> dict[str, Any]:
    """Filed: the archive holds the bytes now, so the working copy is emptied."""
    return {
        "id": number,
        "state": "done",
        "archive_seq": seq,
        "updated_at": now,
        "worker": None,
        "lease_until": None,
        "raw": b"",
        "claims": 0,
    }
