"""The email transport: outbox files, recipient parsing, and TLS against real SMTP servers."""

from __future__ import annotations

import json
from email.message import EmailMessage
from pathlib import Path

import pytest
from smtp_fixtures import TlsServer, self_signed

from event_pipeline import airflow_support, mail
from event_pipeline.mail import SmtpSettings


def message(to: str = "a@example.com", message_id: str = "<m1@example.com>") -> EmailMessage:
    composed = EmailMessage()
    composed["From"] = "Event Stats <stats@example.com>"
    composed["To"] = to
    composed["Subject"] = "test"
    composed["Message-ID"] = message_id
    composed.set_content("hello\n")
    return composed


def test_outbox_file_is_written_whole_and_named_by_address_and_message_id(tmp_path: Path):
    where = mail.deliver(message(), smtp=None, outbox_dir=tmp_path)

    assert Path(where) == mail.outbox_path(tmp_path, "a@example.com", "<m1@example.com>")
    assert [p.name for p in tmp_path.iterdir()] == [Path(where).name]  # no partial file left
    assert b"Message-ID: <m1@example.com>" in Path(where).read_bytes()
    # Delivering the same message again replaces the same file: one email, not two.
    mail.deliver(message(), smtp=None, outbox_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1


def test_outbox_names_differ_for_every_address_and_message_id(tmp_path: Path):
    addresses = ["a+b@example.com", "a_b@example.com", "a.b@example.com", "a-b@example.com"]
    names = {mail.outbox_path(tmp_path, a, "<m1@x>") for a in addresses}
    names |= {mail.outbox_path(tmp_path, "a+b@example.com", "<m2@x>")}
    assert len(names) == len(addresses) + 1
    # The same address in another case is the same recipient.
    assert mail.outbox_path(tmp_path, "A+B@Example.com", "<m1@x>") in names


def test_an_unwritable_outbox_is_a_clear_delivery_error(tmp_path: Path):
    blocked = tmp_path / "outbox"
    blocked.write_text("a file where the outbox directory should be")
    with pytest.raises(mail.MailDeliveryError, match="Could not write the outbox file"):
        mail.deliver(message(), smtp=None, outbox_dir=blocked)


def test_parse_recipients_keeps_quoted_names_and_dedupes_by_address():
    recipients = mail.parse_recipients('"Doe, John" <J@x.com>, b@y.com, j@X.COM, ')
    assert recipients == [mail.Recipient("Doe, John", "j@x.com"), mail.Recipient("", "b@y.com")]
    assert recipients[0].formatted() == '"Doe, John" <j@x.com>'


def test_sender_domain_is_the_address_domain():
    assert mail.sender_domain("Event Stats <stats@example.com>") == "example.com"
    assert mail.sender_domain("stats@localhost") == "localhost"
    with pytest.raises(mail.InvalidAddressError, match="the sender 'Event Stats'"):
        mail.sender_domain("Event Stats")


@pytest.fixture(params=["implicit-tls", "starttls"])
def tls_server(request: pytest.FixtureRequest) -> TlsServer:
    name = "smtps_server" if request.param == "implicit-tls" else "starttls_server"
    return request.getfixturevalue(name)


def test_tls_refuses_a_self_signed_certificate_by_default(tls_server: TlsServer, tmp_path: Path):
    recorder, smtp, _ = tls_server
    with pytest.raises(mail.MailDeliveryError, match="certificate failed verification") as error:
        mail.deliver(message(), smtp=smtp, outbox_dir=tmp_path)
    assert '"ssl_context": "none"' in str(error.value)
    assert not error.value.maybe_delivered
    assert recorder.messages == []


def test_tls_accepts_a_self_signed_certificate_with_the_explicit_opt_out(
    tls_server: TlsServer, tmp_path: Path
):
    recorder, smtp, _ = tls_server
    unverified = SmtpSettings(**{**smtp.__dict__, "verify_tls": False})

    assert mail.deliver(message(), smtp=unverified, outbox_dir=tmp_path) == smtp.describe()
    assert recorder.message_ids() == ["<m1@example.com>"]


def test_tls_checks_the_host_name_of_a_trusted_certificate(
    tls_server: TlsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    recorder, smtp, certificate = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate))  # trust the test CA (localhost only)

    assert mail.deliver(message(), smtp=smtp, outbox_dir=tmp_path) == smtp.describe()
    by_ip = SmtpSettings(**{**smtp.__dict__, "host": "127.0.0.1"})  # not the certificate's name
    with pytest.raises(mail.MailDeliveryError, match="Hostname mismatch|IP address mismatch"):
        mail.deliver(message(message_id="<m2@example.com>"), smtp=by_ip, outbox_dir=tmp_path)
    assert recorder.message_ids() == ["<m1@example.com>"]


def test_self_signed_certificate_names_only_its_host(tmp_path: Path):
    certificate, key = self_signed(tmp_path)
    assert certificate.read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")


@pytest.mark.parametrize(
    ("extra", "use_ssl", "starttls", "verify"),
    [
        ({}, True, False, True),
        ({"disable_ssl": True}, False, True, True),
        ({"disable_ssl": True, "ssl_context": "default"}, False, True, True),
        ({"disable_ssl": True, "ssl_context": "none"}, False, True, False),
        ({"ssl_context": "none"}, True, False, False),
        ({"disable_ssl": True, "disable_tls": True}, False, False, True),
    ],
)
def test_smtp_connection_extras_choose_tls_and_its_verification(
    monkeypatch: pytest.MonkeyPatch, extra: dict, use_ssl: bool, starttls: bool, verify: bool
):
    connection = {"conn_type": "smtp", "host": "mail.example.com", "port": 2525, "extra": extra}
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_EMAIL_TEST", json.dumps(connection))

    smtp = airflow_support.smtp_settings("smtp_email_test")

    assert (smtp.use_ssl, smtp.starttls, smtp.verify_tls) == (use_ssl, starttls, verify)


def test_an_unknown_ssl_context_extra_is_refused(monkeypatch: pytest.MonkeyPatch):
    connection = {"conn_type": "smtp", "host": "h", "extra": {"ssl_context": "off"}}
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_EMAIL_TEST", json.dumps(connection))
    with pytest.raises(ValueError, match="ssl_context must be 'default' or 'none', not 'off'"):
        airflow_support.smtp_settings("smtp_email_test")
