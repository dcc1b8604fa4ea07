"""Email transport: deliver a composed message by SMTP or to the outbox directory.

Knows nothing about stats, ledgers or Airflow. Callers compose an `EmailMessage` with From, To
and a Message-ID, and call `deliver`. What SMTP can promise: a failure raised before the message
content was transmitted means the server did not take it (`MailDeliveryError.maybe_delivered` is
False); a connection lost after the content was transmitted and before the server's reply leaves
it unknown (True), so a retry may deliver a second copy, with the same Message-ID.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import smtplib
import ssl
import tempfile
from dataclasses import dataclass, field
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formataddr, getaddresses
from pathlib import Path

log = logging.getLogger(__name__)

# Values of the Airflow SMTP connection extra `ssl_context`, as the SMTP provider reads them.
SSL_CONTEXT_DEFAULT = "default"  # verify the server's certificate and host name (also: unset)
SSL_CONTEXT_NONE = "none"  # explicit opt-out: no verification (self-signed lab servers only)


@dataclass(frozen=True)
class SmtpSettings:
    """Where and how to send by SMTP (the fields of an Airflow SMTP connection)."""

    host: str
    port: int = 25
    login: str | None = None
    password: str | None = field(default=None, repr=False)
    use_ssl: bool = False  # implicit TLS (SMTP_SSL, usually port 465)
    starttls: bool = False  # upgrade a plain connection with STARTTLS
    timeout: float = 30.0
    from_email: str | None = None
    verify_tls: bool = True  # False only by the connection extra ssl_context = "none"

    def describe(self) -> str:
        return f"smtp://{self.host}:{self.port}"


class InvalidAddressError(ValueError):
    """An email address that cannot be used (names the address and where it came from)."""


class MailDeliveryError(RuntimeError):
    """A message was not delivered. `maybe_delivered`: the server may have accepted it anyway."""

    def __init__(self, message: str, *, maybe_delivered: bool = False) -> None:
        super().__init__(message)
        self.maybe_delivered = maybe_delivered


@dataclass(frozen=True)
class Recipient:
    """One recipient: display name (may be empty) and the bare address, lowercased."""

    name: str
    address: str

    def formatted(self) -> str:
        return formataddr((self.name, self.address))


def parse_recipients(values: str | list[str], *, source: str = "EMAIL_TO") -> list[Recipient]:
    """Parse address lists (`"Doe, John" <j@x.com>, b@y.com`) into unique recipients.

    Quoted names may contain commas; empty entries are ignored. A recipient listed twice
    (addresses compared without case) is kept once, first occurrence wins. Raises
    InvalidAddressError naming the first entry that is not exactly one valid address.
    """
    texts = [values] if isinstance(values, str) else list(values)
    recipients: dict[str, Recipient] = {}
    for entry in (entry for text in texts for entry in _split_address_list(text)):
        pairs = getaddresses([entry])
        if len(pairs) != 1:
            pairs = [("", entry)]  # several addresses in one entry: name it as written
        name, address = pairs[0]
        bare = bare_address(address or entry, source=source)
        recipients.setdefault(bare, Recipient(name.strip(), bare))
    return list(recipients.values())


def _split_address_list(text: str) -> list[str]:
    """Split at the commas that separate entries (not those in quotes, <...> or comments)."""
    entries, current, quoted, depth, escaped = [], [], False, 0, False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif not quoted and char in "<(":
            depth += 1
        elif not quoted and char in ">)":
            depth = max(0, depth - 1)
        elif char == "," and not quoted and depth == 0:
            entries.append("".join(current))
            current = []
            continue
        current.append(char)
    entries.append("".join(current))
    return [entry.strip() for entry in entries if entry.strip()]


def bare_address(address: str, *, source: str) -> str:
    """`address` validated (local@domain) and lowercased; InvalidAddressError otherwise."""
    try:
        parsed = Address(addr_spec=address)
        # ASCII only: an internationalized address needs SMTPUTF8, which is not supported.
        valid = bool(parsed.username and parsed.domain) and " " not in address
        valid = valid and address.isascii()
    except (ValueError, IndexError, HeaderParseError):
        valid = False
    if not valid:
        raise InvalidAddressError(
            f"Invalid email address {address!r} in {source}: use ASCII addresses like "
            '`a@example.com` or `"Doe, John" <j@example.com>`, separated by commas (an '
            "internationalized domain goes in its xn-- form)."
        )
    return address.lower()


def sender_domain(sender: str) -> str:
    """The domain of the sender's address (`Event Stats <stats@example.com>` -> example.com)."""
    pairs = getaddresses([sender])
    address = pairs[0][1] if len(pairs) == 1 and pairs[0][1] else sender
    return bare_address(address, source=f"the sender {sender!r}").rpartition("@")[2]


def outbox_path(outbox_dir: Path, address: str, message_id: str) -> Path:
    """The outbox file of one message to one address: the same inputs always name the same file.

    A readable prefix, plus a hash of the exact address and Message-ID so that addresses that
    differ only in characters the prefix replaces (`a+b@x`, `a_b@x`) never share a file.
    """
    key = f"{address.lower()}\n{message_id}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9.@-]", "_", f"{message_id.strip('<>')}_{address.lower()}")
    return outbox_dir / f"{readable[:150]}_{digest}.eml"


def deliver(message: EmailMessage, *, smtp: SmtpSettings | None, outbox_dir: Path) -> str:
    """Deliver `message` by SMTP when `smtp` is given, otherwise to `outbox_dir`.

    Returns where it went: `smtp://host:port`, or the path of the outbox file. Raises
    MailDeliveryError with a message that says what to do. The message needs a Message-ID.
    """
    message_id = message["Message-ID"]
    if not message_id:
        raise ValueError("deliver: the message has no Message-ID; set one (email.utils.make_msgid)")
    if smtp is not None:
        _send_smtp(message, smtp)
        return smtp.describe()
    addresses = [address for _, address in getaddresses(message.get_all("To", []))]
    if len(addresses) != 1:
        raise ValueError(f"deliver: an outbox message needs exactly one To address: {addresses}")
    target = outbox_path(outbox_dir, addresses[0], str(message_id))
    try:
        _write_atomically(target, bytes(message))
    except OSError as error:
        raise MailDeliveryError(
            f"Could not write the outbox file {target} ({error}): nothing was written. Make "
            f"{outbox_dir} writable (EMAIL_OUTBOX_DIR), then retry."
        ) from error
    return str(target)


def _write_atomically(target: Path, content: bytes) -> None:
    """Write `target` so that a reader (or a crash) sees the old file or the whole new one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    try:  # the rename survives a power loss too; the file is in place either way
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as error:
        log.warning("Could not sync the outbox directory %s: %s", target.parent, error)


def tls_context(verify: bool) -> ssl.SSLContext:
    """Certificate and host name verified (ssl.create_default_context) unless `verify` is False."""
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _DataTracking:
    """Remembers whether the DATA command was started: after it, a lost connection leaves the
    outcome unknown; before it, the server cannot have accepted the message."""

    data_started = False

    def data(self, msg):  # noqa: ANN001, ANN201 - smtplib's signature
        self.data_started = True
        return super().data(msg)


class _Smtp(_DataTracking, smtplib.SMTP):
    pass


class _SmtpSsl(_DataTracking, smtplib.SMTP_SSL):
    pass


def _send_smtp(message: EmailMessage, smtp: SmtpSettings) -> None:
    where = smtp.describe()
    to = ", ".join(address for _, address in getaddresses(message.get_all("To", [])))
    what = f"the email {message['Message-ID']} to {to} via {where}"
    client: smtplib.SMTP | None = None
    try:
        if smtp.use_ssl:
            context = tls_context(smtp.verify_tls)
            client = _SmtpSsl(smtp.host, smtp.port, timeout=smtp.timeout, context=context)
        else:
            client = _Smtp(smtp.host, smtp.port, timeout=smtp.timeout)
            if smtp.starttls:
                client.starttls(context=tls_context(smtp.verify_tls))
                client.ehlo()
        if smtp.login and smtp.password:
            client.login(smtp.login, smtp.password)
        refused = client.send_message(message)
    except Exception as error:
        raise _delivery_error(error, what, client) from error
    finally:
        if client is not None:
            _close_quietly(client)
    if refused:
        log.warning("The server refused some recipients of %s: %s", what, refused)


def _close_quietly(client: smtplib.SMTP) -> None:
    """QUIT after the message was (or was not) delivered: its failure changes nothing."""
    try:
        client.quit()
    except (smtplib.SMTPException, OSError):
        client.close()


def _delivery_error(error: Exception, what: str, client: smtplib.SMTP | None) -> MailDeliveryError:
    if isinstance(error, ssl.SSLCertVerificationError):
        return MailDeliveryError(
            f"Could not send {what}: the server's TLS certificate failed verification "
            f"({error.verify_message}). Use the host name the certificate names, or add its CA "
            "to the system's trust store; only for a test server, set the Airflow connection "
            f'extra "ssl_context": "{SSL_CONTEXT_NONE}" to skip verification.'
        )
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        reasons = "; ".join(
            f"{address}: {code} {reply.decode(errors='replace')}"
            for address, (code, reply) in error.recipients.items()
        )
        return MailDeliveryError(
            f"Could not send {what}: the server refused the recipient ({reasons}). Fix the "
            "address (EMAIL_TO) or the server's configuration, then retry: nothing was accepted."
        )
    if isinstance(error, smtplib.SMTPResponseException):
        reply = error.smtp_error.decode(errors="replace") if error.smtp_error else ""
        kind = "temporary" if 400 <= error.smtp_code < 500 else "permanent"
        return MailDeliveryError(
            f"Could not send {what}: the server answered {error.smtp_code} {reply} ({kind} "
            "error). Nothing was accepted; retry later (temporary) or fix the cause (permanent)."
        )
    if client is not None and getattr(client, "data_started", False):
        return MailDeliveryError(
            f"Lost the connection while sending {what} ({error!r}): the server may have "
            "accepted it. A retry resends it with the same Message-ID, which mail clients treat "
            "as the same message.",
            maybe_delivered=True,
        )
    return MailDeliveryError(
        f"Could not send {what}: {error!r}. Nothing was accepted. Check that the SMTP server is "
        "up and the Airflow SMTP connection (host, port, TLS extras) is right, then retry."
    )
