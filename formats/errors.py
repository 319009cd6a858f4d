"""The gateway's one error tree.

Every failure the gateway can explain is a subclass of :class:`GatewayError`. Each class knows
what it means to a peer and to a person:

* ``code``   — a stable machine identifier (``signer-revoked``), used in JSON output and tests;
* ``smtp``   — the SMTP reply (code and enhanced status) a listener answers with;
* ``status`` — the receipt status code (edXML Status: ``02`` rejected);
* ``reason_vi`` — a short reason a clerk understands, in Vietnamese (English is the message).

An instance may also carry ``message_vi``, its specifics in Vietnamese (where in the payload,
which value, what the rule is), for the faults a clerk fixes by hand: the payload's fields.

The message of an instance names what was wrong and, where we can, what fixes it. Messages never
carry internal details (stack traces, file paths); they are safe to show to the sender.

Tree::

    GatewayError
    ├── LimitExceeded                 552  something is bigger, deeper or more numerous than allowed
    ├── MalformedMessage              554  not a well-formed RFC 5322 / MIME message
    │   └── HeaderCountError             exactly one From / Message-ID required
    ├── ProfileViolation              554  well-formed, but not our S/MIME profile
    │   ├── NotEncrypted                 signed (or plain) but not enveloped
    │   ├── NotSigned                    encrypted but carries no signature
    │   ├── SignerCountError             zero or several SignerInfos
    │   └── UnsignedContent              parts outside the signed entity
    ├── CryptoError                   554
    │   ├── MalformedCMS                 not parseable DER / wrong CMS structure
    │   ├── WeakAlgorithm                3DES, RC2, DES, MD5, SHA-1, unknown OIDs
    │   ├── KeyTooSmall                  RSA < 2048, curves other than P-256/P-384
    │   ├── NotForUs                     no RecipientInfo matches a hub key
    │   ├── DecryptionFailed             key unwrap or content decryption failed
    │   └── SignatureInvalid             signature or message digest does not verify
    ├── TrustError                    554 5.7.1
    │   ├── UntrustedSigner              no path to a configured trust anchor
    │   ├── SignerRevoked
    │   ├── CertificateExpired
    │   ├── CertificateNotYetValid
    │   ├── WrongKeyUsage                missing e-mail protection EKU / digitalSignature
    │   └── RevocationUnavailable        hard-fail: no fresh CRL/OCSP evidence
    ├── BindingError                  554 5.7.1
    │   ├── SenderMismatch               From address ≠ certificate e-mail
    │   ├── UnknownAgency                sender is not an agency in the directory
    │   └── AgencyMismatch               payload From/OrganId ≠ the sending agency
    ├── PayloadError                  554 5.6.0
    │   ├── XmlForbidden                 DOCTYPE, entities, processing tricks
    │   ├── XmlMalformed                 not well-formed
    │   ├── SchemaInvalid                well-formed but fails the category XSD (line/column)
    │   ├── AttachmentMismatch           attachments differ from the payload's manifest
    │   └── UnknownRecipient             payload To names no agency of the directory that day
    ├── TransientError                451 4.3.0  retry later; never a rejection
    ├── InternalError                    the gateway's own code failed on this message:
    │                                    quarantined, kept for an admin, never retried in a loop
    └── LocalError                    (not a peer's fault) configuration or usage problems
        ├── ConfigError
        └── InputError                   a file or argument given to the CLI is unusable
"""

from __future__ import annotations

from typing import ClassVar


class GatewayError(Exception):
    """Root of every error the gateway explains."""

    code: ClassVar[str] = "error"
    smtp: ClassVar[str] = "554 5.6.0"
    status: ClassVar[str] = "02"
    reason_vi: ClassVar[str] = "Thông điệp không hợp lệ"

    def __init__(
        self, message: str, *, detail: str | None = None, message_vi: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        #: Extra, still peer-safe, detail (for example the XSD error list).
        self.detail = detail
        #: The message's specifics in Vietnamese, where they are known (not every message has
        #: them: the receipt then quotes the English message after ``reason_vi``).
        self.message_vi = message_vi

    @property
    def smtp_reply(self) -> str:
        """A full SMTP reply line: code, enhanced status and a short, peer-safe text."""
        return f"{self.smtp} {self.message}"

    def as_dict(self) -> dict[str, str]:
        out = {"code": self.code, "message": self.message, "reason_vi": self.reason_vi}
        if self.message_vi:
            out["message_vi"] = self.message_vi
        if self.detail:
            out["detail"] = self.detail
        return out


# --- limits and shape ------------------------------------------------------------------------


class LimitExceeded(GatewayError):
    code = "limit-exceeded"
    smtp = "552 5.3.4"
    reason_vi = "Thông điệp vượt quá giới hạn cho phép (kích thước, số phần, độ sâu)"


class MalformedMessage(GatewayError):
    code = "malformed-message"
    smtp = "554 5.6.0"
    reason_vi = "Thư điện tử không đúng định dạng"


class HeaderCountError(MalformedMessage):
    code = "header-count"
    reason_vi = "Thư phải có đúng một trường From và một trường Message-ID"


# --- S/MIME profile -------------------------------------------------------------------------


class ProfileViolation(GatewayError):
    code = "profile-violation"
    smtp = "554 5.6.0"
    reason_vi = "Thư không theo định dạng S/MIME quy định (ký số rồi mã hóa)"


class NotEncrypted(ProfileViolation):
    code = "not-encrypted"
    reason_vi = "Thư không được mã hóa"


class NotSigned(ProfileViolation):
    code = "not-signed"
    reason_vi = "Thư không có chữ ký số"


class SignerCountError(ProfileViolation):
    code = "signer-count"
    reason_vi = "Thư phải có đúng một chữ ký số"


class UnsignedContent(ProfileViolation):
    code = "unsigned-content"
    reason_vi = "Thư có phần nội dung nằm ngoài phần được ký số"


# --- cryptography ---------------------------------------------------------------------------


class CryptoError(GatewayError):
    code = "crypto-error"
    smtp = "554 5.7.5"
    reason_vi = "Lỗi mật mã"


class MalformedCMS(CryptoError):
    code = "malformed-cms"
    reason_vi = "Cấu trúc mật mã (CMS) bị hỏng"


class WeakAlgorithm(CryptoError):
    code = "weak-algorithm"
    reason_vi = "Thuật toán mật mã không được phép (yêu cầu SHA-256, AES-256, RSA ≥ 2048)"


class KeyTooSmall(CryptoError):
    code = "key-too-small"
    reason_vi = "Khóa quá ngắn (RSA phải từ 2048 bit)"


class NotForUs(CryptoError):
    code = "not-for-us"
    reason_vi = "Thư không được mã hóa cho chứng thư số của cổng trao đổi"


class DecryptionFailed(CryptoError):
    code = "decryption-failed"
    reason_vi = "Không giải mã được thư (dữ liệu có thể đã bị sửa đổi)"


class SignatureInvalid(CryptoError):
    code = "signature-invalid"
    reason_vi = "Chữ ký số không hợp lệ (nội dung đã bị sửa đổi sau khi ký)"


# --- trust in the signer --------------------------------------------------------------------


class TrustError(GatewayError):
    code = "trust-error"
    smtp = "554 5.7.1"
    reason_vi = "Chứng thư số của người ký không được tin cậy"


class UntrustedSigner(TrustError):
    code = "untrusted-signer"
    reason_vi = "Chứng thư số không do tổ chức chứng thực được tin cậy cấp"


class SignerRevoked(TrustError):
    code = "signer-revoked"
    reason_vi = "Chứng thư số của người ký đã bị thu hồi"


class CertificateExpired(TrustError):
    code = "certificate-expired"
    reason_vi = "Chứng thư số của người ký đã hết hạn"


class CertificateNotYetValid(TrustError):
    code = "certificate-not-yet-valid"
    reason_vi = "Chứng thư số của người ký chưa có hiệu lực"


class WrongKeyUsage(TrustError):
    code = "wrong-key-usage"
    reason_vi = "Chứng thư số không dùng để ký thư điện tử"


class RevocationUnavailable(TrustError):
    code = "revocation-unavailable"
    smtp = "451 4.7.5"
    status = "01"
    reason_vi = "Chưa kiểm tra được tình trạng thu hồi của chứng thư số; thư sẽ được xử lý lại"


# --- binding of signer, sender and agency ---------------------------------------------------


class BindingError(GatewayError):
    code = "binding-error"
    smtp = "554 5.7.1"
    reason_vi = "Người ký không khớp với cơ quan gửi"


class SenderMismatch(BindingError):
    code = "sender-mismatch"
    reason_vi = "Địa chỉ người gửi (From) không khớp với địa chỉ thư trong chứng thư số"


class UnknownAgency(BindingError):
    code = "unknown-agency"
    reason_vi = "Địa chỉ người gửi không thuộc cơ quan nào trong danh bạ"


class AgencyMismatch(BindingError):
    code = "agency-mismatch"
    reason_vi = "Mã cơ quan gửi trong dữ liệu không khớp với cơ quan đã ký"


# --- payload --------------------------------------------------------------------------------


class PayloadError(GatewayError):
    code = "payload-error"
    smtp = "554 5.6.0"
    reason_vi = "Dữ liệu XML không hợp lệ"


class XmlForbidden(PayloadError):
    code = "xml-forbidden"
    reason_vi = "Dữ liệu XML chứa cấu trúc bị cấm (DOCTYPE, thực thể)"


class XmlMalformed(PayloadError):
    code = "xml-malformed"
    reason_vi = "Dữ liệu XML không đúng cú pháp"


class SchemaInvalid(PayloadError):
    code = "schema-invalid"
    reason_vi = "Dữ liệu XML không đúng lược đồ (XSD) của loại thông tin"


class UnknownRecipient(PayloadError):
    """The payload's ``To`` names an agency the hub cannot deliver to: not in its directory,
    or not active on the day (merged, abolished, not yet in being). Mail's 550 5.1.1."""

    code = "unknown-recipient"
    smtp = "550 5.1.1"
    reason_vi = "Cơ quan nhận ghi trong dữ liệu không có trong danh bạ hoặc không còn hoạt động"


class AttachmentMismatch(PayloadError):
    code = "attachment-mismatch"
    reason_vi = "Tệp đính kèm không khớp với danh mục tệp đính kèm trong dữ liệu"


class MessageIdReused(PayloadError):
    """The sender used the payload's MessageId before, for a different document (DESIGN §5
    rule 3: one MessageId, one document)."""

    code = "message-id-reused"
    reason_vi = (
        "Mã thông điệp (MessageId) đã được dùng cho một văn bản khác; văn bản mới cần mã mới"
    )


# --- not the peer's fault -------------------------------------------------------------------


class TransientError(GatewayError):
    code = "transient"
    smtp = "451 4.3.0"
    status = "01"
    reason_vi = "Lỗi tạm thời; thư sẽ được xử lý lại"


class InternalError(GatewayError):
    """The gateway's own code failed on one message (a defect, not the sender's fault).

    The message is quarantined with its bytes kept, for an administrator to look at and release
    once the defect is fixed; the other messages go on. The exception is the ``__cause__`` (for
    the log); the message names only where it happened, never the exception's text, which may
    hold the message's own bytes.
    """

    code = "internal-error"
    smtp = "451 4.3.0"
    reason_vi = "Cổng gặp lỗi nội bộ khi xử lý thông điệp; quản trị viên sẽ xem xét"

    @classmethod
    def during(cls, what: str, exc: BaseException) -> InternalError:
        err = cls(
            f"the gateway failed while {what} ({type(exc).__name__}); the message is kept for "
            "an administrator"
        )
        err.__cause__ = exc
        return err


class LocalError(GatewayError):
    """A problem on our side or in what an operator gave us; never sent to a peer."""

    code = "local-error"
    smtp = "451 4.3.0"


class ConfigError(LocalError):
    code = "config-error"


class DatabaseDamaged(ConfigError):
    """The database file is damaged or is no database: an administrator must restore it. Not
    a message's fault: work waits (it is part of :data:`gateway.outbound.ENVIRONMENT`), and a
    command stops with one line."""

    code = "database-damaged"


class InputError(LocalError):
    code = "input-error"


#: Errors that mean "try again later" rather than "rejected".
TRANSIENT: tuple[type[GatewayError], ...] = (TransientError, RevocationUnavailable, LocalError)


def is_transient(error: GatewayError) -> bool:
    return isinstance(error, TRANSIENT)
