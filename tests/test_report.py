"""The stats email: content, exactly-once ledger, updates, outbox and a real SMTP server."""

from __future__ import annotations

import email
import email.policy
from datetime import date
from email.message import EmailMessage
from pathlib import Path

import duckdb
import pytest
from smtp_fixtures import smtp_server_fixture  # noqa: F401 (the smtp_server fixture)

from event_pipeline import mail
from event_pipeline.report import send_stats

DAY = date(2026, 1, 5)


def write_stats(path: Path, rows: list[tuple[date, str, int]]) -> None:
    """Replace analytics.event_stats with `rows` (the dbt model's output shape)."""
    with duckdb.connect(str(path)) as connection:
        connection.execute("create schema if not exists analytics")
        connection.execute(
            "create or replace table analytics.event_stats "
            "(event_date date, user_id varchar, event_count bigint)"
        )
        if rows:
            connection.executemany("insert into analytics.event_stats values (?, ?, ?)", rows)


def table(path: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(path), read_only=True) as connection:
        return connection.execute(sql).fetchall()


def read_eml(path: Path) -> EmailMessage:
    return email.message_from_bytes(path.read_bytes(), policy=email.policy.default)


def bodies(message: EmailMessage) -> tuple[str, str]:
    text = message.get_body(("plain",)).get_content()
    body_html = message.get_body(("html",)).get_content()
    return text, body_html


@pytest.fixture
def stats_db(tmp_path: Path) -> Path:
    path = tmp_path / "warehouse.duckdb"
    write_stats(
        path,
        [
            (DAY, "10.0.0.1", 5),
            (DAY, "10.0.0.2", 12),
            (DAY, "10.0.0.3", 1),
            (date(2026, 1, 6), "10.0.0.9", 99),  # another date: must not appear
        ],
    )
    return path


def test_outbox_email_has_date_totals_top_users_text_and_html(stats_db: Path, tmp_path: Path):
    outbox = tmp_path / "outbox"
    [result] = send_stats(
        DAY, warehouse_path=stats_db, recipients=["a@example.com"], outbox_dir=outbox
    )

    assert result.status == "sent" and result.revision == 1
    [eml] = outbox.glob("*.eml")
    message = read_eml(eml)
    assert "2026-01-05" in message["Subject"]
    assert "18 events from 3 users" in message["Subject"]
    assert message["To"] == "a@example.com"
    assert message["Message-ID"] == result.message_id
    assert "2026-01-05" in result.message_id
    text, body_html = bodies(message)
    assert "Total events: 18" in text
    # top users ordered by count
    assert text.index("10.0.0.2") < text.index("10.0.0.1") < text.index("10.0.0.3")
    assert "10.0.0.9" not in text
    assert "<table" in body_html and "<td>10.0.0.2</td>" in body_html
    ledger = table(
        stats_db, "select event_date, recipient, revision, message_id from ops.email_log"
    )
    assert ledger == [(DAY, "a@example.com", 1, result.message_id)]


def test_rerun_with_unchanged_stats_sends_nothing(stats_db: Path, tmp_path: Path):
    outbox = tmp_path / "outbox"
    first = send_stats(
        DAY, warehouse_path=stats_db, recipients=["a@example.com"], outbox_dir=outbox
    )
    again = send_stats(
        DAY, warehouse_path=stats_db, recipients=["a@example.com"], outbox_dir=outbox
    )

    assert [r.status for r in again] == ["unchanged"]
    assert again[0].message_id == first[0].message_id
    assert len(list(outbox.glob("*.eml"))) == 1
    assert table(stats_db, "select count(*) from ops.email_log") == [(1,)]


def test_changed_stats_send_an_update_that_replaces_the_earlier_email(
    stats_db: Path, tmp_path: Path
):
    outbox = tmp_path / "outbox"
    kwargs = dict(warehouse_path=stats_db, recipients=["a@example.com"], outbox_dir=outbox)
    [first] = send_stats(DAY, **kwargs)
    write_stats(stats_db, [(DAY, "10.0.0.1", 5), (DAY, "10.0.0.2", 13)])  # late data arrived

    [update] = send_stats(DAY, **kwargs)
    [unchanged] = send_stats(DAY, **kwargs)

    assert update.status == "sent" and update.revision == 2
    assert update.message_id != first.message_id
    assert update.supersedes == first.message_id
    message = read_eml(mail.outbox_path(outbox, "a@example.com", update.message_id))
    assert message["Supersedes"] == first.message_id
    assert first.message_id in message["References"]
    assert message["Subject"].startswith("[Updated]")
    text, _ = bodies(message)
    assert "replaces the earlier stats email for 2026-01-05" in text
    assert "Total events: 18" in text and "Users:        2" in text
    assert unchanged.status == "unchanged"
    assert table(stats_db, "select revision from ops.email_log order by revision") == [(1,), (2,)]


def test_an_empty_day_gets_a_short_email(stats_db: Path, tmp_path: Path):
    outbox = tmp_path / "outbox"
    empty_day = date(2026, 1, 7)
    [result] = send_stats(
        empty_day, warehouse_path=stats_db, recipients=["a@example.com"], outbox_dir=outbox
    )
    message = read_eml(mail.outbox_path(outbox, "a@example.com", result.message_id))
    assert result.status == "sent"
    assert "0 events from 0 users" in message["Subject"]
    assert "No events were recorded" in bodies(message)[0]


def test_a_new_recipient_gets_the_email_once_and_others_not_again(stats_db: Path, tmp_path: Path):
    outbox = tmp_path / "outbox"
    send_stats(DAY, warehouse_path=stats_db, recipients=["a@example.com"], outbox_dir=outbox)
    results = send_stats(
        DAY,
        warehouse_path=stats_db,
        recipients=["a@example.com", "b@example.com"],
        outbox_dir=outbox,
    )
    assert [(r.recipient, r.status) for r in results] == [
        ("a@example.com", "unchanged"),
        ("b@example.com", "sent"),
    ]


def test_missing_stats_table_names_the_date(tmp_path: Path):
    path = tmp_path / "empty.duckdb"
    with pytest.raises(RuntimeError, match="2026-01-05.*analytics.event_stats does not exist"):
        send_stats(DAY, warehouse_path=path, recipients=["a@example.com"], outbox_dir=tmp_path)


def test_smtp_delivers_the_same_message(stats_db: Path, smtp_server, tmp_path: Path):
    recorder, smtp = smtp_server
    [result] = send_stats(
        DAY, warehouse_path=stats_db, recipients=["a@example.com"], smtp=smtp, outbox_dir=tmp_path
    )
    [received] = recorder.messages
    assert received["Message-ID"] == result.message_id
    assert "2026-01-05" in received["Subject"]
    assert result.backend == f"smtp://127.0.0.1:{smtp.port}"
    assert list(tmp_path.glob("*.eml")) == []  # SMTP replaces the outbox


def test_smtp_rejection_leaves_stats_and_ledger_intact_and_a_retry_sends_once(
    stats_db: Path, smtp_server, tmp_path: Path
):
    recorder, smtp = smtp_server
    stats_before = table(stats_db, "select * from analytics.event_stats order by all")
    kwargs = dict(warehouse_path=stats_db, recipients=["a@example.com"], smtp=smtp)

    recorder.reject = True
    with pytest.raises(mail.MailDeliveryError, match="refused the recipient"):
        send_stats(DAY, **kwargs)
    assert recorder.messages == []
    assert table(stats_db, "select count(*) from ops.email_log") == [(0,)]
    assert table(stats_db, "select * from analytics.event_stats order by all") == stats_before

    recorder.reject = False
    [retry] = send_stats(DAY, **kwargs)
    [again] = send_stats(DAY, **kwargs)
    assert retry.status == "sent" and again.status == "unchanged"
    assert len(recorder.messages) == 1
    assert table(stats_db, "select count(*) from ops.email_log") == [(1,)]
