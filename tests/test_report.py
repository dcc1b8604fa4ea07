"""The stats email: content, recipients, Message-IDs, built dates, the once-only ledger, updates."""

from __future__ import annotations

from datetime import date
from email.headerregistry import Address
from pathlib import Path

import pytest
from report_fixtures import DAY, bodies, read_eml, sample_stats, table, write_stats

from event_pipeline import mail, report, warehouse
from event_pipeline.report import send_stats


def message_id_of(header: object) -> str:
    """A Message-ID header parsed as RFC 5322 msg-id: fails on defects (malformed IDs)."""
    assert not header.defects, (str(header), header.defects)
    return str(header).strip()


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
        stats_db,
        "select event_date, recipient, revision, message_id, status, attempts from ops.email_log",
    )
    assert ledger == [(DAY, "a@example.com", 1, result.message_id, "sent", 1)]


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


def test_changed_stats_send_an_update_that_replaces_and_threads_the_earlier_email(
    stats_db: Path, tmp_path: Path
):
    outbox = tmp_path / "outbox"
    kwargs = dict(
        warehouse_path=stats_db,
        recipients=["a@example.com"],
        outbox_dir=outbox,
        sender="Event Stats <stats@example.com>",
    )
    [first] = send_stats(DAY, **kwargs)
    write_stats(stats_db, [(DAY, "10.0.0.1", 5), (DAY, "10.0.0.2", 13)])  # late data arrived

    [update] = send_stats(DAY, **kwargs)
    [unchanged] = send_stats(DAY, **kwargs)

    assert update.status == "sent" and update.revision == 2
    assert update.message_id != first.message_id
    assert update.supersedes == first.message_id
    original = read_eml(mail.outbox_path(outbox, "a@example.com", first.message_id))
    message = read_eml(mail.outbox_path(outbox, "a@example.com", update.message_id))
    first_id = message_id_of(original["Message-ID"])
    assert first_id == first.message_id
    # Threading: the update answers the first email (parsed headers, not substrings).
    assert message_id_of(message["In-Reply-To"]) == first_id
    assert str(message["References"]).split() == [first_id]
    assert message["Supersedes"] == first_id
    assert message["Subject"].startswith("[Updated]")
    text, _ = bodies(message)
    assert "replaces the earlier stats email for 2026-01-05" in text
    assert "Total events: 18" in text and "Users:        2" in text
    assert unchanged.status == "unchanged"
    assert table(stats_db, "select revision from ops.email_log order by revision") == [(1,), (2,)]


def test_message_id_domain_is_the_sender_address_domain(stats_db: Path, tmp_path: Path):
    outbox = tmp_path / "outbox"
    [result] = send_stats(
        DAY,
        warehouse_path=stats_db,
        recipients=["a@example.com"],
        outbox_dir=outbox,
        sender="Event Stats <stats@Example.com>",
    )

    [eml] = outbox.glob("*.eml")
    message = read_eml(eml)
    parsed = message_id_of(message["Message-ID"])
    assert parsed == result.message_id
    local, _, domain = parsed.strip("<>").partition("@")
    assert domain == "example.com"
    assert "@" not in local and " " not in parsed and parsed.count("<") == 1
    assert message["From"].addresses[0] == Address("Event Stats", "stats", "Example.com")


def test_an_invalid_sender_is_refused_before_anything_is_sent(stats_db: Path, tmp_path: Path):
    with pytest.raises(mail.InvalidAddressError, match="sender 'Event Stats <stats@>'"):
        send_stats(
            DAY,
            warehouse_path=stats_db,
            recipients=["a@example.com"],
            outbox_dir=tmp_path,
            sender="Event Stats <stats@>",
        )
    assert list(tmp_path.glob("*.eml")) == []


def test_a_quoted_name_with_a_comma_is_one_recipient(stats_db: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("EMAIL_TO", '"Doe, John" <j@example.com>, b@example.com')
    outbox = tmp_path / "outbox"

    results = send_stats(DAY, warehouse_path=stats_db, outbox_dir=outbox)

    assert [r.recipient for r in results] == ["j@example.com", "b@example.com"]
    to = sorted(str(read_eml(eml)["To"]) for eml in outbox.glob("*.eml"))
    assert to == ['"Doe, John" <j@example.com>', "b@example.com"]
    assert table(stats_db, "select recipient from ops.email_log order by 1") == [
        ("b@example.com",),
        ("j@example.com",),
    ]


@pytest.mark.parametrize(
    "email_to",
    ["a@example.com, a@example.com", "a@example.com, Alice <A@Example.COM>"],
    ids=["same", "differing-case-and-name"],
)
def test_a_recipient_listed_twice_is_sent_once(stats_db: Path, tmp_path: Path, email_to: str):
    outbox = tmp_path / "outbox"

    results = send_stats(DAY, warehouse_path=stats_db, recipients=email_to, outbox_dir=outbox)
    again = send_stats(DAY, warehouse_path=stats_db, recipients=email_to, outbox_dir=outbox)

    assert [(r.recipient, r.status) for r in results] == [("a@example.com", "sent")]
    assert [r.status for r in again] == ["unchanged"]
    assert len(list(outbox.glob("*.eml"))) == 1
    assert table(stats_db, "select recipient from ops.email_log") == [("a@example.com",)]


@pytest.mark.parametrize(
    "bad", ["not-an-address", "a b@example.com", "x@", "a@example.com;b@x", "j@exämple.com"]
)
def test_an_invalid_recipient_is_refused_naming_it(stats_db: Path, tmp_path: Path, bad: str):
    with pytest.raises(mail.InvalidAddressError, match="Invalid email address") as error:
        send_stats(
            DAY,
            warehouse_path=stats_db,
            recipients=f"ok@example.com, {bad}",
            outbox_dir=tmp_path,
        )
    assert bad in str(error.value)
    assert list(tmp_path.glob("*.eml")) == []
    assert ("email_log",) not in table(stats_db, "select table_name from duckdb_tables()")


def test_recipients_differing_only_in_plus_and_underscore_each_get_their_file(
    stats_db: Path, tmp_path: Path
):
    outbox = tmp_path / "outbox"
    recipients = "a+b@example.com, a_b@example.com, a-b@example.com"

    results = send_stats(DAY, warehouse_path=stats_db, recipients=recipients, outbox_dir=outbox)

    assert [r.status for r in results] == ["sent"] * 3
    to = sorted(str(read_eml(eml)["To"]) for eml in outbox.glob("*.eml"))
    assert to == ["a+b@example.com", "a-b@example.com", "a_b@example.com"]


def test_a_built_empty_day_gets_a_short_email(stats_db: Path, tmp_path: Path):
    outbox = tmp_path / "outbox"
    empty_day = date(2026, 1, 7)
    write_stats(stats_db, [(DAY, "10.0.0.1", 5)], built=(empty_day,))  # built, no events

    [result] = send_stats(
        empty_day, warehouse_path=stats_db, recipients=["a@example.com"], outbox_dir=outbox
    )

    message = read_eml(mail.outbox_path(outbox, "a@example.com", result.message_id))
    assert result.status == "sent"
    assert "0 events from 0 users" in message["Subject"]
    assert "No events were recorded" in bodies(message)[0]


def test_a_date_never_built_is_refused_and_nothing_is_sent(stats_db: Path, tmp_path: Path):
    never_built = date(2026, 1, 8)  # other dates are built; this one never was

    with pytest.raises(report.StatsNotBuiltError, match="2026-01-08 were never built"):
        send_stats(
            never_built, warehouse_path=stats_db, recipients=["a@example.com"], outbox_dir=tmp_path
        )

    assert list(tmp_path.glob("*.eml")) == []
    assert ("email_log",) not in table(stats_db, "select table_name from duckdb_tables()")


def test_a_warehouse_without_any_build_is_refused(tmp_path: Path):
    path = tmp_path / "empty"
    with pytest.raises(report.StatsNotBuiltError, match="2026-01-05 were never built"):
        send_stats(DAY, warehouse_path=path, recipients=["a@example.com"], outbox_dir=tmp_path)
    assert list(tmp_path.glob("*.eml")) == []


def test_stats_changed_outside_dbt_are_refused(stats_db: Path, tmp_path: Path):
    with warehouse.connect(stats_db) as connection:
        connection.execute("delete from analytics.event_stats where user_id = '10.0.0.3'")

    with pytest.raises(report.StatsNotBuiltError, match="changed outside dbt"):
        send_stats(DAY, warehouse_path=stats_db, recipients=["a@example.com"], outbox_dir=tmp_path)
    assert list(tmp_path.glob("*.eml")) == []


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


def test_an_older_ledger_is_upgraded_and_its_emails_still_count(tmp_path: Path):
    """A ledger written before intent rows (no status column, sent_at not null, recipients as
    configured, display name included) is upgraded in place and keeps its meaning. Such
    ledgers exist in DuckDB files only (a DuckLake's is new)."""
    stats_db = sample_stats(tmp_path / "warehouse.duckdb")
    outbox = tmp_path / "outbox"
    [sent] = send_stats(DAY, warehouse_path=stats_db, recipients="a@example.com", outbox_dir=outbox)
    with warehouse.connect(stats_db) as connection:
        connection.execute("alter table ops.email_log rename to email_log_new")
        connection.execute(
            """
            create table ops.email_log (
                event_date date not null, recipient varchar not null, revision integer not null,
                content_hash varchar not null, message_id varchar not null, supersedes varchar,
                total_events bigint not null, users bigint not null, backend varchar not null,
                sent_at timestamp not null, primary key (event_date, recipient, revision)
            );
            insert into ops.email_log
            select event_date, 'Alice <A@Example.com>', revision, content_hash, message_id,
                supersedes, total_events, users, backend, now()::timestamp
            from ops.email_log_new;
            drop table ops.email_log_new;
            """
        )

    [again] = send_stats(
        DAY, warehouse_path=stats_db, recipients="a@example.com", outbox_dir=outbox
    )
    write_stats(stats_db, [(DAY, "10.0.0.1", 6)])
    [update] = send_stats(
        DAY, warehouse_path=stats_db, recipients="a@example.com", outbox_dir=outbox
    )

    assert again.status == "unchanged" and again.message_id == sent.message_id
    assert update.revision == 2 and update.supersedes == sent.message_id
    rows = table(
        stats_db,
        "select recipient, revision, status, sent_at is not null from ops.email_log order by 2",
    )
    assert rows == [("Alice <A@Example.com>", 1, "sent", True), ("a@example.com", 2, "sent", True)]


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


def test_an_email_that_cannot_be_composed_does_not_stop_the_others(
    stats_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    outbox = tmp_path / "outbox"
    recipients = "a@example.com, b@example.com, c@example.com"
    compose = report.compose_email

    def compose_failing_for_b(*args, **kwargs):
        if "b@example.com" in kwargs["recipient"]:
            raise UnicodeEncodeError("utf-8", "x", 0, 1, "a fault while composing")
        return compose(*args, **kwargs)

    monkeypatch.setattr(report, "compose_email", compose_failing_for_b)
    with pytest.raises(report.SendStatsError, match="b@example.com could not be composed"):
        send_stats(DAY, warehouse_path=stats_db, recipients=recipients, outbox_dir=outbox)
    # The others went out; b's intent is gone (certainly not sent), so nothing is in doubt.
    assert sorted(table(stats_db, "select recipient, status from ops.email_log")) == [
        ("a@example.com", "sent"),
        ("c@example.com", "sent"),
    ]
    monkeypatch.setattr(report, "compose_email", compose)
    again = send_stats(DAY, warehouse_path=stats_db, recipients=recipients, outbox_dir=outbox)
    assert sorted((r.recipient, r.status) for r in again) == [
        ("a@example.com", "unchanged"),
        ("b@example.com", "sent"),
        ("c@example.com", "unchanged"),
    ]
    assert len(list(outbox.glob("*.eml"))) == 3
