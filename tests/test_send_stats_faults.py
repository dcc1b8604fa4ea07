"""send_stats under faults: real SMTP servers that fail, a second process on the warehouse, kills.

For every fault: the call fails with a message that names the date and says what to do, the stats
are untouched, and a retry sends each (date, recipient, content) at most once: exactly once with
the outbox; over SMTP at most one resend with the same Message-ID, and only where the server may
have accepted the first one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from report_fixtures import DAY, OTHER_DAY, sample_stats, table
from smtp_fixtures import Recorder, TlsServer

from event_pipeline import mail, report, warehouse
from event_pipeline.events.process import free_port
from event_pipeline.mail import SmtpSettings
from event_pipeline.report import send_stats
from event_pipeline.warehouse import WarehouseLockedError

TO = "a@example.com"


def built_stats(path: Path) -> list[tuple]:
    return table(path, "select * from analytics.event_stats order by all") + table(
        path, "select * from ops.build_log order by all"
    )


def ledger(path: Path) -> list[tuple]:
    return table(
        path,
        "select recipient, revision, message_id, status, attempts from ops.email_log order by all",
    )


@pytest.mark.parametrize(
    "fault",
    [
        {"rcpt_reply": "450 4.2.1 mailbox busy, try later"},
        {"rcpt_reply": "550 5.1.1 no such mailbox"},
        {"data_reply": "451 4.3.0 local error, try later"},
        {"data_reply": "554 5.6.0 message rejected"},
    ],
    ids=["rcpt-4xx", "rcpt-5xx", "data-4xx", "data-5xx"],
)
def test_smtp_refusal_fails_clearly_keeps_everything_and_a_retry_sends_once(
    stats_db: Path, smtp_server: tuple[Recorder, SmtpSettings], fault: dict[str, str]
):
    recorder, smtp = smtp_server
    before = built_stats(stats_db)
    for name, reply in fault.items():
        setattr(recorder, name, reply)

    with pytest.raises(report.SendStatsError) as error:
        send_stats(DAY, warehouse_path=stats_db, recipients=TO, smtp=smtp)

    code = next(iter(fault.values()))[:3]
    assert "2026-01-05" in str(error.value) and code in str(error.value)
    assert "Nothing was accepted" in str(error.value) or "nothing was accepted" in str(error.value)
    assert recorder.messages == []
    assert ledger(stats_db) == []  # the intent row went with the certain failure
    assert built_stats(stats_db) == before

    for name in fault:
        setattr(recorder, name, None)
    [retry] = send_stats(DAY, warehouse_path=stats_db, recipients=TO, smtp=smtp)
    [again] = send_stats(DAY, warehouse_path=stats_db, recipients=TO, smtp=smtp)
    assert (retry.status, again.status) == ("sent", "unchanged")
    assert recorder.message_ids() == [retry.message_id]
    assert ledger(stats_db) == [(TO, 1, retry.message_id, "sent", 1)]


def test_smtp_down_fails_clearly_and_a_retry_sends_once(stats_db: Path, tmp_path: Path):
    port = free_port()  # nothing listens there yet
    smtp = SmtpSettings(host="127.0.0.1", port=port, timeout=5)
    before = built_stats(stats_db)

    with pytest.raises(report.SendStatsError, match="Nothing was accepted. Check that the SMTP"):
        send_stats(DAY, warehouse_path=stats_db, recipients=TO, smtp=smtp)
    assert ledger(stats_db) == [] and built_stats(stats_db) == before

    recorder = Recorder()
    controller = Controller(recorder, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        [retry] = send_stats(DAY, warehouse_path=stats_db, recipients=TO, smtp=smtp)
        [again] = send_stats(DAY, warehouse_path=stats_db, recipients=TO, smtp=smtp)
    finally:
        controller.stop()
    assert (retry.status, again.status) == ("sent", "unchanged")
    assert recorder.message_ids() == [retry.message_id]


def test_a_connection_lost_after_data_is_resent_once_with_the_same_message_id(
    stats_db: Path, smtp_server: tuple[Recorder, SmtpSettings]
):
    recorder, smtp = smtp_server
    recorder.drop_after_data = True  # the server takes the message, the client never hears it

    with pytest.raises(report.SendStatsError, match="may have accepted it"):
        send_stats(DAY, warehouse_path=stats_db, recipients=TO, smtp=smtp)
    [first] = recorder.message_ids()
    [(status, error)] = table(stats_db, "select status, error from ops.email_log")
    assert status == "sending" and "Lost the connection" in error

    recorder.drop_after_data = False
    [retry] = send_stats(DAY, warehouse_path=stats_db, recipients=TO, smtp=smtp)
    [again] = send_stats(DAY, warehouse_path=stats_db, recipients=TO, smtp=smtp)

    assert (retry.status, again.status) == ("resent", "unchanged")
    assert recorder.message_ids() == [first, first]  # one resend, same Message-ID
    assert ledger(stats_db) == [(TO, 1, first, "sent", 2)]


def test_tls_failure_fails_clearly_and_sends_nothing(stats_db: Path, smtps_server: TlsServer):
    recorder, smtp, _ = smtps_server
    before = built_stats(stats_db)

    with pytest.raises(report.SendStatsError, match="certificate failed verification"):
        send_stats(DAY, warehouse_path=stats_db, recipients=TO, smtp=smtp)

    assert recorder.messages == [] and ledger(stats_db) == []
    assert built_stats(stats_db) == before


def test_a_refused_recipient_does_not_stop_the_others_and_a_retry_sends_only_it(
    stats_db: Path, smtp_server: tuple[Recorder, SmtpSettings]
):
    recorder, smtp = smtp_server
    recorder.rcpt_replies = {"b@example.com": "550 5.1.1 no such mailbox"}
    recipients = "a@example.com, b@example.com, c@example.com"

    with pytest.raises(report.SendStatsError, match="not sent to 1 of 3") as error:
        send_stats(DAY, warehouse_path=stats_db, recipients=recipients, smtp=smtp)
    assert "b@example.com" in str(error.value)
    assert [r.recipient for r in error.value.results] == ["a@example.com", "c@example.com"]

    recorder.rcpt_replies = {}
    retry = send_stats(DAY, warehouse_path=stats_db, recipients=recipients, smtp=smtp)

    assert [r.status for r in retry] == ["unchanged", "sent", "unchanged"]
    assert len(recorder.messages) == 3
    assert sorted(str(m["To"]) for m in recorder.messages) == [
        "a@example.com",
        "b@example.com",
        "c@example.com",
    ]


def test_in_a_range_a_refused_recipient_does_not_stop_the_later_dates(
    stats_db: Path, smtp_server: tuple[Recorder, SmtpSettings]
):
    recorder, smtp = smtp_server
    recorder.rcpt_replies = {"b@example.com": "550 5.1.1 no such mailbox"}
    recipients = "a@example.com, b@example.com"

    with pytest.raises(report.SendStatsError) as error:
        report.send_stats_dates(
            [DAY, OTHER_DAY], warehouse_path=stats_db, recipients=recipients, smtp=smtp
        )
    assert f"for {DAY} was not sent" in str(error.value)
    assert f"for {OTHER_DAY} was not sent" in str(error.value)
    sent = sorted((str(m["X-Event-Stats-Date"]), str(m["To"])) for m in recorder.messages)
    assert sent == [(str(DAY), "a@example.com"), (str(OTHER_DAY), "a@example.com")]

    recorder.rcpt_replies = {}
    report.send_stats_dates(
        [DAY, OTHER_DAY], warehouse_path=stats_db, recipients=recipients, smtp=smtp
    )
    assert len(recorder.messages) == 4  # b got both dates once, a nothing again


# A second process that opens the warehouse (as a SQL session does) and holds it.
HOLD_WAREHOUSE = """
import sys, time, duckdb
path, flag, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
while True:
    try:
        connection = duckdb.connect(path, read_only=True)
        break
    except duckdb.IOException:
        time.sleep(0.05)
open(flag, "w").close()
time.sleep(hold)
connection.close()
"""


def hold_warehouse(path: Path, flag: Path, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLD_WAREHOUSE, str(path), str(flag), str(seconds)]
    )


def wait_for(flag: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if flag.exists():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def stats_file(tmp_path: Path) -> Path:
    """sample_stats in a DuckDB file (a path ending in .duckdb), which one process holds."""
    return sample_stats(tmp_path / "warehouse.duckdb")


def test_a_process_taking_the_warehouse_after_the_send_does_not_cause_a_second_email(
    stats_file: Path,
    smtp_server: tuple[Recorder, SmtpSettings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    """The issue's case: the email went out, then a SQL session took the warehouse for longer
    than WAREHOUSE_LOCK_TIMEOUT before the ledger was written; the task failed, its retry sent
    again. Now the warehouse stays open from the intent row to the 'sent' mark."""
    recorder, smtp = smtp_server
    monkeypatch.setenv("WAREHOUSE_LOCK_TIMEOUT", "1")
    flag = tmp_path / "held"
    holders: list[subprocess.Popen] = []

    def take_the_warehouse_while_the_server_accepts(_message: object) -> None:
        holders.append(hold_warehouse(stats_file, flag, seconds=2))
        wait_for(flag, timeout=1.5)  # it cannot get it while send_stats holds the warehouse

    recorder.on_data = take_the_warehouse_while_the_server_accepts
    try:
        [first] = send_stats(DAY, warehouse_path=stats_file, recipients=TO, smtp=smtp)
        recorder.on_data = None
        monkeypatch.setenv("WAREHOUSE_LOCK_TIMEOUT", "30")  # the retry waits for the holder
        [retry] = send_stats(DAY, warehouse_path=stats_file, recipients=TO, smtp=smtp)
    finally:
        for holder in holders:
            holder.wait(timeout=30)
    assert flag.exists()  # the other process did take the warehouse, after the send
    assert (first.status, retry.status) == ("sent", "unchanged")
    assert recorder.message_ids() == [first.message_id]
    assert ledger(stats_file) == [(TO, 1, first.message_id, "sent", 1)]


def test_a_warehouse_held_by_another_process_fails_before_sending(
    stats_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("WAREHOUSE_LOCK_TIMEOUT", "1")
    flag = tmp_path / "held"
    holder = hold_warehouse(stats_file, flag, seconds=60)
    try:
        assert wait_for(flag, timeout=30)
        with pytest.raises(WarehouseLockedError, match="locked by .*WAREHOUSE_LOCK_TIMEOUT"):
            send_stats(DAY, warehouse_path=stats_file, recipients=TO, outbox_dir=tmp_path / "out")
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert not (tmp_path / "out").exists()
    assert ("email_log",) not in table(stats_file, "select table_name from duckdb_tables()")


SEND_STATS = """
import sys
from datetime import date
from pathlib import Path
from event_pipeline.mail import SmtpSettings
from event_pipeline.report import send_stats
day, path, to, port, outbox = sys.argv[1:6]
smtp = SmtpSettings(host="127.0.0.1", port=int(port), timeout=30) if port != "-" else None
send_stats(date.fromisoformat(day), warehouse_path=Path(path), recipients=to, smtp=smtp,
           outbox_dir=Path(outbox))
"""


def send_stats_process(path: Path, outbox: Path, port: int | None = None) -> subprocess.Popen:
    arguments = [str(DAY), str(path), TO, str(port) if port else "-", str(outbox)]
    return subprocess.Popen([sys.executable, "-c", SEND_STATS, *arguments])


def test_killed_after_the_server_took_the_message_resends_it_once_with_the_same_message_id(
    stats_db: Path, smtp_server: tuple[Recorder, SmtpSettings], tmp_path: Path
):
    recorder, smtp = smtp_server
    sender: list[subprocess.Popen] = []
    recorder.on_data = lambda _message: os.kill(sender[0].pid, signal.SIGKILL)

    sender.append(send_stats_process(stats_db, tmp_path, smtp.port))
    assert sender[0].wait(timeout=60) == -signal.SIGKILL
    [first] = recorder.message_ids()
    assert ledger(stats_db) == [(TO, 1, first, "sending", 1)]

    recorder.on_data = None
    [retry] = send_stats(DAY, warehouse_path=stats_db, recipients=TO, smtp=smtp)
    [again] = send_stats(DAY, warehouse_path=stats_db, recipients=TO, smtp=smtp)

    assert (retry.status, again.status) == ("resent", "unchanged")
    assert recorder.message_ids() == [first, first]
    assert ledger(stats_db) == [(TO, 1, first, "sent", 2)]


def crash_after_outbox_write(path: Path, outbox: Path, *, file_written: bool) -> str:
    """The state a kill leaves between the outbox file's rename and the ledger's 'sent' mark
    (file_written) or just before the rename (not file_written)."""
    [result] = send_stats(DAY, warehouse_path=path, recipients=TO, outbox_dir=outbox)
    with warehouse.connect(path) as connection:
        connection.execute("update ops.email_log set status = 'sending', sent_at = null")
    if not file_written:
        mail.outbox_path(outbox, TO, result.message_id).unlink()
    return result.message_id


def test_outbox_rerun_after_a_crash_that_wrote_the_file_sends_nothing(
    stats_db: Path, tmp_path: Path
):
    outbox = tmp_path / "outbox"
    message_id = crash_after_outbox_write(stats_db, outbox, file_written=True)
    written = mail.outbox_path(outbox, TO, message_id).read_bytes()

    [rerun] = send_stats(DAY, warehouse_path=stats_db, recipients=TO, outbox_dir=outbox)

    assert rerun.status == "unchanged" and rerun.message_id == message_id
    assert mail.outbox_path(outbox, TO, message_id).read_bytes() == written  # not rewritten
    assert len(list(outbox.iterdir())) == 1
    assert ledger(stats_db) == [(TO, 1, message_id, "sent", 1)]


def test_outbox_rerun_after_a_crash_before_the_file_sends_it_once(stats_db: Path, tmp_path: Path):
    outbox = tmp_path / "outbox"
    message_id = crash_after_outbox_write(stats_db, outbox, file_written=False)

    [rerun] = send_stats(DAY, warehouse_path=stats_db, recipients=TO, outbox_dir=outbox)

    assert rerun.status == "sent" and rerun.message_id == message_id
    assert [p.name for p in outbox.iterdir()] == [mail.outbox_path(outbox, TO, message_id).name]
    assert ledger(stats_db) == [(TO, 1, message_id, "sent", 1)]


def test_concurrent_send_stats_processes_send_once(stats_db: Path, tmp_path: Path):
    outbox = tmp_path / "outbox"
    processes = [send_stats_process(stats_db, outbox) for _ in range(3)]
    assert [process.wait(timeout=120) for process in processes] == [0, 0, 0]
    assert len(list(outbox.glob("*.eml"))) == 1
    assert [row[3] for row in ledger(stats_db)] == ["sent"]
