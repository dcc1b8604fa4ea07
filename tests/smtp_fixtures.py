"""A real SMTP server for tests (aiosmtpd on a free localhost port); import the fixture."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Iterator
from email.message import EmailMessage

import pytest
from aiosmtpd.controller import Controller

from event_pipeline.events.process import free_port
from event_pipeline.mail import SmtpSettings


class Recorder:
    """aiosmtpd handler that keeps every accepted message, or rejects recipients when told."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.reject = False

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        if self.reject:
            return "550 5.1.1 mailbox unavailable (test server rejects)"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        self.messages.append(
            email.message_from_bytes(envelope.content, policy=email.policy.default)
        )
        return "250 Message accepted"


@pytest.fixture(name="smtp_server")
def smtp_server_fixture() -> Iterator[tuple[Recorder, SmtpSettings]]:
    """A real SMTP server on a free localhost port: (recorder, settings to reach it)."""
    recorder = Recorder()
    port = free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield recorder, SmtpSettings(host="127.0.0.1", port=port, timeout=10)
    finally:
        controller.stop()
