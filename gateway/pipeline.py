"""The message pipeline: raw bytes in, a :class:`~gateway.verdict.Verdict` out.

Pure (STYLE habit 1): no sockets, files, database or clock. ``at`` is the instant the message
was received; certificates and revocation are judged at that instant::

    verdict = process(raw, ctx, at=received_at)

The plan is the table :data:`STEPS`, run in order. A step either succeeds or records typed
errors; a step may record several (the sender binding reports a From that matches neither the
certificate nor any agency as two reasons, the XSD check lists every schema error in its
detail). A *gate* stops the run when anything so far has failed. The order keeps DESIGN §5
rule 1: nothing in the payload is looked at before decryption, signature, signer and sender
have all been accepted, and nothing in an untrusted certificate is interpreted.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType

from cryptography import x509

from formats.cms_envelope import RecipientKey
from formats.errors import AttachmentMismatch, GatewayError, InternalError, UnknownRecipient
from formats.limits import DEFAULT_LIMITS, Limits
from formats.mime import Entity
from formats.payload import Payload
from formats.smime import Envelope, OpenedMessage, open_envelope, read_envelope
from formats.vntime import local_day
from gateway.verdict import StepOutcome, Verdict, disposition_for
from keys import binding
from keys.directory import Agency, Directory
from keys.trust import TrustStore, ValidatedSigner


@dataclass(frozen=True)
class Context:
    """Everything the pipeline needs besides the message and the time."""

    keys: tuple[RecipientKey, ...]
    trust: TrustStore
    directory: Directory
    limits: Limits = DEFAULT_LIMITS
    #: Agency certificates known to the hub (for signatures that omit the certificate).
    known_certs: tuple[x509.Certificate, ...] = ()
    #: Certificates enrolled per agency (OrganId) with their usable windows; see
    #: :class:`keys.binding.CertificateEnrolled`.
    enrolled: Mapping[str, tuple[binding.Registered, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )


@dataclass
class _Work:
    """Mutable scratch for one run; frozen into a Verdict at the end."""

    raw: bytes
    ctx: Context
    at: datetime
    envelope: Envelope | None = None
    top: Entity | None = None
    opened: OpenedMessage | None = None
    signer: ValidatedSigner | None = None
    agency: Agency | None = None
    payload: Payload | None = None
    errors: list[GatewayError] = field(default_factory=list)


def _envelope(w: _Work) -> None:
    w.envelope, w.top = read_envelope(w.raw, w.ctx.limits)


def _open(w: _Work) -> None:
    assert w.envelope is not None
    assert w.top is not None
    w.opened = open_envelope(
        w.envelope, w.top, keys=w.ctx.keys, limits=w.ctx.limits, known=w.ctx.known_certs
    )


def _trust_signer(w: _Work) -> None:
    assert w.opened is not None
    w.signer = w.ctx.trust.validate_signer(
        w.opened.signer, carried=w.opened.signature.carried, at=w.at
    )


def _binding_ctx(w: _Work) -> binding.BindingContext:
    assert w.signer is not None and w.envelope is not None
    return binding.BindingContext(
        signer=w.signer, from_addr=w.envelope.from_addr, at=local_day(w.at)
    )


def _bind_sender(w: _Work) -> None:
    ctx = _binding_ctx(w)
    policy = binding.AllOf(
        binding.EmailIs(ctx.from_addr),
        binding.SenderIsAgency(w.ctx.directory),
        binding.CertificateEnrolled(w.ctx.enrolled, w.ctx.directory, w.at),
    )
    failures = policy.failures(ctx)
    if failures:
        raise _Several(failures)
    w.agency = w.ctx.directory.by_email(ctx.from_addr, ctx.at)


def _parse_payload(w: _Work) -> None:
    assert w.opened is not None
    w.payload = Payload.from_xml(w.opened.payload, limits=w.ctx.limits)


def _check_attachments(w: _Work) -> None:
    """The signed MIME attachments are exactly those the payload's manifest lists."""
    assert w.payload is not None
    assert w.opened is not None
    # Names compare in Unicode NFC: a client on macOS writes Vietnamese decomposed (NFD),
    # the XML usually precomposed; the same name either way.
    listed = Counter((_nfc(a.name), a.size, a.sha256) for a in w.payload.attachments)
    carried = Counter(
        (_nfc(a.filename), len(a.data), hashlib.sha256(a.data).hexdigest())
        for a in w.opened.attachments
    )
    if listed == carried:
        return
    missing = sorted(name for name, _, _ in listed - carried)
    extra = sorted(name for name, _, _ in carried - listed)
    problems, problems_vi = [], []
    if missing:
        problems.append(
            f"listed in the manifest but not attached (or altered): {', '.join(missing)}"
        )
        problems_vi.append(
            f"có trong danh mục nhưng không được đính kèm (hoặc đã bị sửa): {', '.join(missing)}"
        )
    if extra:
        problems.append(f"attached but not listed in the manifest: {', '.join(extra)}")
        problems_vi.append(f"được đính kèm nhưng không có trong danh mục: {', '.join(extra)}")
    raise AttachmentMismatch(
        "; ".join(problems) + "; attach exactly the files the payload lists",
        message_vi="; ".join(problems_vi) + "; hãy đính kèm đúng các tệp mà dữ liệu liệt kê",
    )


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def _bind_payload(w: _Work) -> None:
    assert w.payload is not None
    organ_id = w.payload.header.sender.organ_id
    binding.AgencyIs(organ_id, w.ctx.directory).verify(_binding_ctx(w))


def _check_recipients(w: _Work) -> None:
    """Every agency the payload's ``To`` names is one the hub can deliver to on the day it was
    received: in the directory, and active then. Accepted otherwise, its receipt would say
    ``03`` while its delivery to that agency could only fail; rejected, the sender reads why
    at once, as mail's ``550 5.1.1 user unknown``. (An agency that leaves the directory after
    the payload was accepted is a failed delivery, alerted to the admin: gateway.builder.)"""
    assert w.payload is not None
    organ_ids = [organ.organ_id for organ in w.payload.header.recipients]
    if problems := w.ctx.directory.undeliverable(organ_ids, local_day(w.at)):
        raise UnknownRecipient(
            f"recipient agency (To) {'; '.join(en for en, _ in problems)}: nothing was "
            "delivered; send it again to the agencies of today",
            message_vi=f"cơ quan nhận (To) {'; '.join(vi for _, vi in problems)}: không chuyển "
            "cho cơ quan nào; hãy gửi lại cho các cơ quan đang hoạt động",
        )


class _Several(Exception):
    def __init__(self, errors: Sequence[GatewayError]) -> None:
        super().__init__(errors)
        self.errors = list(errors)


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[_Work], None]
    #: Stop after this step if anything has failed so far.
    gate: bool = True


#: The plan. Steps between two gates run even if one of them fails.
STEPS: tuple[Step, ...] = (
    Step("envelope", _envelope),  # limits; exactly one From and Message-ID
    Step("decrypt-verify", _open),  # decrypt, S/MIME profile, CMS signature
    Step("signer", _trust_signer),  # path, revocation, EKU at `at`
    Step("sender", _bind_sender),  # From == certificate e-mail; From is an agency
    Step("payload", _parse_payload),  # hardened XML, category XSD, cross-field rules
    Step("attachments", _check_attachments),  # MIME attachments == the payload's manifest
    Step("agency", _bind_payload),  # payload From/OrganId == the signing agency
    Step("recipients", _check_recipients),  # payload To: agencies of the directory that day
)


def process(raw: bytes, ctx: Context, *, at: datetime) -> Verdict:
    """Run :data:`STEPS` over ``raw`` as received at ``at``."""
    if at.utcoffset() is None:
        raise ValueError("process() needs a timezone-aware `at`")
    w = _Work(raw=raw, ctx=ctx, at=at)
    outcomes: list[StepOutcome] = []
    stopped = False
    for step in STEPS:
        if stopped:
            outcomes.append(StepOutcome(step.name, "skipped"))
            continue
        try:
            step.run(w)
            outcomes.append(StepOutcome(step.name, "ok"))
        except _Several as several:
            w.errors.extend(several.errors)
            outcomes.append(StepOutcome(step.name, "failed"))
        except GatewayError as err:
            w.errors.append(err)
            outcomes.append(StepOutcome(step.name, "failed"))
        except Exception as exc:  # a defect of ours: this message is quarantined, not the rest
            w.errors.append(InternalError.during(f"checking it (step {step.name})", exc))
            outcomes.append(StepOutcome(step.name, "failed"))
            stopped = True
        if step.gate and w.errors:
            stopped = True
    authenticated = w.agency is not None and w.signer is not None
    errors = tuple(w.errors)
    return Verdict(
        disposition=disposition_for(errors, authenticated=authenticated),
        errors=errors,
        steps=tuple(outcomes),
        # The digest of what was received: open_envelope's, once it has read the whole of raw.
        raw_sha256=w.opened.raw_sha256 if w.opened else hashlib.sha256(raw).hexdigest(),
        from_addr=w.envelope.from_addr if w.envelope else None,
        message_id=w.envelope.message_id if w.envelope else None,
        subject=w.envelope.subject if w.envelope else None,
        opened=w.opened,
        signer=w.signer,
        agency=w.agency,
        payload=w.payload,
        auto_replied=bool(w.envelope and w.envelope.auto_replied),
    )
