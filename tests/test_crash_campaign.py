"""A quick crash campaign (tests/crash_campaign.py, `make crash` runs the full one).

Two SIGKILLs per step (loader, dbt, send_stats to the outbox and over SMTP) on small partitions:
no violation, and the kills really interrupted each step (at least one trial left the step
unfinished). CRASH_SEED replays a failure (the seed is in the assertion message).
"""

from __future__ import annotations

import os
from pathlib import Path

import crash_campaign
import pytest
from crash_state import Delivery, EmailRow, Snapshot, smtp_duplicate_violations

SEED = int(os.environ.get("CRASH_SEED", "20261127"))


@pytest.mark.e2e
def test_sigkill_at_random_moments_of_every_step_leaves_old_or_new_and_a_rerun_converges(
    tmp_path: Path,
) -> None:
    options = crash_campaign.Options(
        trials=2, seed=SEED, quick=True, work=tmp_path / "crash", docs=False
    )
    lines: list[str] = []
    campaign = crash_campaign.run_campaign(options, out=lines.append)
    report = "\n".join(lines)
    print(report)

    assert campaign.violations() == 0, f"seed {SEED}:\n{report}"
    for step in crash_campaign.STEPS:
        trials = [trial for trial in campaign.trials if trial.step == step]
        assert len(trials) == 2, report
        unfinished = [trial for trial in trials if trial.outcome in ("old", "partial")]
        assert unfinished, (
            f"{step}: no kill landed before the step was done (seed {SEED}):\n{report}"
        )


def test_kill_moments_cover_every_slice_of_the_duration_once() -> None:
    fractions = crash_campaign.kill_fractions(7, "loader", 10)
    assert sorted(int(fraction * 10) for fraction in fractions) == list(range(10))
    assert fractions == crash_campaign.kill_fractions(7, "loader", 10)  # replayable
    assert fractions != crash_campaign.kill_fractions(8, "loader", 10)


def _delivery(message_id: str, phase: str) -> Delivery:
    return Delivery(None, "a@example.com", "c0ffee", message_id, phase)


def test_smtp_allows_only_a_resend_of_the_same_message_the_ledger_did_not_record() -> None:
    empty = Snapshot({}, {}, {}, {}, None, {}, (), ())
    killed, rerun = [_delivery("<1@x>", "killed")], [_delivery("<1@x>", "rerun")]
    assert smtp_duplicate_violations([], killed, rerun, empty) == ([], 1)

    [other_id], _ = smtp_duplicate_violations([], killed, [_delivery("<2@x>", "rerun")], empty)
    assert "another Message-ID" in other_id
    [again], _ = smtp_duplicate_violations(killed, [], rerun, empty)
    assert "delivered before this step" in again
    [twice], _ = smtp_duplicate_violations([], [], rerun * 2, empty)
    assert "twice within one run" in twice
    row = EmailRow(None, "a@example.com", 1, "c0ffee", "<1@x>", None, "sent")
    recorded = Snapshot({}, {}, {}, {}, None, {}, (row,), ())
    [ignored], _ = smtp_duplicate_violations([], killed, rerun, recorded)
    assert "recorded it as sent" in ignored
