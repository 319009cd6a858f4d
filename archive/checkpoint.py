"""Signed checkpoints: the log's size and root at a moment, signed by the hub.

The body is a short text any tool can read (CRLF line ends, as CMS signing of text wants)::

    official-mail-gateway archive checkpoint
    origin: hub@exchange.hanoi.gov.vn
    size: 1024
    root: <base64 of the 32-byte tree head>
    time: 2026-11-22T10:00:00.000000Z

and the signature is a detached CMS SignedData over exactly those bytes, so that
``openssl cms -verify -binary -content body.txt -in body.p7s -inform DER -CAfile root.pem``
checks it without our code. Pure: the key and the time are passed in.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from formats import cms_signed
from formats.errors import GatewayError

HEADER = "official-mail-gateway archive checkpoint"


class CheckpointError(Exception):
    """A checkpoint that does not parse or whose signature does not verify."""


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    at: datetime

    def body(self) -> bytes:
        lines = [
            HEADER,
            f"origin: {self.origin}",
            f"size: {self.size}",
            f"root: {base64.b64encode(self.root).decode()}",
            f"time: {self.at.astimezone(UTC).isoformat(timespec='microseconds').replace('+00:00', 'Z')}",
        ]
        return ("\r\n".join(lines) + "\r\n").encode()

    @classmethod
    def parse(cls, body: bytes) -> Checkpoint:
        try:
            lines = body.decode("utf-8").split("\r\n")
            if lines[0] != HEADER or lines[-1] != "" or len(lines) != 6:
                raise ValueError("not a checkpoint")
            values = dict(line.split(": ", 1) for line in lines[1:5])
            root = base64.b64decode(values["root"], validate=True)
            if len(root) != 32:
                raise ValueError("root is not 32 bytes")
            at = datetime.fromisoformat(values["time"].replace("Z", "+00:00"))
            if at.utcoffset() is None:
                # A time without an offset names no instant: it cannot be compared with a
                # certificate's validity, so it is refused here rather than guessed at.
                raise ValueError(f"time {values['time']!r} has no offset (write it ending in Z)")
            return cls(values["origin"], int(values["size"]), root, at)
        except (ValueError, KeyError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"checkpoint does not parse ({exc})") from None


def sign(
    checkpoint: Checkpoint,
    cert: x509.Certificate,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
) -> bytes:
    """A detached CMS signature (DER) over :meth:`Checkpoint.body`."""
    return cms_signed.sign(checkpoint.body(), cert=cert, key=key, detached=True)


def verify(body: bytes, signature: bytes, signers: list[x509.Certificate]) -> Checkpoint:
    """The checkpoint, if ``signature`` verifies over ``body`` and was made by one of
    ``signers`` (the hub's certificates); :class:`CheckpointError` otherwise."""
    return verify_signer(body, signature, signers)[0]


def verify_signer(
    body: bytes, signature: bytes, signers: list[x509.Certificate]
) -> tuple[Checkpoint, x509.Certificate]:
    """:func:`verify`, and which of ``signers`` made the signature."""
    try:
        check = cms_signed.verify_signed_data(signature, detached=body, known=signers)
    except GatewayError as err:
        raise CheckpointError(f"checkpoint signature does not verify: {err.message}") from None
    if check.signer not in signers:
        raise CheckpointError(
            f"checkpoint is signed by {check.signer.subject.rfc4514_string()}, which is not "
            "one of the hub's certificates"
        )
    if bytes(check.content) != body:
        raise CheckpointError("checkpoint signature covers other bytes than its body")
    return Checkpoint.parse(body), check.signer
