"""Real SMTP servers for tests (aiosmtpd on free localhost ports); import the fixtures.

`smtp_server`: plain SMTP. `smtps_server`: implicit TLS. `starttls_server`: STARTTLS required.
The TLS servers present a self-signed certificate for `localhost` made by `self_signed`.
The Recorder handler keeps what it accepted and can be told to fail (faults).
"""

from __future__ import annotations

import datetime
import email
import email.policy
import ipaddress
import json
import ssl
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from event_pipeline.events.process import free_port
from event_pipeline.mail import SmtpSettings


class Recorder:
    """aiosmtpd handler that keeps every accepted message, or fails when told.

    reject: RCPT answered 550 (kept for older tests); rcpt_reply / data_reply: the reply to RCPT
    or to the end of DATA instead of 250 (e.g. "451 4.3.0 try later"); rcpt_replies: the same
    for some addresses only;
    drop_after_data: the message is taken (recorded) and the connection closed without a reply;
    on_data: called with each message before the reply (e.g. to act at that moment).
    """

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.reject = False
        self.rcpt_reply: str | None = None
        self.rcpt_replies: dict[str, str] = {}
        self.data_reply: str | None = None
        self.drop_after_data = False
        self.on_data: Callable[[EmailMessage], None] | None = None

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        if self.reject:
            return "550 5.1.1 mailbox unavailable (test server rejects)"
        if self.rcpt_reply or address in self.rcpt_replies:
            return self.rcpt_reply or self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        if self.data_reply:
            return self.data_reply
        if self.on_data:
            self.on_data(message)
        self.messages.append(message)
        if self.drop_after_data:
            server.transport.abort()  # accepted here, but the client never hears it
        return "250 Message accepted"

    def message_ids(self) -> list[str]:
        return [str(message["Message-ID"]) for message in self.messages]


def airflow_connection(smtp: SmtpSettings) -> str:
    """AIRFLOW_CONN_SMTP_DEFAULT's value for the plain (no TLS) test server at `smtp`."""
    return json.dumps(
        {
            "conn_type": "smtp",
            "host": smtp.host,
            "port": smtp.port,
            "extra": {"disable_ssl": True, "disable_tls": True},
        }
    )


def _serve(recorder: Recorder, **options: object) -> tuple[Controller, int]:
    port = free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=port, **options)
    controller.start()
    return controller, port


@pytest.fixture(name="smtp_server")
def smtp_server_fixture() -> Iterator[tuple[Recorder, SmtpSettings]]:
    """A real SMTP server on a free localhost port: (recorder, settings to reach it)."""
    recorder = Recorder()
    controller, port = _serve(recorder)
    try:
        yield recorder, SmtpSettings(host="127.0.0.1", port=port, timeout=10)
    finally:
        controller.stop()


def self_signed(directory: Path, host: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate for `host` (and 127.0.0.1 only if host is that): (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    try:
        alt_name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alt_name = x509.DNSName(host)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([alt_name]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{host}.crt", directory / f"{host}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


TlsServer = tuple[Recorder, SmtpSettings, Path]  # recorder, settings (host localhost), CA cert


@pytest.fixture(name="smtps_server")
def smtps_server_fixture(tmp_path: Path) -> Iterator[TlsServer]:
    """SMTP over implicit TLS with a self-signed certificate for `localhost`."""
    cert, key = self_signed(tmp_path)
    recorder = Recorder()
    controller, port = _serve(recorder, ssl_context=_server_context(cert, key))
    try:
        yield recorder, SmtpSettings(host="localhost", port=port, use_ssl=True, timeout=10), cert
    finally:
        controller.stop()


@pytest.fixture(name="starttls_server")
def starttls_server_fixture(tmp_path: Path) -> Iterator[TlsServer]:
    """SMTP that requires STARTTLS, with a self-signed certificate for `localhost`."""
    cert, key = self_signed(tmp_path)
    recorder = Recorder()
    controller, port = _serve(
        recorder, tls_context=_server_context(cert, key), require_starttls=True
    )
    try:
        yield recorder, SmtpSettings(host="localhost", port=port, starttls=True, timeout=10), cert
    finally:
        controller.stop()
