"""The gateway's S/MIME message profile (DESIGN §3): build and open whole messages.

A submission is an RFC 5322 message whose only body is ``application/pkcs7-mime;
smime-type=enveloped-data`` (or ``authEnveloped-data``, RFC 8551 §3.4). Decrypted, it holds one
signed entity — ``multipart/signed`` (RFC 8551 §3.5.3) or opaque ``signed-data`` (§3.5.2) —
whose signed content is the payload entity: ``application/xml`` in base64, optionally inside a
``multipart/mixed`` with attachments. Sign, then encrypt; exactly one signer; nothing unsigned.

Opening plan (:func:`open_message`), each step refusing with its own error:

1. message limits, then the header block: exactly one ``From`` with one mailbox and one
   ``Message-ID`` (:mod:`formats.mime`);
2. the top-level entity is the enveloped part and nothing else (:class:`NotEncrypted`,
   :class:`UnsignedContent`);
3. strict base64, then decryption (:mod:`formats.cms_envelope`);
4. the decrypted entity is exactly one signed entity (:class:`NotSigned`,
   :class:`UnsignedContent`); the signed bytes are cut from the decrypted buffer, never
   re-serialised;
5. the signature verifies (:mod:`formats.cms_signed`);
6. the signed content is the payload entity; its XML is returned *unparsed* — XML is parsed
   only by the caller, after the signer has been trusted.
"""

from __future__ import annotations

import base64
import hashlib
import os
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.errors import CharsetError, HeaderParseError
from email.header import decode_header, make_header
from email.utils import format_datetime
from urllib.parse import quote

import pybase64
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from formats import cms_encrypt, cms_envelope, cms_signed
from formats.cms_envelope import RecipientKey
from formats.cms_signed import SignatureCheck
from formats.errors import (
    MalformedMessage,
    NotEncrypted,
    NotSigned,
    ProfileViolation,
    UnsignedContent,
)
from formats.limits import DEFAULT_LIMITS, Limits
from formats.mime import (
    Entity,
    check_message_limits,
    parse_disposition,
    parse_entity,
    parse_message,
    single_address,
    single_header,
)

PKCS7_MIME = frozenset({"application/pkcs7-mime", "application/x-pkcs7-mime"})
PKCS7_SIGNATURE = frozenset({"application/pkcs7-signature", "application/x-pkcs7-signature"})
XML_TYPES = frozenset({"application/xml", "text/xml"})
_ENVELOPED = frozenset({"enveloped-data", "authenveloped-data"})


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    media_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class OpenedMessage:
    """A decrypted message whose signature verified. Trust in the signer is *not* yet decided."""

    from_addr: str
    message_id: str
    subject: str | None
    raw_sha256: str
    cipher: str
    key_transport: str
    style: str  # "detached" or "opaque"
    signature: SignatureCheck
    #: The decrypted inner entity exactly as decrypted: the signed S/MIME entity, which
    #: ``openssl cms -verify`` checks on its own (a read-only view; no copy is kept).
    decrypted: memoryview
    #: The payload XML bytes, not yet parsed, and their SHA-256 (hex).
    payload: bytes
    payload_sha256: str
    attachments: tuple[Attachment, ...] = ()

    @property
    def signer(self) -> x509.Certificate:
        return self.signature.signer


@dataclass(frozen=True, slots=True)
class Envelope:
    """The readable header facts of a message, available before any decryption."""

    from_addr: str
    message_id: str
    subject: str | None
    #: ``Auto-Submitted: auto-replied`` (RFC 3834): an automatic answer to another message.
    auto_replied: bool = False


def read_envelope(raw: bytes, limits: Limits = DEFAULT_LIMITS) -> tuple[Envelope, Entity]:
    """Step 1: limits and the header facts every message must have."""
    top = parse_message(raw, limits)
    from_addr = single_address(single_header(top, "From"))
    message_id = single_header(top, "Message-ID").strip()
    if not (message_id.startswith("<") and message_id.endswith(">") and "@" in message_id):
        raise MalformedMessage(f"Message-ID {message_id[:80]!r} is not of the form <id@domain>")
    replied = (top.get("auto-submitted") or "").strip().lower().startswith("auto-replied")
    return Envelope(from_addr, message_id, _decoded(top.get("subject")), replied), top


def _decoded(value: str | None) -> str | None:
    """An RFC 2047 encoded header as text (for display only; never echoed into headers)."""
    if value is None:
        return None
    try:
        text = str(make_header(decode_header(value)))[:998]
        # A charset such as UTF-7 decodes to lone surrogates, which no record can hold.
        text.encode("utf-8")
    except (ValueError, LookupError, UnicodeError, HeaderParseError, CharsetError):
        return value[:998]
    return text


def open_message(
    raw: bytes,
    *,
    keys: Sequence[RecipientKey],
    limits: Limits = DEFAULT_LIMITS,
    known: Sequence[x509.Certificate] = (),
) -> OpenedMessage:
    """Open a submission (steps 1–6 of the module plan)."""
    envelope, top = read_envelope(raw, limits)
    return open_envelope(envelope, top, keys=keys, limits=limits, known=known)


def open_envelope(
    envelope: Envelope,
    top: Entity,
    *,
    keys: Sequence[RecipientKey],
    limits: Limits = DEFAULT_LIMITS,
    known: Sequence[x509.Certificate] = (),
) -> OpenedMessage:
    """Steps 2–6 for a message whose header block :func:`read_envelope` has already read."""

    # Step 2.
    _require_enveloped(top)

    # Step 3: the plaintext is written over the decoded ciphertext; nothing else is copied.
    decrypted = cms_envelope.decrypt(
        top.decoded_buffer(limit=limits.max_message_bytes),
        keys,
        max_bytes=limits.max_message_bytes,
    )

    # Step 4 and 5.
    inner = parse_entity(decrypted.content, limits)
    style, check, signed_entity = _verify_signed_entity(inner, limits, known)

    # Step 6.
    payload, attachments = _payload_of(signed_entity, limits)
    return OpenedMessage(
        from_addr=envelope.from_addr,
        message_id=envelope.message_id,
        subject=envelope.subject,
        raw_sha256=hashlib.sha256(top.buffer).hexdigest(),
        cipher=decrypted.cipher,
        key_transport=decrypted.key_transport,
        style=style,
        signature=check,
        decrypted=memoryview(decrypted.content).toreadonly(),
        payload=payload,
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        attachments=attachments,
    )


def _smime_type(entity: Entity) -> str:
    return (entity.content_type.param("smime-type") or "").lower()


def _require_enveloped(top: Entity) -> None:
    ctype = top.content_type.value
    if ctype in PKCS7_MIME and _smime_type(top) in _ENVELOPED:
        return
    if ctype in PKCS7_MIME and _smime_type(top) == "":
        return  # RFC 8551 §3.2.2: smime-type is optional; the CMS content type decides.
    if top.content_type.maintype == "multipart":
        inner = [c for c in top.walk() if c.content_type.value in PKCS7_MIME]
        if any(_smime_type(c) in _ENVELOPED for c in inner):
            raise UnsignedContent(
                "the encrypted part is wrapped in a multipart with other parts; send the "
                "encrypted part as the whole message"
            )
        if ctype == "multipart/signed":
            raise NotEncrypted("the message is signed but not encrypted; encrypt it to the hub")
    if ctype in PKCS7_MIME and _smime_type(top) == "signed-data":
        raise NotEncrypted("the message is signed but not encrypted; encrypt it to the hub")
    raise NotEncrypted(
        f"the message is {ctype}, not an S/MIME encrypted message; sign and encrypt it to the hub"
    )


def verify_signed_entity(
    data: bytes, *, limits: Limits = DEFAULT_LIMITS, known: Sequence[x509.Certificate] = ()
) -> SignatureCheck:
    """Verify a decrypted signed entity on its own (steps 4–5), e.g. from an evidence bundle."""
    return _verify_signed_entity(parse_entity(data, limits), limits, known)[1]


def _verify_signed_entity(
    inner: Entity, limits: Limits, known: Sequence[x509.Certificate]
) -> tuple[str, SignatureCheck, Entity]:
    ctype = inner.content_type.value
    if ctype == "multipart/signed":
        protocol = (inner.content_type.param("protocol") or "").lower()
        if protocol not in PKCS7_SIGNATURE:
            raise ProfileViolation(f"multipart/signed with protocol {protocol!r}; use S/MIME")
        if len(inner.children) != 2:
            raise UnsignedContent(
                f"multipart/signed has {len(inner.children)} parts; exactly two are allowed"
            )
        content, signature = inner.children
        if signature.content_type.value not in PKCS7_SIGNATURE:
            raise ProfileViolation("second part of multipart/signed is not a pkcs7-signature")
        sig_der = signature.decoded_body(limit=limits.max_message_bytes)
        signed = content.raw_view
        check = cms_signed.verify_signed_data(sig_der, detached=signed, known=known)
        # The verified bytes (CRLF-canonical) are parsed, not the possibly LF-damaged copy.
        if check.content is not signed:
            content = parse_entity(bytes(check.content), limits)
        return "detached", check, content
    if ctype in PKCS7_MIME:
        smime_type = _smime_type(inner)
        if smime_type in _ENVELOPED:
            raise ProfileViolation("the message is encrypted twice; sign, then encrypt once")
        if smime_type not in ("signed-data", ""):
            raise ProfileViolation(f"smime-type {smime_type!r} is not allowed inside the envelope")
        der = inner.decoded_body(limit=limits.max_message_bytes)
        check = cms_signed.verify_signed_data(der, known=known)
        return "opaque", check, parse_entity(bytes(check.content), limits)
    if inner.content_type.maintype == "multipart" and any(
        c.content_type.value in PKCS7_SIGNATURE | PKCS7_MIME
        or c.content_type.value == "multipart/signed"
        for c in inner.walk()
    ):
        raise UnsignedContent(
            "the signed part is accompanied by unsigned parts (or sent as an attachment); the "
            "signature must cover the whole message content"
        )
    raise NotSigned("the message is encrypted but not signed; sign it before encrypting")


def _payload_of(entity: Entity, limits: Limits) -> tuple[bytes, tuple[Attachment, ...]]:
    ctype = entity.content_type.value
    if ctype in XML_TYPES:
        return entity.decoded_body(limit=limits.max_xml_bytes), ()
    if ctype == "multipart/mixed" and entity.children:
        first, *rest = entity.children
        if first.content_type.value not in XML_TYPES:
            raise ProfileViolation("the first part of the signed content must be the XML payload")
        attachments: list[Attachment] = []
        for part in rest:
            if part.content_type.maintype == "multipart" or part.content_type.value in PKCS7_MIME:
                raise ProfileViolation("attachments may not be multiparts or S/MIME objects")
            attachments.append(
                Attachment(
                    filename=_filename(part) or f"attachment-{len(attachments) + 1}",
                    media_type=part.content_type.value,
                    data=part.decoded_body(limit=limits.max_message_bytes),
                )
            )
        return first.decoded_body(limit=limits.max_xml_bytes), tuple(attachments)
    raise ProfileViolation(f"the signed content is {ctype}; it must be application/xml")


#: The manifest's FileName (envelope XSD) is at most 255 characters; no longer name can match.
_MAX_NAME = 255


def _filename(part: Entity) -> str | None:
    """An attachment's file name, to show and to compare with the manifest — never to write
    into a header we send.

    Content-Disposition's ``filename`` (RFC 2183), else Content-Type's ``name``, parsed as
    parameters (a quoted ``;`` is text), RFC 2231 values decoded (``filename*=utf-8''…``, as
    Thunderbird, Outlook and Python's email write a non-ASCII name), then RFC 2047 encoded-words
    (which RFC 2047 §5 keeps out of quoted strings, yet many clients put there). Control
    characters, which decoding can produce and no manifest name holds, become U+FFFD.
    """
    name: str | None = None
    disposition = part.get("content-disposition")
    if disposition is not None:
        name = parse_disposition(disposition)[1].get("filename")
    if name is None:
        name = part.content_type.param("name")
    if name is None:
        return None
    text = "".join("\ufffd" if unicodedata.category(c) == "Cc" else c for c in _decoded(name) or "")
    return text[:_MAX_NAME] or None


# --- building ------------------------------------------------------------------------------------


def b64_lines(data: bytes) -> bytes:
    """``data`` in base64 lines of 76 characters, each ending CRLF (RFC 2045 §6.8), as
    ``base64.encodebytes`` writes them (with LF) but about four times as fast (pybase64)."""
    return pybase64.encodebytes(data).replace(b"\n", b"\r\n")


#: UTF-8 bytes per RFC 2047 encoded word: 52 base64 characters, a 64-character word, so that
#: even the first line ("Subject: " and a word) stays within 78 characters (RFC 5322 §2.1.1).
_WORD_BYTES = 39


def header_value(value: str) -> str:
    """``value`` as header text: itself if ASCII, else RFC 2047 ``B`` encoded words of UTF-8,
    cut between characters and folded one word per line."""
    if "\r" in value or "\n" in value:
        raise ValueError("header values may not contain line breaks")
    if value.isascii():
        return value
    data = value.encode()
    words, start = [], 0
    while start < len(data):
        end = min(start + _WORD_BYTES, len(data))
        while end < len(data) and data[end] & 0xC0 == 0x80:  # not inside a character
            end -= 1
        words.append(f"=?utf-8?b?{base64.b64encode(data[start:end]).decode('ascii')}?=")
        start = end
    return "\r\n ".join(words)


def payload_entity(
    payload_xml: bytes, attachments: Sequence[Attachment] = (), *, boundary: str | None = None
) -> bytes:
    """The canonical CRLF MIME entity carrying the XML payload (and attachments)."""
    xml_part = (
        b"Content-Type: application/xml; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="payload.xml"\r\n\r\n' + b64_lines(payload_xml)
    )
    if not attachments:
        return xml_part
    b = (boundary or _boundary()).encode()
    parts = [xml_part]
    for att in attachments:
        disposition = f"attachment;\r\n {filename_parameter(att.filename)}"
        parts.append(
            f"Content-Type: {header_value(att.media_type)}\r\n"
            "Content-Transfer-Encoding: base64\r\n"
            f"Content-Disposition: {disposition}\r\n\r\n".encode()
            + b64_lines(att.data)
        )
    body = b"".join(b"--" + b + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + b + b"--\r\n"
    return b'Content-Type: multipart/mixed; boundary="' + b + b'"\r\n\r\n' + body


#: RFC 2231 §7 attribute-char, beside letters and digits (which ``quote`` always keeps).
_ATTRIBUTE_CHARS = "!#$&+-.^_`|~"
#: Percent-encoded characters per RFC 2231 section: `` filename*NN*=utf-8''`` and 50 more
#: keep every folded line within 78 characters (RFC 5322 §2.1.1).
_SECTION_CHARS = 50


def filename_parameter(name: str) -> str:
    """The ``filename`` parameter of a Content-Disposition (RFC 2183 §2.3) for ``name``, to
    follow a folding ``;\\r\\n ``.

    Short printable ASCII goes in quotes (``"`` and ``\\`` as quoted pairs); anything else as
    RFC 2231 ``filename*``: percent-encoded UTF-8 in sections of whole characters (readers such
    as Python's email decode each section on its own), one per folded line. Not RFC 2047
    encoded-words, which RFC 2047 §5 keeps out of quoted strings.
    """
    if "\r" in name or "\n" in name:
        raise ValueError("file names may not contain line breaks")
    quoted = 'filename="' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if name.isascii() and name.isprintable() and len(quoted) <= 77:
        return quoted
    sections = [""]
    for char in name:
        encoded = quote(char, safe=_ATTRIBUTE_CHARS, encoding="utf-8")
        if len(sections[-1]) + len(encoded) > _SECTION_CHARS:
            sections.append("")
        sections[-1] += encoded
    if len(sections) == 1:
        return f"filename*=utf-8''{sections[0]}"
    sections[0] = "utf-8''" + sections[0]
    return ";\r\n ".join(f"filename*{i}*={section}" for i, section in enumerate(sections))


def _boundary() -> str:
    return "=_gw_" + os.urandom(12).hex()


def sign_entity(
    entity: bytes,
    *,
    cert: x509.Certificate,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    detached: bool = True,
    pss: bool = False,
    chain: Sequence[x509.Certificate] = (),
) -> bytes:
    """Wrap a CRLF entity in a signature: multipart/signed (default) or opaque signed-data,
    carrying ``cert`` and the issuers in ``chain`` (:func:`formats.cms_signed.sign`)."""
    der = cms_signed.sign(entity, cert=cert, key=key, detached=detached, pss=pss, chain=chain)
    if not detached:
        return (
            b"Content-Type: application/pkcs7-mime; smime-type=signed-data;\r\n"
            b' name="smime.p7m"\r\n'
            b"Content-Transfer-Encoding: base64\r\n"
            b'Content-Disposition: attachment; filename="smime.p7m"\r\n\r\n' + b64_lines(der)
        )
    b = _boundary().encode()
    return (
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature";\r\n'
        b' micalg=sha-256; boundary="' + b + b'"\r\n\r\n'
        b"--" + b + b"\r\n" + entity + b"\r\n--" + b + b"\r\n"
        b'Content-Type: application/pkcs7-signature; name="smime.p7s"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="smime.p7s"\r\n\r\n'
        + b64_lines(der)
        + b"\r\n--"
        + b
        + b"--\r\n"
    )


def build_message(
    payload_xml: bytes,
    *,
    signer_cert: x509.Certificate,
    signer_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    recipients: Sequence[x509.Certificate],
    from_addr: str,
    to_addrs: Sequence[str],
    message_id: str,
    date: datetime,
    subject: str = "Official data exchange",
    detached: bool = True,
    pss: bool = False,
    cipher: str = "aes256_cbc",
    oaep: bool = False,
    attachments: Sequence[Attachment] = (),
    signer_chain: Sequence[x509.Certificate] = (),
    limits: Limits = DEFAULT_LIMITS,
) -> bytes:
    """Sign, then encrypt, a payload into a complete RFC 5322 message (CRLF line ends).

    ``signer_chain``: the CA certificates that issued ``signer_cert``, carried in the signature
    for the recipient to build the path to its trust anchor. ``limits``: the recipient's; a
    message :func:`open_message` would refuse on them (MIME parts and nesting, size) is
    :class:`~formats.errors.LimitExceeded` here, checked by the same functions.
    """
    entity = payload_entity(payload_xml, attachments)
    signed = sign_entity(
        entity,
        cert=signer_cert,
        key=signer_key,
        detached=detached,
        pss=pss,
        chain=signer_chain,
    )
    # Steps 4 and 6 parse the decrypted entity: the signed entity, whose detached content is
    # one of its parts, or, signed opaque, the content on its own.
    parse_entity(signed if detached else entity, limits)
    enveloped = cms_encrypt.encrypt(signed, recipients, cipher=cipher, oaep=oaep)
    return wrap_enveloped(
        enveloped,
        smime_type=enveloped_type(cipher),
        from_addr=from_addr,
        to_addrs=to_addrs,
        message_id=message_id,
        date=date,
        subject=subject,
        limits=limits,
    )


def enveloped_type(cipher: str) -> str:
    """The ``smime-type`` of a message encrypted with ``cipher`` (RFC 8551 §3.2.2: AES-GCM is
    AuthEnvelopedData, ``authEnveloped-data``)."""
    return "authEnveloped-data" if cipher.endswith("_gcm") else "enveloped-data"


#: RFC 5322 §2.1.1: a line SHOULD be at most 78 characters and MUST be at most 998, CRLF
#: excluded.
_LINE = 78
_MAX_LINE = 998


def mailbox_text(address: str, header: str) -> str:
    """``address`` as it is written in the ``header`` field: as given, in ASCII.

    Never RFC 2047 encoded-words: RFC 2047 §5 keeps them out of an addr-spec, and a reader
    finds no address in one (or, for a list, splits it wrongly). A non-ASCII mailbox would
    need SMTPUTF8 (RFC 6531) and UTF-8 header fields (RFC 6532), which the gateway does not
    send; the agency directory holds ASCII mailboxes only (:func:`keys.directory.normalize_email`).
    """
    if "\r" in address or "\n" in address:
        raise ValueError(f"{header} address {address!r} contains a line break")
    if not address.strip():
        raise ValueError(f"a {header} address is empty")
    if not address.isascii():
        raise ValueError(
            f"{header} address {address!r} is not ASCII: the gateway writes addresses as they "
            "are, never as RFC 2047 encoded-words (RFC 2047 §5), and does not send SMTPUTF8 "
            "mail (RFC 6531); use an ASCII address (a non-ASCII domain in its xn-- form)"
        )
    if len(header) + len(address) + 3 > _MAX_LINE:  # "To: " … ","
        raise ValueError(f"{header} address {address[:40]!r}… is too long for one line")
    return address


def address_list(header: str, addresses: Sequence[str]) -> str:
    """The ``header`` field (without its CRLF) listing ``addresses`` (:func:`mailbox_text`),
    folded after a comma (RFC 5322 §3.2.2 folding white space, §3.4 address-list) so that no
    line exceeds 78 characters unless one address alone does."""
    if not addresses:
        raise ValueError(f"a message needs at least one {header} address")
    lines = [f"{header}: {mailbox_text(addresses[0], header)}"]
    for address in addresses[1:]:
        text = mailbox_text(address, header)
        # Room for ", " and the address, and for the "," that would end the line on a fold.
        if len(lines[-1]) + 2 + len(text) + 1 <= _LINE:
            lines[-1] += ", " + text
        else:
            lines[-1] += ","
            lines.append(" " + text)
    return "\r\n".join(lines)


def message_headers(
    *,
    from_addr: str,
    to_addrs: Sequence[str],
    message_id: str,
    date: datetime,
    subject: str,
    auto_submitted: str | None = None,
) -> bytes:
    """From, To, Subject, Date, Message-ID and MIME-Version lines (CRLF); the body part's own
    headers follow. Addresses are written as they are and must be ASCII (:func:`mailbox_text`;
    :class:`ValueError` otherwise); the To list is folded (:func:`address_list`); a non-ASCII
    Subject is encoded (:func:`header_value`). ``auto_submitted``: ``auto-generated`` or
    ``auto-replied`` (RFC 3834), for a message no person wrote, which nothing should answer
    automatically."""
    lines = [
        f"From: {mailbox_text(from_addr, 'From')}",
        address_list("To", to_addrs),
        f"Subject: {header_value(subject)}",
        f"Date: {header_value(format_datetime(date))}",
        f"Message-ID: {header_value(message_id)}",
        "MIME-Version: 1.0",
    ]
    if auto_submitted is not None:
        if auto_submitted not in ("auto-generated", "auto-replied"):
            raise ValueError(
                f"Auto-Submitted is auto-generated or auto-replied, not {auto_submitted!r}"
            )
        lines.append(f"Auto-Submitted: {auto_submitted}")
    return "".join(f"{line}\r\n" for line in lines).encode("ascii")


def wrap_enveloped(
    der: bytes,
    *,
    smime_type: str,
    from_addr: str,
    to_addrs: Sequence[str],
    message_id: str,
    date: datetime,
    subject: str,
    limits: Limits = DEFAULT_LIMITS,
    auto_submitted: str | None = None,
) -> bytes:
    """RFC 5322 headers around an enveloped CMS blob, no bigger than ``limits`` allow (the
    check :func:`open_message` makes first)."""
    head = message_headers(
        from_addr=from_addr,
        to_addrs=to_addrs,
        message_id=message_id,
        date=date,
        subject=subject,
        auto_submitted=auto_submitted,
    ) + (
        f"Content-Type: application/pkcs7-mime; smime-type={smime_type};\r\n"
        ' name="smime.p7m"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="smime.p7m"\r\n'
    ).encode("ascii")
    message = head + b"\r\n" + b64_lines(der)
    check_message_limits(message, limits)
    return message
